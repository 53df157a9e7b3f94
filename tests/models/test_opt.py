"""The OPT decoder against `transformers`' `OPTForCausalLM`, via the HF name rules."""

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
from sparsevlm.hf.opt import language_config, language_rules
from sparsevlm.hf.rules import Rule, to_hf
from sparsevlm.models.decoder import Decoder, decoder_block, init_cache
from sparsevlm.models.layers import causal_mask
from tests.hf.tiny import bare_language_params, saved_tensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

OPT = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
           max_position_embeddings=40, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2)
BATCH, LENGTH, PAD, NEW = 2, 9, 3, 8  # row 0 is left-padded by PAD; NEW generated tokens


@dataclasses.dataclass
class Checkpoint:
    """A tiny random HF OPT, its saved tensors and our converted params."""

    model: torch.nn.Module
    config: LanguageConfig
    tensors: dict[str, np.ndarray]
    params: dict
    rules: list[Rule]


def _hf_model(**extra: object) -> torch.nn.Module:
    model = transformers.OPTForCausalLM(transformers.OPTConfig(**(OPT | extra)))
    # HF initialises biases to zero and LayerNorms to identity: randomise so that every tensor matters.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # the tied head is the embedding: visited once
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


def _expected_shapes(config: LanguageConfig) -> dict[str, tuple[int, ...]]:
    def init(module: Decoder, tokens: jax.Array) -> jax.Array:
        # An untied head never reads the embedding table in `__call__`: embed the tokens too.
        attention = causal_mask(jnp.ones(tokens.shape, bool), jnp.arange(tokens.shape[1]))
        return module(module.embed_tokens(tokens), jnp.zeros_like(tokens), attention)

    tokens = jax.ShapeDtypeStruct((1, 2), np.int32)
    shapes = jax.eval_shape(functools.partial(Decoder(config).init, method=init), jax.random.key(0), tokens)["params"]
    return {f"language/{k}": tuple(v.shape) for k, v in tree.flatten(shapes).items()}


def _checkpoint(directory: pathlib.Path, tied: bool) -> Checkpoint:
    model = _hf_model(tie_word_embeddings=tied)
    tensors = saved_tensors(model, directory)
    config = language_config(model.config)
    rules = language_rules(config, prefix="")
    params = bare_language_params(rules, tensors, _expected_shapes(config))
    return Checkpoint(model, config, tensors, params, rules)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    """OPT as BLIP-2 uses it: head tied to the token embeddings."""
    return _checkpoint(tmp_path_factory.mktemp("opt"), tied=True)


def _inputs(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, OPT["vocab_size"], size=(BATCH, LENGTH)).astype(np.int32)
    mask = np.ones((BATCH, LENGTH), bool)
    mask[0, :PAD] = False
    tokens[~mask] = OPT["pad_token_id"]
    return tokens, mask


def _positions(valid: np.ndarray | jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)


@functools.partial(jax.jit, static_argnums=0)
def _forward(config: LanguageConfig, params: dict, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    model = Decoder(config)
    embeds = model.apply({"params": params}, tokens, method=Decoder.embed_tokens)
    attention = causal_mask(mask, jnp.arange(tokens.shape[1]))
    return model.apply({"params": params}, embeds, _positions(mask), attention)[0]


def _hf_logits(model: torch.nn.Module, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)))
    return out.logits.numpy()


def test_config_and_shapes(checkpoint: Checkpoint):
    cfg = checkpoint.config
    assert (cfg.arch, cfg.norm, cfg.resolved_gated_mlp, cfg.attention_bias, cfg.act, cfg.tie_embeddings) == (
        "opt", "layernorm", False, True, "relu", True)
    assert checkpoint.params["pos_embed"]["embedding"].shape == (OPT["max_position_embeddings"] + 2, OPT["hidden_size"])
    assert "lm_head" not in checkpoint.params


def _check_rules_and_export(checkpoint: Checkpoint) -> None:
    # Every saved tensor is read once (a tied head is not in the file), and every param comes from one.
    assert sorted(r.hf for r in checkpoint.rules) == sorted(checkpoint.tensors)
    assert {p for r in checkpoint.rules for p in r.ours} == {
        f"language/{k}" for k in tree.flatten(checkpoint.params)}
    flat = {f"language/{k}": v for k, v in tree.flatten(checkpoint.params).items()}
    exported = dict(to_hf(checkpoint.rules, flat))
    assert exported.keys() == checkpoint.tensors.keys()
    for name, value in exported.items():
        assert value.dtype == checkpoint.tensors[name].dtype, name
        np.testing.assert_array_equal(value, checkpoint.tensors[name], err_msg=name)


def _check_left_padded_logits(checkpoint: Checkpoint) -> None:
    tokens, mask = _inputs()
    ours = np.asarray(_forward(checkpoint.config, checkpoint.params, tokens, mask))
    expected = _hf_logits(checkpoint.model, tokens, mask)
    np.testing.assert_allclose(ours[mask], expected[mask], rtol=0, atol=1e-5)


def test_rules_cover_exactly_the_saved_tensors_and_export_is_bit_exact(checkpoint: Checkpoint):
    _check_rules_and_export(checkpoint)


def test_left_padded_logits_match_transformers(checkpoint: Checkpoint):
    _check_left_padded_logits(checkpoint)


def test_untied_head(tmp_path: pathlib.Path):
    checkpoint = _checkpoint(tmp_path, tied=False)
    assert not checkpoint.config.tie_embeddings and "lm_head" in checkpoint.params
    _check_rules_and_export(checkpoint)
    _check_left_padded_logits(checkpoint)


