"""VLM behaviour: shapes, tower naming, causal masking, padding invariance, KV cache vs recompute."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsevlm.config import VisionConfig
from sparsevlm.eval.generate import compiled_generate
from sparsevlm.models.decoder import init_cache
from sparsevlm.models.vit import ViT
from sparsevlm.models.vlm import VLM
from sparsevlm.tree import flatten


def _jit(model: VLM):
    """`model.apply`, compiled: one program per input shape instead of hundreds of eager single ops."""
    return jax.jit(model.apply, static_argnames=("method",))


def _inputs(bundle, batch=2, length=7, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, 48, 48, 3)).astype(np.float32)
    tokens = rng.integers(4, bundle.config.language.vocab_size, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), bool)
    return images, tokens, mask


def test_output_shapes_and_tower_paths(tiny_bundle):
    model = VLM(tiny_bundle.config)
    apply = _jit(model)
    images, tokens, mask = _inputs(tiny_bundle)
    logits, cache = apply({"params": tiny_bundle.params}, images, tokens, mask)
    n_image = tiny_bundle.config.vision.num_features
    assert n_image == 9
    assert logits.shape == (2, n_image + 7, tiny_bundle.config.language.vocab_size)
    assert logits.dtype == jnp.float32 and cache is None
    towers = {path.split("/")[0] for path in flatten(tiny_bundle.params)}
    assert towers == {"vision", "connector", "language"}
    assert "language/blocks_1/attn/q/kernel" in flatten(tiny_bundle.params)
    assert "vision/blocks_0/mlp/up/kernel" in flatten(tiny_bundle.params)


def test_changing_a_later_token_leaves_earlier_logits_unchanged(tiny_bundle):
    model = VLM(tiny_bundle.config)
    apply = _jit(model)
    images, tokens, mask = _inputs(tiny_bundle)
    changed = tokens.copy()
    changed[:, 4] = (changed[:, 4] + 1) % tiny_bundle.config.language.vocab_size
    a, _ = apply({"params": tiny_bundle.params}, images, tokens, mask)
    b, _ = apply({"params": tiny_bundle.params}, images, changed, mask)
    n_image = tiny_bundle.config.vision.num_features
    np.testing.assert_array_equal(a[:, : n_image + 4], b[:, : n_image + 4])
    assert not np.allclose(a[:, n_image + 4 :], b[:, n_image + 4 :])


def test_image_changes_text_logits(tiny_bundle):
    model = VLM(tiny_bundle.config)
    apply = _jit(model)
    images, tokens, mask = _inputs(tiny_bundle)
    a, _ = apply({"params": tiny_bundle.params}, images, tokens, mask)
    b, _ = apply({"params": tiny_bundle.params}, images[::-1], tokens, mask)
    assert not np.allclose(a[0, -1], b[0, -1])


def test_left_padding_does_not_change_real_token_logits(tiny_bundle):
    model = VLM(tiny_bundle.config)
    apply = _jit(model)
    images, tokens, mask = _inputs(tiny_bundle, length=5)
    pad = 3
    padded = np.concatenate([np.zeros((2, pad), np.int32), tokens], axis=1)
    padded_mask = np.concatenate([np.zeros((2, pad), bool), mask], axis=1)
    a, _ = apply({"params": tiny_bundle.params}, images, tokens, mask)
    b, _ = apply({"params": tiny_bundle.params}, images, padded, padded_mask)
    np.testing.assert_allclose(a[:, -5:], b[:, -5:], rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_equals_full_recomputation(tiny_bundle):
    model = VLM(tiny_bundle.config)
    apply = _jit(model)
    params = tiny_bundle.params
    images, tokens, mask = _inputs(tiny_bundle, length=6)
    mask[0, :2] = False  # row 0 is left-padded
    n_image, steps = tiny_bundle.config.vision.num_features, 5
    cache = init_cache(tiny_bundle.config.language, 2, n_image + 6 + steps)
    logits, cache = apply({"params": params}, images, tokens, mask, cache)
    full, _ = apply({"params": params}, images, tokens, mask)
    np.testing.assert_allclose(logits, np.pad(full, ((0, 0), (0, 0), (0, 0))), rtol=1e-5, atol=1e-5)
    valid = np.concatenate([np.ones((2, n_image), bool), mask, np.zeros((2, steps), bool)], axis=1)
    position = n_image + mask.sum(1) - 1
    seq, seq_mask = tokens, mask
    rng = np.random.default_rng(3)
    for i in range(steps):
        new = rng.integers(4, 20, size=(2, 1)).astype(np.int32)
        index = n_image + 6 + i
        valid[:, index] = True
        position = position + 1
        step_logits, cache = apply(
            {"params": params}, new, position[:, None], valid, cache, index, method=VLM.decode
        )
        seq = np.concatenate([seq, new], axis=1)
        seq_mask = np.concatenate([seq_mask, np.ones((2, 1), bool)], axis=1)
        recomputed, _ = apply({"params": params}, images, seq, seq_mask)
        np.testing.assert_allclose(step_logits[:, 0], recomputed[:, -1], rtol=1e-4, atol=1e-5)


def test_greedy_generate_equals_argmax_loop_without_cache(tiny_bundle):
    model = VLM(tiny_bundle.config)
    apply = _jit(model)
    params = tiny_bundle.params
    images, tokens, mask = _inputs(tiny_bundle, length=4, seed=5)
    out = np.asarray(compiled_generate(model, 4, -1, 0)(params, images, tokens, mask))
    seq, seq_mask = tokens, mask
    for i in range(4):
        logits, _ = apply({"params": params}, images, seq, seq_mask)
        nxt = np.argmax(np.asarray(logits[:, -1]), axis=-1).astype(np.int32)
        np.testing.assert_array_equal(out[:, i], nxt)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
        seq_mask = np.concatenate([seq_mask, np.ones((2, 1), bool)], axis=1)


def test_greedy_generate_pads_after_eos(tiny_bundle):
    model = VLM(tiny_bundle.config)
    images, tokens, mask = _inputs(tiny_bundle, length=4, seed=5)
    free = np.asarray(compiled_generate(model, 4, -1, 0)(tiny_bundle.params, images, tokens, mask))
    eos = int(free[0, 1])
    out = np.asarray(compiled_generate(model, 4, eos, 0)(tiny_bundle.params, images, tokens, mask))
    first = list(out[0]).index(eos)
    assert (out[0, first + 1 :] == 0).all()


@pytest.mark.parametrize(
    "overrides,tokens",
    [
        ({}, 9),
        ({"use_cls_token": True, "drop_cls_token": False}, 10),
        ({"use_cls_token": True, "drop_cls_token": True, "feature_layer": -2, "pre_norm": True}, 9),
    ],
)
def test_vit_variants(overrides, tokens):
    config = dataclasses.replace(
        VisionConfig(width=16, depth=2, num_heads=2, mlp_dim=32), **overrides
    )
    vit = ViT(config)
    params = vit.init(jax.random.key(0), np.zeros((1, 48, 48, 3), np.float32))["params"]
    out = vit.apply({"params": params}, np.zeros((3, 48, 48, 3), np.float32))
    assert out.shape == (3, tokens, 16)
    # feature_layer=-2 stops one block early: the last block and the final norm are never built
    if config.feature_layer == -2:
        assert "blocks_1" not in params and "final_norm" not in params
    else:
        assert "blocks_1" in params and "final_norm" in params


@pytest.mark.parametrize("arch", ["llama", "opt"])  # rotary positions, and a learned position table
def test_packed_texts_see_exactly_what_they_see_alone(tiny_bundle, arch):
    config = tiny_bundle.config
    params = tiny_bundle.params
    if arch == "opt":
        language = dataclasses.replace(config.language, arch="opt", num_kv_heads=4)
        config = dataclasses.replace(config, language=language)
        params = VLM(config).init(jax.random.key(1), np.zeros((1, 48, 48, 3), np.float32),
                                  np.ones((1, 4), np.int32), np.ones((1, 4), bool))["params"]
    apply = _jit(VLM(config))
    rng = np.random.default_rng(3)
    image = rng.normal(size=(1, 48, 48, 3)).astype(np.float32)
    texts = [rng.integers(4, config.language.vocab_size, size=n).astype(np.int32) for n in (5, 3, 6)]
    length = 16  # two padding slots before the first text
    tokens, segments = np.zeros((1, length), np.int32), np.zeros((1, length), np.int32)
    start = length - sum(map(len, texts))
    for k, text in enumerate(texts, start=1):
        tokens[0, start:start + len(text)], segments[0, start:start + len(text)] = text, k
        start += len(text)
    packed, _ = apply({"params": params}, image, tokens, segments > 0, segments=segments)
    packed = np.asarray(packed[0, -length:])
    start = length - sum(map(len, texts))
    for text in texts:
        alone, _ = apply({"params": params}, image, text[None], np.ones((1, len(text)), bool))
        np.testing.assert_allclose(packed[start:start + len(text)], alone[0, -len(text):], rtol=2e-5, atol=2e-5)
        start += len(text)
    # Without segments the later texts attend the earlier ones (one long text): their logits differ.
    joined, _ = apply({"params": params}, image, tokens, segments > 0)
    assert not np.allclose(np.asarray(joined[0, -6:]), packed[-6:], atol=1e-3)


def test_packed_texts_need_image_tokens_before_a_decoder_only_text(tiny_bundle):
    config = dataclasses.replace(tiny_bundle.config, image_token_id=5)
    tokens = np.array([[5, 5, 5, 5, 5, 5, 5, 5, 5, 7, 8]], np.int32)
    with pytest.raises(ValueError, match="image_token_id=5"):
        VLM(config).apply({"params": tiny_bundle.params}, np.zeros((1, 48, 48, 3), np.float32), tokens,
                          np.ones_like(tokens, bool), segments=np.ones_like(tokens))
