"""`Attention` (through `jax.nn.dot_product_attention`) against a plain float64 einsum-softmax re-statement."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sparsevlm.models.layers import Attention, causal_mask

HEAD_DIM, WIDTH = 8, 16


def _reference(params, x, mask, heads, kv_heads, kv_input=None, score_bias=None, scale=True):
    """Attention written out in float64 NumPy; masked scores are -1e30, so a fully masked row is uniform."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def lin(name, inp):
        out = np.asarray(inp, np.float64) @ p[name]["kernel"]
        return out + p[name]["bias"] if "bias" in p[name] else out

    source = x if kv_input is None else kv_input
    b, t, s = x.shape[0], x.shape[1], source.shape[1]
    q = lin("q", x).reshape(b, t, heads, HEAD_DIM)
    k = lin("k", source).reshape(b, s, kv_heads, HEAD_DIM)
    v = lin("v", source).reshape(b, s, kv_heads, HEAD_DIM)
    k = np.repeat(k, heads // kv_heads, axis=2)  # query head h reads kv head h // group_size
    v = np.repeat(v, heads // kv_heads, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k)
    if scale:
        scores = scores / np.sqrt(HEAD_DIM)
    if score_bias is not None:
        scores = scores + np.asarray(score_bias, np.float64)
    if mask is not None:
        scores = np.where(mask[:, None], scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, heads * HEAD_DIM)
    return lin("o", out)


def _module_and_params(rng, heads, kv_heads=None, scale_scores=True, rope_theta=None, **init_args):
    module = Attention(heads, HEAD_DIM, WIDTH, num_kv_heads=kv_heads, scale_scores=scale_scores,
                       rope_theta=rope_theta)
    params = module.init(jax.random.key(0), **init_args)["params"]
    # Weights of order one, so the softmax is far from uniform and a wrong mask or scale shows.
    params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32) * 0.5, params)
    return module, params


def _check(got, want):
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _left_padded(b, t):
    valid = np.ones((b, t), bool)
    valid[1, :2] = False  # row 1: two left pads
    return valid


@pytest.mark.parametrize("kind", ["padding", "causal"])
def test_self_attention(kind):
    rng = np.random.default_rng(0)
    b, t = 2, 6
    x = rng.normal(size=(b, t, WIDTH)).astype(np.float32)
    valid = _left_padded(b, t)
    if kind == "padding":  # bidirectional over the valid keys
        mask = np.repeat(valid[:, None, :], t, axis=1)
    else:  # the pad queries of row 1 see no valid key at all: a fully masked row
        mask = np.asarray(causal_mask(valid, np.arange(t)))
        assert not mask[1, 0].any()
    module, params = _module_and_params(rng, 4, x=x, mask=mask)
    got, cache = module.apply({"params": params}, x, mask)
    assert cache is None
    _check(got, _reference(params, x, mask, 4, 4))


def test_grouped_query_attention():
    rng = np.random.default_rng(1)
    b, t = 2, 5
    x = rng.normal(size=(b, t, WIDTH)).astype(np.float32)
    mask = np.asarray(causal_mask(_left_padded(b, t), np.arange(t)))
    module, params = _module_and_params(rng, 4, kv_heads=2, x=x, mask=mask)
    assert params["k"]["kernel"].shape == (WIDTH, 2 * HEAD_DIM)
    got, _ = module.apply({"params": params}, x, mask)
    _check(got, _reference(params, x, mask, 4, 2))


def test_cross_attention_over_a_longer_source():
    rng = np.random.default_rng(2)
    b, t, s = 2, 4, 7
    x = rng.normal(size=(b, t, WIDTH)).astype(np.float32)
    encoded = rng.normal(size=(b, s, WIDTH)).astype(np.float32)
    source_valid = np.ones((b, s), bool)
    source_valid[0, 5:] = False  # right-padded encoder row
    mask = np.repeat(source_valid[:, None, :], t, axis=1)
    module, params = _module_and_params(rng, 4, x=x, mask=mask, kv_input=encoded)
    got, _ = module.apply({"params": params}, x, mask, kv_input=encoded)
    _check(got, _reference(params, x, mask, 4, 4, kv_input=encoded))


@pytest.mark.parametrize("bias_batch", [1, 2])
def test_t5_score_bias_without_scaling(bias_batch):
    rng = np.random.default_rng(3)
    b, t, heads = 2, 5, 4
    x = rng.normal(size=(b, t, WIDTH)).astype(np.float32)
    bias = rng.normal(size=(bias_batch, heads, t, t)).astype(np.float32)
    mask = np.asarray(causal_mask(_left_padded(b, t), np.arange(t)))
    module, params = _module_and_params(rng, heads, scale_scores=False, x=x, mask=mask, score_bias=bias)
    got, _ = module.apply({"params": params}, x, mask, score_bias=bias)
    _check(got, _reference(params, x, mask, heads, heads, score_bias=bias, scale=False))
    # Scaling or dropping the bias would change the answer: the reference does see both.
    assert np.abs(_reference(params, x, mask, heads, heads, score_bias=bias) - np.asarray(got)).max() > 1e-3
    assert np.abs(_reference(params, x, mask, heads, heads, scale=False) - np.asarray(got)).max() > 1e-3


def test_kv_cache_decode_step_matches_the_full_pass():
    """Prefill T-1 tokens into a cache longer than the sequence, decode the last: the full pass's last row."""
    rng = np.random.default_rng(4)
    b, t, slots, heads, kv_heads = 2, 6, 9, 4, 2
    x = rng.normal(size=(b, t, WIDTH)).astype(np.float32)
    valid = np.zeros((b, slots), bool)
    valid[:, :t] = _left_padded(b, t)
    positions = np.maximum(np.cumsum(valid[:, :t], axis=1) - 1, 0)
    full_mask = np.asarray(causal_mask(valid[:, :t], np.arange(t)))
    module, params = _module_and_params(rng, heads, kv_heads=kv_heads, rope_theta=10000.0,
                                        x=x, mask=full_mask, positions=positions)
    full, _ = module.apply({"params": params}, x, full_mask, positions)

    empty = np.zeros((b, slots, kv_heads, HEAD_DIM), np.float32)
    cache = {"k": empty, "v": empty}
    prefill_mask = np.asarray(causal_mask(valid, np.arange(t - 1)))  # [B, T-1, slots]
    prefill, cache = module.apply({"params": params}, x[:, : t - 1], prefill_mask, positions[:, : t - 1],
                                  cache=cache, cache_index=0)
    assert not np.asarray(cache["k"])[:, t - 1:].any()  # nothing written past the prefill
    step_mask = np.asarray(causal_mask(valid, np.array([t - 1])))  # [B, 1, slots]
    step, cache = module.apply({"params": params}, x[:, t - 1:], step_mask, positions[:, t - 1:],
                               cache=cache, cache_index=t - 1)
    # Slots never written hold zeros and are masked out, so the cached passes equal the full one at every
    # real query (a pad query's fully masked row averages over all slots: 9 here, 6 in the full pass).
    real = valid[:, : t - 1]
    _check(np.asarray(prefill)[real], np.asarray(full)[:, : t - 1][real])
    _check(step, np.asarray(full)[:, t - 1:])
    assert np.asarray(cache["k"]).shape == (b, slots, kv_heads, HEAD_DIM) and np.asarray(cache["k"])[:, t - 1].any()
