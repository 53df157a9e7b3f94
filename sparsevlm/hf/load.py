"""Load HF LLaVA / BLIP-2 / InstructBLIP checkpoints into the Flax VLM, and export them back.

Loading reads `config.json` with `transformers`' config classes and the safetensors weights one
tensor at a time straight into our param tree (no PyTorch model, no second copy of the weights).
Export writes the merged params back under the names the source checkpoint used, with its
`config.json` and processor files, so `transformers`' `from_pretrained` loads the result.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import transformers

from sparsevlm.bundle import ModelBundle
from sparsevlm.config import ConnectorConfig, LanguageConfig, VLMConfig
from sparsevlm.data.prompts import family_format
from sparsevlm.hf import llama, vision
from sparsevlm.hf.processor import load_processor, processor_files, write_processor_files
from sparsevlm.hf.rules import UNUSED, Rule, linear_rules, to_hf, to_ours
from sparsevlm.hf.compressed import (
    BITMASK_MIN_SPARSITY, DENSE, QUANTIZATION_CONFIG, CompressedCheckpoint, CompressedWriter, open_checkpoint,
)
from sparsevlm.hf.safetensors_io import write_file
from sparsevlm.integrity import write_atomic
from sparsevlm.masks import masks_from_flat
from sparsevlm.tree import flatten, unflatten

PyTree = Any
MODEL_TYPES = ("llava", "blip-2", "instructblip")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# The HF modules the paper adapts with LoRA, per tower kind (`lora.TOWER_TARGETS` selects ours).
PAPER_LORA_MODULES = {
    "clip": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
    "blip_vit": {"qkv", "projection", "fc1", "fc2"},
    "mlp": {"linear_1", "linear_2"},
    "qformer": {"query", "key", "value", "dense"},
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
    "t5": {"q", "k", "v", "o", "wi_0", "wi_1", "wo"},
}


@dataclasses.dataclass(frozen=True)
class Naming:
    """Which prefixes a checkpoint's tensor names use (hub and transformers-v5 saves differ)."""

    vision: str
    connector: str
    language: str
    split_qv_bias: bool = False  # BLIP-2 ViT: hub `q_bias`/`v_bias` vs v5 fused `qkv.bias`


def _detect(keys: Iterable[str], candidates: tuple[str, ...], what: str, directory: Path) -> str:
    keys = list(keys)
    for prefix in candidates:
        if any(k.startswith(prefix) for k in keys):
            return prefix
    raise ValueError(f"{directory}: no {what} tensors found (looked for names starting with {', '.join(candidates)})")


def naming(model_type: str, keys: list[str], directory: Path) -> Naming:
    """The prefixes this checkpoint's names use."""
    if model_type == "llava":
        return Naming(
            vision=_detect(keys, ("vision_tower.vision_model.", "model.vision_tower.vision_model.",
                                  "vision_tower.", "model.vision_tower."), "vision", directory),
            connector=_detect(keys, ("multi_modal_projector.", "model.multi_modal_projector."), "projector", directory),
            language=_detect(keys, ("language_model.", "model.language_model."), "language", directory),
        )
    return Naming(
        vision=_detect(keys, ("vision_model.",), "vision", directory),
        connector="",
        language=_detect(keys, ("language_model.",), "language", directory),
        split_qv_bias=any(k.endswith(".self_attn.q_bias") for k in keys),
    )


def _language_module(model_type: str) -> Any:
    if model_type == "llama":
        return llama
    if model_type == "opt":
        from sparsevlm.hf import opt

        return opt
    if model_type == "t5":
        from sparsevlm.hf import t5

        return t5
    raise ValueError(f"text_config.model_type={model_type!r} is not supported; allowed: llama, opt, t5")


def _llava_language_rules(config: LanguageConfig, names: Naming) -> list[Rule]:
    rules = llama.language_rules(config, "language_model.")
    if names.language == "model.language_model.":  # v5 in-memory names: no inner `model.`, head at the root
        rules = [dataclasses.replace(r, hf=r.hf.replace("language_model.model.", "model.language_model.")
                                     .replace("language_model.lm_head.", "lm_head.")) for r in rules]
    return rules


def vlm_config(hf_config: Any, image_mean: Any, image_std: Any) -> VLMConfig:
    """An HF VLM config as our `VLMConfig`; a clear error for anything unsupported."""
    text = hf_config.text_config
    language = _language_module(text.model_type).language_config(text)
    if hf_config.model_type == "llava":
        if not getattr(hf_config, "multimodal_projector_bias", True):
            raise ValueError("multimodal_projector_bias=False is not supported")
        act = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}.get(hf_config.projector_hidden_act)
        if act is None:
            raise ValueError(f"projector_hidden_act={hf_config.projector_hidden_act!r} is not supported")
        return VLMConfig(
            vision=vision.clip_config(hf_config.vision_config, hf_config.vision_feature_layer,
                                      hf_config.vision_feature_select_strategy, image_mean, image_std),
            connector=ConnectorConfig(kind="mlp", hidden_dim=text.hidden_size, act=act),
            language=language,
            family="llava",
            image_token_id=int(hf_config.image_token_id),
        )
    from sparsevlm.hf import qformer

    return VLMConfig(
        vision=vision.blip_config(hf_config.vision_config, image_mean, image_std),
        connector=qformer.connector_config(hf_config),
        language=language,
        family="blip2" if hf_config.model_type == "blip-2" else "instructblip",
        image_token_id=int(hf_config.image_token_id if getattr(hf_config, "image_token_id", None) is not None
                           else hf_config.image_token_index),
    )


