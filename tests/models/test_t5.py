"""The T5 / FlanT5 encoder–decoder against `transformers`' `T5ForConditionalGeneration`, via the HF name rules."""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsevlm import tree
from sparsevlm.config import LanguageConfig
from sparsevlm.eval.beam import greedy_search
from sparsevlm.eval.generate import start_t5_decoding
from sparsevlm.hf.rules import Rule, to_hf
from sparsevlm.hf.t5 import language_config, language_rules
from sparsevlm.models.decoder import init_cache
from sparsevlm.models.t5 import T5, relative_position_bucket, t5_decoder_block, t5_encoder_block
from tests.hf.tiny import bare_language_params, saved_tensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# d_kv * num_heads != d_model and more decoder than encoder blocks, to catch mixed-up sizes;
# few buckets and a short max distance, so that short sequences reach the log-spaced buckets.
FLAN_T5 = dict(vocab_size=96, d_model=32, d_kv=6, d_ff=48, num_layers=1, num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
               tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
T5_V1 = FLAN_T5 | dict(feed_forward_proj="relu", tie_word_embeddings=True)
BATCH, SOURCE, TARGET, NEW = 2, 12, 8, 8
PAD_ID, EOS_ID = 0, 1


@dataclasses.dataclass
class Checkpoint:
    """A tiny random HF T5, its saved tensors and our converted params."""

    model: torch.nn.Module
    config: LanguageConfig
    tensors: dict[str, np.ndarray]
    params: dict
    rules: list[Rule]


def _hf_model(hf_config: dict) -> torch.nn.Module:
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_config))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if not hf_config["tie_word_embeddings"]:
            # transformers v5 always ties a fresh model's head; a FlanT5 checkpoint has its own.
            # (scaled so that logits are O(1), where float32 rounding stays well inside the tolerance).
            model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=generator) * 0.2)
        # HF initialises norms to identity: randomise so that every tensor matters.
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


def _expected_shapes(config: LanguageConfig) -> dict[str, tuple[int, ...]]:
    embeds = jax.ShapeDtypeStruct((1, 3, config.width), np.float32)
    valid = jax.ShapeDtypeStruct((1, 3), bool)
    tokens = jax.ShapeDtypeStruct((1, 2), np.int32)
    self_valid = jax.ShapeDtypeStruct((1, 2), bool)
    shapes = jax.eval_shape(T5(config).init, jax.random.key(0), embeds, valid, tokens, self_valid)["params"]
    return {f"language/{k}": tuple(v.shape) for k, v in tree.flatten(shapes).items()}


def _checkpoint(directory: pathlib.Path, hf_config: dict) -> Checkpoint:
    model = _hf_model(hf_config)
    tensors = saved_tensors(model, directory)
    config = language_config(model.config)
    rules = language_rules(config, prefix="")
    params = bare_language_params(rules, tensors, _expected_shapes(config))
    return Checkpoint(model, config, tensors, params, rules)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    """FlanT5 as BLIP-2 / InstructBLIP use it: gated-GELU, untied head."""
    return _checkpoint(tmp_path_factory.mktemp("flan-t5"), FLAN_T5)


