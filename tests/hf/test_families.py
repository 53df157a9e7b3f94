"""HF LLaVA, BLIP-2 and InstructBLIP in Flax: logits and greedy generations equal transformers'; export loads back."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers

from sparsevlm.config import LoraConfig, SparsitySpec
from sparsevlm.eval.generate import compiled_generate
from sparsevlm.hf.load import PAPER_LORA_MODULES, export_hf, hf_modules, load_hf_model
from sparsevlm.lora import init_lora, lora_targets, merge
from sparsevlm.models.stages import stack_layers
from sparsevlm.models.vlm import VLM, scan_stacks
from sparsevlm.pruning import prune
from sparsevlm.tree import flatten
from tests.hf.tiny import FAMILIES, random_image

TARGETS = np.array([[7, 8, 9], [10, 11, 12]])  # decoder targets for the encoder-decoder (T5) families


def _inputs(processor, prompts):
    processor.tokenizer.padding_side = "left"
    images = [random_image(i) for i in range(len(prompts))]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def _arrays(inputs):
    instruction = None
    if "qformer_input_ids" in inputs:
        instruction = (inputs["qformer_input_ids"].numpy(), inputs["qformer_attention_mask"].numpy().astype(bool))
    images = np.transpose(inputs["pixel_values"].numpy(), (0, 2, 3, 1))
    return images, inputs["input_ids"].numpy(), inputs["attention_mask"].numpy().astype(bool), instruction


def _is_t5(bundle) -> bool:
    return bundle.config.language.arch == "t5"


def _ours(bundle, inputs, params=None):
    """Our logits at the positions HF returns them for (T5: the decoder's, start token first)."""
    images, tokens, mask, instruction = _arrays(inputs)
    target = None
    if _is_t5(bundle):  # [prompt | targets] rows; the start token sits at the last prompt position
        tokens = np.concatenate([tokens, TARGETS[: len(tokens)]], axis=1)
        mask = np.concatenate([mask, np.ones(TARGETS[: len(mask)].shape, bool)], axis=1)
        target = np.zeros(tokens.shape, bool)
        target[:, -TARGETS.shape[1]:] = True
    # One compiled program per family (eager op-by-op dispatch compiles hundreds of small ones).
    logits, _ = jax.jit(VLM(bundle.config).apply)(
        {"params": bundle.params if params is None else params}, images, tokens, mask, None, instruction, target
    )
    logits = np.asarray(logits)
    return logits[:, -TARGETS.shape[1] - 1:] if _is_t5(bundle) else logits


def _mask(bundle, inputs):
    """Positions to compare: real prompt tokens, or every decoder position."""
    if _is_t5(bundle):
        return np.ones((len(inputs["input_ids"]), TARGETS.shape[1] + 1), bool)
    return inputs["attention_mask"].numpy().astype(bool)


def _theirs(model, inputs):
    kwargs = dict(inputs)
    if model.config.text_config.model_type == "t5":
        start = np.full((len(inputs["input_ids"]), 1), model.config.text_config.decoder_start_token_id)
        kwargs["decoder_input_ids"] = torch.tensor(np.concatenate([start, TARGETS[: len(start)]], axis=1))
    if model.config.text_config.model_type == "llama":
        # Positions over real tokens only, as generation counts them for left-padded rows (OPT does this itself).
        kwargs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(**kwargs).logits.numpy()


def test_logits_match_transformers_on_a_left_padded_batch(family):
    name, bundle, model = family
    inputs = _inputs(bundle.processor, FAMILIES[name][1])
    assert (inputs["attention_mask"] == 0).any(), "the batch should exercise padding"
    assert np.abs(_ours(bundle, inputs) - _theirs(model, inputs))[_mask(bundle, inputs)].max() <= 1e-4


def test_greedy_generation_matches_transformers(family):
    name, bundle, model = family
    tokenizer = bundle.tokenizer
    for prompt in FAMILIES[name][1]:
        inputs = _inputs(bundle.processor, [prompt])
        with torch.no_grad():
            want = model.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=1,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        # Decoder-only models return the prompt too; T5 returns the decoder's start token first.
        want = want[0, 1:].numpy() if _is_t5(bundle) else want[0, inputs["input_ids"].shape[1]:].numpy()
        images, tokens, mask, instruction = _arrays(inputs)
        generate = compiled_generate(VLM(bundle.config), 8, tokenizer.eos_token_id, tokenizer.pad_token_id)
        got = generate(bundle.params, images, tokens, mask, instruction=instruction)
        assert len(want) > 0
        np.testing.assert_array_equal(np.asarray(got)[0, : len(want)], want)


def test_lora_targets_are_the_papers_modules(family):
    name, bundle, _ = family
    targets = lora_targets(bundle.params, LoraConfig())
    want = set().union(*(PAPER_LORA_MODULES[kind] for kind in FAMILIES[name][2]))
    assert hf_modules(bundle, targets) == want
    assert not any(p.startswith("unused/") for p in targets)


def test_llava_config_follows_the_checkpoint(hf_dirs):
    bundle = load_hf_model(hf_dirs("llava-llama"))
    vision = bundle.config.vision
    assert vision.feature_layer == -2 and vision.blocks_used == 2 and vision.drop_cls_token
    # The unused last CLIP layer and post-norm are kept verbatim for export, not in the model.
    unused = [p for p in flatten(bundle.params) if p.startswith("unused/")]
    assert any("encoder.layers.2." in p for p in unused) and any("post_layernorm" in p for p in unused)


def test_bfloat16_loading(hf_dirs):
    bundle = load_hf_model(hf_dirs("llava-llama"), dtype="bfloat16")
    kernels = [v for p, v in flatten(bundle.params).items() if p.endswith("kernel")]
    assert kernels and all(str(k.dtype) == "bfloat16" for k in kernels)


@pytest.mark.slow
def test_prune_merge_export_round_trip(family, tmp_path):
    """Wanda 2:4 → SparseLoRA merge → export → transformers loads the same logits and keeps the zeros."""
    name, bundle, _ = family
    from sparsevlm.data.examples import load_examples
    from sparsevlm.data.prompts import bundle_format
    from sparsevlm.pruning.calibrate import calibration_carry

    data = load_examples("shapes-captions", bundle.tokenizer, 8, image_size=bundle.config.vision.image_size,
                           fmt=bundle_format(bundle.metadata), instruction_tokenizer=bundle.instruction_tokenizer)
    calibration = calibration_carry(data, 8, bundle.tokenizer.pad_token_id, bundle.config.vision)
    result = prune(bundle.params, bundle.config, SparsitySpec.same(0.5, pattern="2:4"), "wanda", calibration,
                   key=jax.random.key(0))
    lora_config = LoraConfig()
    # Stand-in for training: non-zero factors, so the merge really changes the kept weights.
    lora = jax.tree.map(lambda x: x + 0.01, init_lora(result.params, lora_config, jax.random.key(1)))
    merged = jax.device_get(jax.jit(merge, static_argnums=(3, 4))(result.params, lora, result.masks,
                                                                   lora_config.alpha, "sparselora"))
    restored = dataclasses.replace(bundle, params=merged)
    out = export_hf(restored, tmp_path / "exported")
    model = getattr(transformers, FAMILIES[name][0]).from_pretrained(out).eval()
    inputs = _inputs(bundle.processor, FAMILIES[name][1])
    assert np.abs(_ours(restored, inputs) - _theirs(model, inputs))[_mask(bundle, inputs)].max() <= 1e-4
    flat = flatten(merged)
    for path, keep in flatten(result.masks).items():
        if keep is not None:
            assert (np.asarray(flat[path])[~np.asarray(keep)] == 0).all(), path
    # The zeros are in the PyTorch weights too: every group of 4 inputs has at least 2.
    unused = [p.split("/", 1)[1] for p in flat if p.startswith("unused/")]  # never run, never pruned
    pruned_hf = [v.numpy() for k, v in model.state_dict().items()
                 if k.endswith(("fc1.weight", "down_proj.weight", "DenseReluDense.wo.weight"))
                 and not any(k.endswith(u) for u in unused)]
    assert pruned_hf
    for weight in pruned_hf:
        assert ((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all()


def test_scanned_blocks_give_the_same_logits(family):
    """Every family's block stacks (ViT, Llama/OPT, T5 encoder and decoder) scanned: the same logits."""
    name, bundle, _ = family
    inputs = _inputs(bundle.processor, FAMILIES[name][1])
    stacks = scan_stacks(bundle.config)
    assert {"vision/blocks"} <= set(stacks) and not any(s.startswith("connector") for s in stacks)
    images, tokens, mask, instruction = _arrays(inputs)
    target = np.zeros(tokens.shape, bool)
    target[:, -1] = True
    args = (images, tokens, mask, None, instruction, target)
    want, _ = jax.jit(VLM(bundle.config).apply)({"params": bundle.params}, *args)
    got, _ = jax.jit(VLM(bundle.config, scan_layers=True, remat="block").apply)(
        {"params": stack_layers(bundle.params, stacks)}, *args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