def conversion_rules(config: VLMConfig, text_model_type: str, names: Naming) -> list[Rule]:
    """Every HF tensor of this model ↔ our paths."""
    if config.family == "llava":
        return [
            *vision.clip_rules(config.vision, names.vision),
            *linear_rules(f"{names.connector}linear_1", "connector/up"),
            *linear_rules(f"{names.connector}linear_2", "connector/down"),
            *_llava_language_rules(config.language, names),
        ]
    from sparsevlm.hf import qformer

    return [
        *vision.blip_rules(config.vision, names.vision, names.split_qv_bias),
        *qformer.connector_rules(config.connector),
        *_language_module(text_model_type).language_rules(config.language, names.language),
    ]


def expected_shapes(config: VLMConfig) -> dict[str, tuple[int, ...]]:
    """Our param shapes for a config, without allocating them."""
    from sparsevlm.models.vlm import VLM

    model = VLM(config)
    size, tokens = config.vision.image_size, jnp.zeros((1, 4), jnp.int32)
    instruction = (jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool)) if config.connector.reads_text else None
    images = jnp.zeros((1, size, size, config.vision.num_channels))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, tokens, jnp.ones((1, 4), bool),
                                               None, instruction))
    return {path: tuple(leaf.shape) for path, leaf in flatten(shapes["params"]).items()}