def _inputs(seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    source = rng.integers(2, FLAN_T5["vocab_size"], size=(BATCH, SOURCE)).astype(np.int32)
    valid = np.ones((BATCH, SOURCE), bool)
    valid[0, -4:] = False  # row 0 is right-padded, as the T5 tokenizer pads
    source[~valid] = PAD_ID
    target = rng.integers(2, FLAN_T5["vocab_size"], size=(BATCH, TARGET)).astype(np.int32)
    target[:, 0] = FLAN_T5["decoder_start_token_id"]
    return source, valid, target


@functools.partial(jax.jit, static_argnums=0)
def _forward(config: LanguageConfig, params: dict, source: jax.Array, valid: jax.Array, target: jax.Array):
    model, variables = T5(config), {"params": params}
    embeds = model.apply(variables, source, method=T5.embed_tokens)
    return model.apply(variables, embeds, valid, target, jnp.ones(target.shape, bool))[0]


def _hf_logits(model: torch.nn.Module, source: np.ndarray, valid: np.ndarray, target: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(source.astype(np.int64)),
                    attention_mask=torch.from_numpy(valid.astype(np.int64)),
                    decoder_input_ids=torch.from_numpy(target.astype(np.int64)))
    return out.logits.numpy()


def _check_rules_and_export(checkpoint: Checkpoint) -> None:
    # Every saved tensor is read once, and every param comes from one.
    assert sorted(r.hf for r in checkpoint.rules) == sorted(checkpoint.tensors)
    flat = {f"language/{k}": v for k, v in tree.flatten(checkpoint.params).items()}
    assert {p for r in checkpoint.rules for p in r.ours} == set(flat)
    exported = dict(to_hf(checkpoint.rules, flat))
    assert exported.keys() == checkpoint.tensors.keys()
    for name, value in exported.items():
        assert value.dtype == checkpoint.tensors[name].dtype, name
        np.testing.assert_array_equal(value, checkpoint.tensors[name], err_msg=name)


def _check_logits(checkpoint: Checkpoint) -> None:
    source, valid, target = _inputs()
    ours = np.asarray(_forward(checkpoint.config, checkpoint.params, source, valid, target))
    np.testing.assert_allclose(ours, _hf_logits(checkpoint.model, source, valid, target), rtol=0, atol=1e-5)


def test_config_and_param_names(checkpoint: Checkpoint):
    cfg = checkpoint.config
    assert (cfg.arch, cfg.act, cfg.resolved_gated_mlp, cfg.tie_embeddings) == ("t5", "gelu_tanh", True, False)
    assert (cfg.depth, cfg.num_decoder_layers, cfg.resolved_head_dim) == (1, 2, 6)
    flat = tree.flatten(checkpoint.params)
    for path in ("encoder/blocks_0/mlp/gate/kernel", "encoder/relative_bias/embedding", "encoder/norm/scale",
                 "decoder/blocks_1/cross/o/kernel", "decoder/blocks_0/norm_cross/scale", "lm_head/kernel"):
        assert path in flat, path
    assert "decoder/blocks_0/attn/q/bias" not in flat


def test_rules_cover_exactly_the_saved_tensors_and_export_is_bit_exact(checkpoint: Checkpoint):
    _check_rules_and_export(checkpoint)


def test_padded_logits_match_transformers(checkpoint: Checkpoint):
    _check_logits(checkpoint)


def test_original_t5_relu_and_tied_scaled_head(tmp_path: pathlib.Path):
    checkpoint = _checkpoint(tmp_path, T5_V1)
    cfg = checkpoint.config
    assert (cfg.act, cfg.resolved_gated_mlp, cfg.tie_embeddings) == ("relu", False, True)
    assert "lm_head" not in checkpoint.params
    _check_rules_and_export(checkpoint)
    _check_logits(checkpoint)


@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (8, 16)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_match_transformers(num_buckets: int, max_distance: int, bidirectional: bool):
    relative = np.arange(-300, 301)
    expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        torch.from_numpy(relative), bidirectional, num_buckets, max_distance)
    ours = relative_position_bucket(jnp.asarray(relative, jnp.int32), bidirectional, num_buckets, max_distance)
    np.testing.assert_array_equal(np.asarray(ours), expected.numpy())


@functools.partial(jax.jit, static_argnums=0)
def _encode(config: LanguageConfig, params: dict, source: jax.Array, valid: jax.Array) -> jax.Array:
    model, variables = T5(config), {"params": params}
    return model.apply(variables, model.apply(variables, source, method=T5.embed_tokens), valid, method=T5.encode)


@functools.partial(jax.jit, static_argnums=0)
def _decode_step(config: LanguageConfig, params: dict, token: jax.Array, encoded: jax.Array, valid: jax.Array,
                 self_valid: jax.Array, cache: list, index: jax.Array) -> tuple[jax.Array, list]:
    return T5(config).apply({"params": params}, token, encoded, valid, self_valid, cache, index, method=T5.decode)


def test_cached_decoding_equals_full_pass(checkpoint: Checkpoint):
    cfg, params = checkpoint.config, checkpoint.params
    source, valid, target = _inputs()
    full = np.asarray(_forward(cfg, params, source, valid, target))
    encoded = _encode(cfg, params, source, valid)
    cache = init_cache(cfg, BATCH, TARGET)
    self_valid = np.ones((BATCH, TARGET), bool)
    for index in range(TARGET):
        logits, cache = _decode_step(cfg, params, target[:, index : index + 1], encoded, valid, self_valid, cache,
                                     index)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, index], rtol=0, atol=1e-5)


