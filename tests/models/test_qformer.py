"""The Q-Former connector against the `transformers` BLIP-2 / InstructBLIP Q-Former, via the HF name rules."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Callable

import jax
import numpy as np
import pytest
import safetensors

from sparsevlm import tree
from sparsevlm.config import ConnectorConfig
from sparsevlm.hf.qformer import connector_config, connector_rules
from sparsevlm.hf.rules import to_hf, to_ours
from sparsevlm.models.qformer import QFormer, qformer_block

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PREFIXES = ("query_tokens", "qformer.", "language_projection.")
BATCH, IMAGE_TOKENS, VISION_WIDTH, TEXT_LEN = 2, 7, 16, 6


@dataclasses.dataclass
class Checkpoint:
    """A tiny random HF model, its saved connector tensors and our converted params."""

    model: torch.nn.Module
    config: ConnectorConfig
    tensors: dict[str, np.ndarray]
    params: dict
    rules: list
    language_width: int
    forward: Callable  # our QFormer's jitted `apply`


def _hf_model(family: str) -> torch.nn.Module:
    t = transformers
    vision = dict(hidden_size=VISION_WIDTH, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    # Three layers with frequency 2: cross-attention in layers 0 and 2, not in 1.
    qformer = dict(vocab_size=50, hidden_size=24, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
                   max_position_embeddings=20, cross_attention_frequency=2)
    text = t.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       max_position_embeddings=32, word_embed_proj_dim=16).to_dict()
    if family == "blip2":
        config = t.Blip2Config(vision_config=t.Blip2VisionConfig(**vision).to_dict(),
                               qformer_config=t.Blip2QFormerConfig(**qformer).to_dict(),
                               text_config=text, num_query_tokens=5)
        model = t.Blip2ForConditionalGeneration(config)
    else:
        config = t.InstructBlipConfig(vision_config=t.InstructBlipVisionConfig(**vision).to_dict(),
                                      qformer_config=t.InstructBlipQFormerConfig(**qformer).to_dict(),
                                      text_config=text, num_query_tokens=5)
        model = t.InstructBlipForConditionalGeneration(config)
    # HF initialises query tokens to zero and norms to identity: randomise so that every tensor matters.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(PREFIXES):
                centre = 1.0 if name.lower().endswith("layernorm.weight") else 0.0
                p.copy_(centre + 0.2 * torch.randn(p.shape, generator=generator))
    return model.eval()


def _saved_connector_tensors(model: torch.nn.Module, directory: pathlib.Path) -> dict[str, np.ndarray]:
    model.save_pretrained(directory)
    with safetensors.safe_open(str(directory / "model.safetensors"), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(PREFIXES)}


def _expected_shapes(model: QFormer) -> dict[str, tuple[int, ...]]:
    # Init without text: InstructBLIP's text embeddings and text FFNs must be created all the same.
    features = jax.ShapeDtypeStruct((1, IMAGE_TOKENS, VISION_WIDTH), np.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), features)["params"]
    return {f"connector/{k}": tuple(v.shape) for k, v in tree.flatten(shapes).items()}


@pytest.fixture(scope="module", params=["blip2", "instructblip"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    model = _hf_model(request.param)
    tensors = _saved_connector_tensors(model, tmp_path_factory.mktemp(request.param))
    config = connector_config(model.config)
    language_width = model.config.text_config.hidden_size
    ours = QFormer(config, language_width)
    rules = connector_rules(config)
    flat = dict(to_ours(rules, tensors.__getitem__, _expected_shapes(ours), np.float32))
    params = tree.unflatten({k.removeprefix("connector/"): v for k, v in flat.items()})
    # One compiled forward per family: op-by-op dispatch would compile every op on its own, far slower.
    return Checkpoint(model, config, tensors, params, rules, language_width, jax.jit(ours.apply))


def _inputs(config: ConnectorConfig) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    rng = np.random.default_rng(1)
    features = rng.normal(size=(BATCH, IMAGE_TOKENS, VISION_WIDTH)).astype(np.float32)
    if not config.reads_text:
        return features, None, None
    tokens = rng.integers(1, config.text_vocab_size, size=(BATCH, TEXT_LEN))
    mask = np.ones((BATCH, TEXT_LEN), bool)
    mask[1, -2:] = False  # the second row is right-padded, as HF's BERT tokenizer pads
    tokens[~mask] = config.text_pad_id
    return features, tokens.astype(np.int32), mask


def _hf_reference(model: torch.nn.Module, features: np.ndarray, tokens: np.ndarray | None,
                  mask: np.ndarray | None) -> np.ndarray:
    queries = model.query_tokens.expand(features.shape[0], -1, -1)
    image = torch.from_numpy(features)
    with torch.no_grad():
        if tokens is None:
            out = model.qformer(query_embeds=queries, encoder_hidden_states=image)
        else:
            query_mask = torch.ones(queries.shape[:2], dtype=torch.long)
            attention_mask = torch.cat([query_mask, torch.from_numpy(mask.astype(np.int64))], dim=1)
            out = model.qformer(input_ids=torch.from_numpy(tokens.astype(np.int64)), attention_mask=attention_mask,
                                query_embeds=queries, encoder_hidden_states=image)
        return model.language_projection(out[0][:, : queries.shape[1]]).numpy()


def test_rules_cover_exactly_the_saved_tensors(checkpoint: Checkpoint):
    assert sorted(r.hf for r in checkpoint.rules) == sorted(checkpoint.tensors)
    ours = {p for r in checkpoint.rules for p in r.ours}
    assert ours == {f"connector/{k}" for k in tree.flatten(checkpoint.params)}


def test_export_reproduces_every_tensor_bit_for_bit(checkpoint: Checkpoint):
    flat = {f"connector/{k}": v for k, v in tree.flatten(checkpoint.params).items()}
    exported = dict(to_hf(checkpoint.rules, flat))
    assert exported.keys() == checkpoint.tensors.keys()
    for name, value in exported.items():
        assert value.dtype == checkpoint.tensors[name].dtype, name
        np.testing.assert_array_equal(value, checkpoint.tensors[name], err_msg=name)


def test_matches_transformers(checkpoint: Checkpoint):
    features, tokens, mask = _inputs(checkpoint.config)
    ours = checkpoint.forward({"params": checkpoint.params}, features, tokens, mask)
    expected = _hf_reference(checkpoint.model, features, tokens, mask)
    assert ours.shape == (BATCH, checkpoint.config.num_query_tokens, expected.shape[-1])
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=1e-5)


def test_block_by_block_equals_call(checkpoint: Checkpoint):
    cfg, params = checkpoint.config, checkpoint.params
    features, tokens, mask = _inputs(cfg)
    model = QFormer(cfg, checkpoint.language_width)
    embed = jax.jit(functools.partial(model.apply, method=QFormer.embed), static_argnums=3)
    head = jax.jit(functools.partial(model.apply, method=QFormer.head))
    x, self_mask = embed({"params": params}, tokens, mask, BATCH)
    # One compiled function per block structure (with / without cross-attention), as a calibration driver would.
    compiled: dict[bool, Callable] = {}
    for i in range(cfg.depth):
        block = qformer_block(cfg, i)
        fn = compiled.setdefault(block.has_cross_attention, jax.jit(block.apply, static_argnums=4))
        x = fn({"params": params[f"blocks_{i}"]}, x, self_mask, features, cfg.num_query_tokens)
    staged = head({"params": params}, x)
    whole = checkpoint.forward({"params": params}, features, tokens, mask)
    # Compiled separately: XLA may fuse and order the float ops differently.
    np.testing.assert_allclose(np.asarray(staged), np.asarray(whole), rtol=0, atol=1e-5)


def test_padded_text_is_invisible_to_the_queries(checkpoint: Checkpoint):
    if not checkpoint.config.reads_text:
        pytest.skip("BLIP-2's Q-Former reads no text")
    features, tokens, mask = _inputs(checkpoint.config)
    # Both rows: the same image and real tokens, different token ids at the two padded positions.
    features = np.repeat(features[:1], BATCH, axis=0)
    tokens = np.repeat(tokens[:1], BATCH, axis=0)
    tokens[1, -2:] = [3, 4]
    mask = np.repeat(mask[1:], BATCH, axis=0)
    out = np.asarray(checkpoint.forward({"params": checkpoint.params}, features, tokens, mask))
    np.testing.assert_allclose(out[0], out[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("family", "extra", "field"),
    [
        ("blip2", {"use_qformer_text_input": True}, "use_qformer_text_input"),
        ("blip2", {"hidden_act": "tanh"}, "hidden_act"),
        ("instructblip", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ],
)
def test_connector_config_rejects_unsupported_settings(family: str, extra: dict, field: str):
    t = transformers
    if family == "blip2":
        config = t.Blip2Config(qformer_config=extra)
    else:
        config = t.InstructBlipConfig(qformer_config=extra)
    with pytest.raises(ValueError, match=f"qformer_config.{field}"):
        connector_config(config)