def _read_config(directory: Path) -> tuple[dict[str, Any], Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{path}: model_type={model_type!r} is not supported; allowed: {', '.join(MODEL_TYPES)}")
    # The config class for this model_type from transformers itself (never remote code).
    try:
        return raw, transformers.AutoConfig.for_model(**raw)
    except Exception as err:  # ValueError, KeyError or huggingface_hub's validation errors (not ValueErrors)
        detail = " ".join(str(err).split())  # one line: the CLI prints errors as a single line
        detail = detail if len(detail) <= 300 else f"{detail[:300]}..."
        raise ValueError(f"{path}: transformers rejects this config: {detail}") from err


def load_hf_model(directory: str | os.PathLike, dtype: str = "float32") -> ModelBundle:
    """A local HF checkpoint directory as a `ModelBundle` (params in `dtype`: float32 or bfloat16)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    directory = Path(directory)
    raw, hf_config = _read_config(directory)
    checkpoint = open_checkpoint(directory)  # a compressed export reads back as its dense tensors
    processor = load_processor(directory)
    image_processor = processor.image_processor
    try:
        config = vlm_config(hf_config, image_processor.image_mean, image_processor.image_std)
    except ValueError as err:
        raise ValueError(f"{directory / 'config.json'}: {err}") from None
    _check_image_size(config, image_processor)
    names = naming(hf_config.model_type, checkpoint.keys(), directory)
    rules = conversion_rules(config, hf_config.text_config.model_type, names)
    expected = expected_shapes(config)
    flat = _convert(rules, checkpoint, expected, DTYPES[dtype], directory)
    masks = _stored_masks(rules, checkpoint, flat) if isinstance(checkpoint, CompressedCheckpoint) else None
    fmt = family_format(config.family, config.image_token_id, config.num_image_tokens,
                        encoder_decoder=config.language.arch == "t5")
    metadata = {"prompt_format": dataclasses.asdict(fmt), "hf": {"config": raw, "naming": dataclasses.asdict(names),
                       "text_model_type": hf_config.text_config.model_type, "source": str(directory.resolve()),
                       "processor_files": processor_files(processor)}}
    params = unflatten(flat)
    return ModelBundle(config, params, processor.tokenizer, metadata, processor=processor,
                       masks=None if masks is None else masks_from_flat(params, masks))


def _stored_masks(rules: list[Rule], checkpoint: CompressedCheckpoint, flat: dict[str, np.ndarray]) -> dict:
    """Masks of a compressed checkpoint's sparse weights, from their stored bitmasks (in our layout and paths)."""
    masks = {}
    for r in rules:
        if r.layout == "linear" and checkpoint.format(r.hf) != DENSE:
            kept = checkpoint.kept(r.hf).T
            for path, part in zip(r.ours, np.split(kept, len(r.ours), axis=-1)):
                if path in flat and not path.startswith(f"{UNUSED}/"):
                    masks[path] = np.ascontiguousarray(part)
    return masks


def _check_image_size(config: VLMConfig, image_processor: Any) -> None:
    size = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", False) else None
    size = size or getattr(image_processor, "size", None)
    side = None
    for key in ("height", "shortest_edge"):
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if value is not None and side is None:
            side = value
    if side is not None and int(side) != config.vision.image_size:
        raise ValueError(
            f"the processor makes {side}px images but vision_config.image_size is {config.vision.image_size}"
        )


def _convert(
    rules: list[Rule], checkpoint: Any, expected: dict[str, tuple[int, ...]], dtype: np.dtype, directory: Path
) -> dict[str, np.ndarray]:
    covered = {r.hf for r in rules if r.layout != "zeros"}
    unexpected = sorted(set(checkpoint.keys()) - covered)
    if unexpected:
        raise ValueError(
            f"{checkpoint.where(unexpected[0])} holds tensor {unexpected[0]!r} that this config.json does not "
            f"describe ({len(unexpected)} such tensors): the weights and config do not match"
        )

    # `to_ours` transposes linear kernels: read them column-major, so the transpose is a view rather
    # than a second copy (otherwise the largest of them, often the LM head, is held twice at once).
    # A tensor some other rule also reads (untransposed) stays row-major.
    transposed = {r.hf for r in rules if r.layout == "linear"} - {r.hf for r in rules if r.layout != "linear"}

    def read(name: str) -> np.ndarray:
        if name not in checkpoint:
            raise ValueError(f"tensor {name!r} that config.json implies is missing from the checkpoint at {directory}")
        return checkpoint.read(name, order="F" if name in transposed else "C")

    flat = dict(to_ours(rules, read, expected, dtype, checkpoint.where))
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise ValueError(f"no checkpoint tensor provides {missing[0]!r} ({len(missing)} params missing)")
    return flat


def _rules_for(bundle: ModelBundle) -> list[Rule]:
    hf = bundle.metadata.get("hf")
    if not hf:
        raise ValueError("this model was not loaded from a Hugging Face checkpoint; nothing to export in HF format")
    return conversion_rules(bundle.config, hf["text_model_type"], Naming(**hf["naming"]))


def export_hf(bundle: ModelBundle, out_dir: str | os.PathLike, dtype: str | None = None) -> Path:
    """Write `model.safetensors`, `config.json` and the processor files of an HF-loaded model to `out_dir`."""
    return _export_hf(bundle, Path(out_dir), dtype, None)


def export_hf_compressed(bundle: ModelBundle, out_dir: str | os.PathLike, dtype: str | None = None,
                         min_sparsity: float = BITMASK_MIN_SPARSITY) -> dict[str, Any]:
    """`export_hf` with every pruned linear written 2:4, bitmask or dense by its zeros; the formats chosen.

    `config.json` carries the `sparsity_config` (`sparsevlm.hf.compressed`); a model without masks is refused.
    """
    writer = CompressedWriter(pruned_hf_names(_rules_for(bundle), bundle.masks), min_sparsity)
    _export_hf(bundle, Path(out_dir), dtype, writer)
    return writer.report()


def _export_hf(bundle: ModelBundle, out_dir: Path, dtype: str | None, writer: CompressedWriter | None) -> Path:
    rules = _rules_for(bundle)
    flat = flatten(jax.device_get(bundle.params))
    target = None if dtype is None else DTYPES[dtype]

    def tensors() -> Iterable[tuple[str, np.ndarray]]:
        for name, value in to_hf(rules, flat):
            yield name, value if target is None or name.startswith(UNUSED) else value.astype(target)

    if writer is None:
        specs, stream, metadata = {n: (v.dtype, v.shape) for n, v in tensors()}, tensors(), {}
    else:
        specs, metadata = writer.plan(tensors()), writer.metadata()
        stream = writer.tensors(tensors())
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "model.safetensors",
                 lambda tmp: write_file(tmp, specs, stream, metadata={"format": "pt", **metadata}))
    hf = bundle.metadata["hf"]
    config = {k: v for k, v in hf["config"].items() if k != QUANTIZATION_CONFIG}  # a compressed source's claim
    if dtype is not None:
        config["dtype"] = dtype
    if writer is not None:
        from sparsevlm.hf.compressed import quantization_config

        config[QUANTIZATION_CONFIG] = quantization_config(writer.sparsity_config())
    write_atomic(out_dir / "config.json", json.dumps(config, indent=2))
    write_processor_files(out_dir, hf.get("processor_files", {}))
    return out_dir


def pruned_hf_names(rules: Iterable[Rule], masks: PyTree | None) -> list[str]:
    """The HF linear weights behind our masked kernels (a fused one counts if any of its parts is masked)."""
    if masks is None:
        raise ValueError("the model has no masks: compressed export writes the weights that pruning masked "
                         "(export a pruned or restored model, or use --format dense)")
    masked = {path for path, mask in flatten(masks).items() if mask is not None}
    return [r.hf for r in rules if r.layout == "linear" and masked & set(r.ours)]


def hf_modules(bundle: ModelBundle, paths: Iterable[str]) -> set[str]:
    """The HF module names (last component, e.g. `q_proj`) behind some of our kernel paths."""
    wanted = set(paths)
    return {r.hf.rsplit(".", 2)[-2] for r in _rules_for(bundle) if wanted & set(r.ours)}


__all__ = ["MODEL_TYPES", "export_hf", "export_hf_compressed", "pruned_hf_names", "expected_shapes", "hf_modules", "load_hf_model", "vlm_config"]