def test_block_by_block_equals_call(checkpoint: Checkpoint):
    # The way block-wise calibration runs the model: one block at a time, with each stack's bias computed once.
    cfg, params = checkpoint.config, checkpoint.params
    source, valid, target = _inputs()

    @jax.jit
    def staged(params: dict, source: jax.Array, valid: jax.Array, target: jax.Array) -> jax.Array:
        model, variables = T5(cfg), {"params": params}
        x = model.apply(variables, source, method=T5.embed_tokens)
        slots = jnp.arange(SOURCE)
        bias = model.apply(variables, slots, slots, method=lambda m, q, k: m.encoder.position_bias(q, k))
        mask = jnp.broadcast_to(valid[:, None, :], (BATCH, SOURCE, SOURCE))
        for i in range(cfg.depth):
            x = t5_encoder_block(cfg).apply({"params": params["encoder"][f"blocks_{i}"]}, x, mask, score_bias=bias)[0]
        encoded = model.apply(variables, x, method=lambda m, h: m.encoder.norm(h))
        y = model.apply(variables, target, method=T5.embed_tokens)
        slots = jnp.arange(TARGET)
        bias = model.apply(variables, slots, slots, method=lambda m, q, k: m.decoder.position_bias(q, k))
        causal = jnp.broadcast_to(jnp.tril(jnp.ones((TARGET, TARGET), bool)), (BATCH, TARGET, TARGET))
        cross = jnp.broadcast_to(valid[:, None, :], (BATCH, TARGET, SOURCE))
        for i in range(cfg.num_decoder_layers):
            block = t5_decoder_block(cfg)
            y = block.apply({"params": params["decoder"][f"blocks_{i}"]}, y, causal, None, None, 0, bias, encoded,
                            cross)[0]
        return model.apply(variables, y, method=lambda m, h: m.lm_head(m.decoder.norm(h)))

    np.testing.assert_allclose(np.asarray(staged(params, source, valid, target)),
                               np.asarray(_forward(cfg, params, source, valid, target)), rtol=0, atol=1e-5)


def test_greedy_generation_matches_transformers(checkpoint: Checkpoint):
    cfg, params = checkpoint.config, checkpoint.params
    source, valid, _ = _inputs(seed=3)

    @jax.jit
    def generate(params: dict, source: jax.Array, valid: jax.Array) -> jax.Array:
        model = T5(cfg)
        embeds = model.apply({"params": params}, source, method=T5.embed_tokens)
        encoded = model.apply({"params": params}, embeds, valid, method=T5.encode)
        assert cfg.decoder_start_id == FLAN_T5["decoder_start_token_id"]
        first_logits, state, step = start_t5_decoding(model, params, encoded, valid, NEW)
        return greedy_search(step, first_logits, state, NEW, EOS_ID, PAD_ID)

    ours = np.asarray(generate(params, source, valid))
    # An explicit cache: the one `generate` builds from the config has only `num_layers` (encoder) layers.
    cache = transformers.EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
    with torch.no_grad():
        out = checkpoint.model.generate(
            input_ids=torch.from_numpy(source.astype(np.int64)), attention_mask=torch.from_numpy(valid.astype(np.int64)),
            do_sample=False, num_beams=1, max_new_tokens=NEW, past_key_values=cache)
    generated = out[:, 1:].numpy()  # HF's sequences start with the decoder start token
    np.testing.assert_array_equal(ours[:, : generated.shape[1]], generated)


@pytest.mark.parametrize("family", ["blip2", "instructblip"])
def test_vlm_names_are_the_plain_names_under_language_model(family: str, tmp_path: pathlib.Path):
    t = transformers
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    qformer = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    kwargs = dict(vision_config=vision, qformer_config=qformer, text_config=t.T5Config(**FLAN_T5).to_dict(),
                  num_query_tokens=4)
    if family == "blip2":
        model = t.Blip2ForConditionalGeneration(t.Blip2Config(**kwargs))
    else:
        model = t.InstructBlipForConditionalGeneration(t.InstructBlipConfig(**kwargs))
    # As above: a fresh v5 model ties its head, a FlanT5 checkpoint does not.
    head = model.language_model.lm_head
    head.weight = torch.nn.Parameter(head.weight.detach().clone() + 1)
    names = {k for k in saved_tensors(model, tmp_path) if k.startswith("language_model.")}
    config = language_config(model.config.text_config)
    assert not config.tie_embeddings
    assert {r.hf for r in language_rules(config, prefix="language_model.")} == names


def test_language_config_rejects_unsupported_feed_forward():
    with pytest.raises(ValueError, match="text_config.feed_forward_proj"):
        language_config(transformers.T5Config(**(FLAN_T5 | {"feed_forward_proj": "gated-tanh"})))
