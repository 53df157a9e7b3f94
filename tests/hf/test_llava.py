"""LLaVA from an HF checkpoint: logits and greedy generations equal transformers'; export loads back in PyTorch."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from sparsevlm.eval.generate import greedy_generate
from sparsevlm.hf.load import export_hf, load_hf_model
from sparsevlm.lora import LoraConfig, init_lora, merge
from sparsevlm.models.vlm import VLM
from sparsevlm.pruning import SparsitySpec, prune
from sparsevlm.tree import flatten
from tests.hf.tiny import random_image

PROMPTS = ["USER: <image> what color is the shape ? ASSISTANT:", "USER: <image> how many ? ASSISTANT:"]


def _inputs(processor, prompts=PROMPTS):
    processor.tokenizer.padding_side = "left"
    images = [random_image(i) for i in range(len(prompts))]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def _ours(bundle, inputs, params=None):
    images = np.transpose(inputs["pixel_values"].numpy(), (0, 2, 3, 1))
    logits, _ = VLM(bundle.config).apply(
        {"params": bundle.params if params is None else params},
        images, inputs["input_ids"].numpy(), inputs["attention_mask"].numpy().astype(bool),
    )
    return np.asarray(logits)


def _theirs(model, inputs):
    # Positions counted over real tokens only, as generation does for left-padded rows.
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(**inputs, position_ids=positions).logits.numpy()


@pytest.fixture(scope="module")
def loaded(llava_dir):
    return load_hf_model(llava_dir), LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()


def test_config_follows_the_checkpoint(loaded):
    bundle, model = loaded
    config = bundle.config
    assert config.vision.feature_layer == -2 and config.vision.blocks_used == 2
    assert config.vision.drop_cls_token and config.vision.act == "quick_gelu"
    assert config.image_token_id == model.config.image_token_id
    # The unused last CLIP layer and post-norm are kept verbatim for export, not in the model.
    unused = [p for p in flatten(bundle.params) if p.startswith("unused/")]
    assert any("encoder.layers.2." in p for p in unused) and any("post_layernorm" in p for p in unused)


def test_logits_match_transformers_on_a_left_padded_batch(loaded):
    bundle, model = loaded
    inputs = _inputs(bundle.processor)
    assert (inputs["attention_mask"] == 0).any(), "the batch should exercise padding"
    mask = inputs["attention_mask"].numpy().astype(bool)
    error = np.abs(_ours(bundle, inputs) - _theirs(model, inputs))[mask].max()
    assert error <= 1e-4


def test_greedy_generation_matches_transformers(loaded):
    bundle, model = loaded
    tokenizer = bundle.tokenizer
    for prompt in PROMPTS:  # one row per call: HF's own padded generation is what we compare against
        inputs = _inputs(bundle.processor, [prompt])
        with torch.no_grad():
            want = model.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=1,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        want = want[0, inputs["input_ids"].shape[1]:].numpy()
        got = greedy_generate(
            VLM(bundle.config), bundle.params, np.transpose(inputs["pixel_values"].numpy(), (0, 2, 3, 1)),
            inputs["input_ids"].numpy(), inputs["attention_mask"].numpy().astype(bool),
            max_new_tokens=8, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
        )
        np.testing.assert_array_equal(np.asarray(got)[0, : len(want)], want)


def test_bfloat16_loading_halves_the_weights(llava_dir):
    bundle = load_hf_model(llava_dir, dtype="bfloat16")
    kernels = [v for p, v in flatten(bundle.params).items() if p.endswith("kernel")]
    assert all(str(k.dtype) == "bfloat16" for k in kernels)


@pytest.mark.slow
def test_prune_restore_export_round_trip(loaded, tmp_path):
    """Wanda 2:4 → a few SparseLoRA updates → export → transformers loads the same logits and zeros."""
    bundle, _ = loaded
    from sparsevlm.data.calibration import calibration_set
    from sparsevlm.data.prompts import bundle_format
    from sparsevlm.pruning.calibrate import calibration_carry

    data = calibration_set("shapes-captions", bundle.tokenizer, 8, image_size=bundle.config.vision.image_size,
                           fmt=bundle_format(bundle.metadata))
    calibration = calibration_carry(data, 8, bundle.tokenizer.pad_token_id, bundle.config.vision)
    spec = SparsitySpec.same(0.5, pattern="2:4")
    result = prune(bundle.params, bundle.config, spec, "wanda", calibration, key=jax.random.key(0))
    lora_config = LoraConfig()
    lora = init_lora(result.params, lora_config, jax.random.key(1))
    # Stand-in for training: non-zero B so the merge really changes the kept weights.
    lora = jax.tree.map(lambda x: x + 0.01, lora)
    merged = jax.device_get(merge(result.params, lora, result.masks, lora_config.alpha, "sparselora"))
    restored = dataclasses.replace(bundle, params=merged)
    out = export_hf(restored, tmp_path / "exported")
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    inputs = _inputs(bundle.processor)
    mask = inputs["attention_mask"].numpy().astype(bool)
    assert np.abs(_ours(restored, inputs) - _theirs(model, inputs))[mask].max() <= 1e-4
    state = model.state_dict()
    for path, keep in flatten(result.masks).items():
        if keep is not None:
            assert (np.asarray(flatten(merged)[path])[~np.asarray(keep)] == 0).all()
    down = state["model.language_model.layers.0.mlp.down_proj.weight"].numpy()  # [out, in]
    assert ((down.reshape(down.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
    fc1 = next(v for k, v in state.items() if k.endswith("encoder.layers.0.mlp.fc1.weight")).numpy()
    assert ((fc1.reshape(fc1.shape[0], -1, 4) == 0).sum(-1) >= 2).all()


def test_lora_targets_are_the_papers_modules(loaded):
    from sparsevlm.hf.load import PAPER_LORA_MODULES, hf_modules
    from sparsevlm.lora import lora_targets

    bundle, _ = loaded
    targets = lora_targets(bundle.params, LoraConfig.with_ranks(connector_kind=bundle.config.connector.kind))
    want = PAPER_LORA_MODULES["clip"] | PAPER_LORA_MODULES["mlp"] | PAPER_LORA_MODULES["llama"]
    assert hf_modules(bundle, targets) == want
    # Every layer the forward runs is adapted; the unused CLIP layer is not.
    assert not any(p.startswith("unused/") for p in targets)