def test_block_by_block_equals_call(checkpoint: Checkpoint):
    # The way block-wise calibration runs the model: embed + positions, one block at a time, norm + tied head.
    cfg, params = checkpoint.config, checkpoint.params
    tokens, mask = _inputs()

    @jax.jit
    def staged(params: dict, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        model, variables = Decoder(cfg), {"params": params}
        positions, attention = _positions(mask), causal_mask(mask, jnp.arange(tokens.shape[1]))
        x = model.apply(variables, model.apply(variables, tokens, method=Decoder.embed_tokens), positions,
                        method=Decoder.add_positions)
        for i in range(cfg.depth):
            x = decoder_block(cfg).apply({"params": params[f"blocks_{i}"]}, x, attention, positions)[0]
        return model.apply(variables, x, method=lambda m, h: m.norm(h)) @ params["embed"]["embedding"].T

    np.testing.assert_allclose(np.asarray(staged(params, tokens, mask)),
                               np.asarray(_forward(cfg, params, tokens, mask)), rtol=0, atol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def _step(config: LanguageConfig, params: dict, token: jax.Array, position: jax.Array, valid: jax.Array,
          cache: list, index: jax.Array) -> tuple[jax.Array, list]:
    """One cached decoding step: `token` `[B]` at cache slot `index`."""
    model = Decoder(config)
    embeds = model.apply({"params": params}, token[:, None], method=Decoder.embed_tokens)
    attention = causal_mask(valid, jnp.reshape(index, (1,)))
    return model.apply({"params": params}, embeds, position[:, None], attention, cache, index)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _prefill(config: LanguageConfig, params: dict, tokens: jax.Array, mask: jax.Array, cache_length: int):
    model = Decoder(config)
    embeds = model.apply({"params": params}, tokens, method=Decoder.embed_tokens)
    valid = jnp.pad(mask, ((0, 0), (0, cache_length - tokens.shape[1])))
    attention = causal_mask(valid, jnp.arange(tokens.shape[1]))
    cache = init_cache(config, tokens.shape[0], cache_length)
    return model.apply({"params": params}, embeds, _positions(mask), attention, cache, 0)


def test_cached_decoding_equals_full_pass(checkpoint: Checkpoint):
    cfg, params = checkpoint.config, checkpoint.params
    tokens, mask = _inputs()
    prompt = 5
    full = np.asarray(_forward(cfg, params, tokens, mask))
    logits, cache = _prefill(cfg, params, tokens[:, :prompt], mask[:, :prompt], LENGTH + NEW)
    np.testing.assert_allclose(np.asarray(logits)[mask[:, :prompt]], full[:, :prompt][mask[:, :prompt]],
                               rtol=0, atol=1e-5)
    valid = np.pad(mask[:, :prompt], ((0, 0), (0, LENGTH + NEW - prompt)))
    positions = np.asarray(_positions(mask))
    for index in range(prompt, LENGTH):
        valid[:, index] = True
        logits, cache = _step(cfg, params, tokens[:, index], positions[:, index], valid, cache, index)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, index], rtol=0, atol=1e-5)


def test_greedy_generation_matches_transformers(checkpoint: Checkpoint):
    cfg, params = checkpoint.config, checkpoint.params
    tokens, mask = _inputs(seed=3)
    logits, cache = _prefill(cfg, params, tokens, mask, LENGTH + NEW)
    valid = np.pad(mask, ((0, 0), (0, NEW)))
    position = np.asarray(mask.sum(axis=1) - 1)
    token = np.asarray(jnp.argmax(logits[:, -1], axis=-1)).astype(np.int32)
    done = np.zeros(BATCH, bool)
    ours = []
    for index in range(LENGTH, LENGTH + NEW):
        ours.append(np.where(done, OPT["pad_token_id"], token))
        done |= token == OPT["eos_token_id"]
        valid[:, index] = True
        position = position + 1
        logits, cache = _step(cfg, params, token, position, valid, cache, index)
        token = np.asarray(jnp.argmax(logits[:, 0], axis=-1)).astype(np.int32)
    ours = np.stack(ours, axis=1)
    with torch.no_grad():
        out = checkpoint.model.generate(
            input_ids=torch.from_numpy(tokens.astype(np.int64)), attention_mask=torch.from_numpy(mask.astype(np.int64)),
            do_sample=False, num_beams=1, max_new_tokens=NEW)
    generated = out[:, LENGTH:].numpy()
    np.testing.assert_array_equal(ours[:, : generated.shape[1]], generated)


def test_blip2_names_are_the_plain_names_under_language_model(tmp_path: pathlib.Path):
    t = transformers
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    qformer = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = t.Blip2ForConditionalGeneration(t.Blip2Config(
        vision_config=vision, qformer_config=qformer, text_config=t.OPTConfig(**OPT).to_dict(), num_query_tokens=4))
    names = {k for k in saved_tensors(model, tmp_path) if k.startswith("language_model.")}
    rules = language_rules(language_config(model.config.text_config), prefix="language_model.")
    assert {r.hf for r in rules} == names


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"word_embed_proj_dim": 16}, "word_embed_proj_dim"),
        ({"do_layer_norm_before": False}, "do_layer_norm_before"),
        ({"activation_function": "tanh"}, "activation_function"),
        ({"layer_norm_elementwise_affine": False}, "layer_norm_elementwise_affine"),
    ],
)
def test_language_config_rejects_unsupported_settings(extra: dict, field: str):
    with pytest.raises(ValueError, match=f"text_config.{field}"):
        language_config(transformers.OPTConfig(**(OPT | extra)))
