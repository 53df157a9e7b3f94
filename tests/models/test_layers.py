"""Attention, rotary positions and MLP against NumPy re-statements."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sparsevlm.models.layers import MLP, Attention, apply_rope, rope_tables


def _rope_numpy(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    # Independent statement of HF Llama's rotate_half RoPE, pair (i, i + D/2) rotated by pos * theta^(-2i/D).
    d = x.shape[-1]
    out = np.empty_like(x)
    for i in range(d // 2):
        angle = positions[..., None] * theta ** (-2 * i / d)  # [B, T, 1]
        c, s = np.cos(angle), np.sin(angle)
        a, b = x[..., i], x[..., i + d // 2]
        out[..., i] = a * c - b * s
        out[..., i + d // 2] = b * c + a * s
    return out


def test_rope_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = rng.integers(0, 50, size=(2, 5))
    cos, sin = rope_tables(positions, 8, 10000.0)
    np.testing.assert_allclose(apply_rope(x, cos, sin), _rope_numpy(x, positions, 10000.0), rtol=1e-5, atol=1e-5)


def _attention_numpy(params, x, mask, heads, kv_heads, head_dim, positions=None, theta=None):
    def lin(name, inp):
        out = inp @ params[name]["kernel"]
        return out + params[name]["bias"] if "bias" in params[name] else out

    b, t, _ = x.shape
    q = lin("q", x).reshape(b, t, heads, head_dim)
    k = lin("k", x).reshape(b, t, kv_heads, head_dim)
    v = lin("v", x).reshape(b, t, kv_heads, head_dim)
    if theta is not None:
        q, k = _rope_numpy(q, positions, theta), _rope_numpy(k, positions, theta)
    out = np.zeros((b, t, heads, head_dim))
    for h in range(heads):
        kv = h // (heads // kv_heads)  # query head h reads kv group h // group_size
        scores = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, kv]) / np.sqrt(head_dim)
        scores = np.where(mask, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out[:, :, h] = np.einsum("bts,bsd->btd", probs, v[:, :, kv])
    return lin("o", out.reshape(b, t, heads * head_dim))


@pytest.mark.parametrize("heads,kv_heads,theta", [(4, 4, None), (4, 2, 10000.0), (4, 1, 500.0)])
def test_attention_matches_numpy(heads, kv_heads, theta):
    rng = np.random.default_rng(1)
    head_dim, width, b, t = 8, 16, 2, 6
    module = Attention(heads, head_dim, width, num_kv_heads=kv_heads, rope_theta=theta)
    x = rng.normal(size=(b, t, width)).astype(np.float32)
    positions = np.tile(np.arange(t), (b, 1))
    mask = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
    mask[1, :, 0] = False  # a padded first key in row 1
    mask[1, 0, 0] = True
    params = module.init(jax.random.key(0), x, mask, positions)["params"]
    params = jax.tree.map(lambda a: np.asarray(a) + rng.normal(size=a.shape).astype(np.float32) * 0.1, params)
    got, _ = module.apply({"params": params}, x, mask, positions)
    want = _attention_numpy(params, x, mask, heads, kv_heads, head_dim, positions, theta)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_swiglu_matches_numpy():
    rng = np.random.default_rng(2)
    module = MLP(12, 6, act="silu", gated=True, use_bias=False)
    x = rng.normal(size=(3, 6)).astype(np.float32)
    p = module.init(jax.random.key(0), x)["params"]
    gate = x @ p["gate"]["kernel"]
    want = (gate / (1 + np.exp(-gate)) * (x @ p["up"]["kernel"])) @ p["down"]["kernel"]
    np.testing.assert_allclose(module.apply({"params": p}, x), want, rtol=1e-5, atol=1e-6)
