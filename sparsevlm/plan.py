"""A restoration step's per-device memory and compile time, from a model's config alone.

Nothing is allocated: params, masks, LoRA factors, optimizer state and the batch exist only as
shapes (`jax.eval_shape`), the step is compiled ahead of time for them on the mesh, and XLA's
memory analysis gives the temporaries. The config comes from a preset (`PRESETS`: the paper's
7B models), an HF checkpoint directory's `config.json` (weights need not be there), or one of our
exported directories' `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm.config import PLAN_PRESETS, RestoreConfig, VLMConfig

PyTree = Any
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _llava_1_5_7b() -> Any:
    """LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (second-to-last layer) + 2-layer GELU MLP + Vicuna-7B."""
    import transformers

    vision = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=336, patch_size=14,
                                           hidden_act="quick_gelu", projection_dim=768)
    text = transformers.LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                    rms_norm_eps=1e-5, tie_word_embeddings=False)
    return transformers.LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=32000,
                                    vision_feature_layer=-2, vision_feature_select_strategy="default",
                                    projector_hidden_act="gelu")


def _instructblip_vicuna_7b() -> Any:
    """InstructBLIP-Vicuna-7B: EVA ViT-g/14 at 224 px + 12-layer Q-Former (32 queries) reading the prompt + Vicuna-7B."""
    import transformers

    vision = transformers.InstructBlipVisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                                                   num_attention_heads=16, image_size=224, patch_size=14,
                                                   qkv_bias=True)
    qformer = transformers.InstructBlipQFormerConfig(vocab_size=30523, hidden_size=768, num_hidden_layers=12,
                                                     num_attention_heads=12, intermediate_size=3072,
                                                     cross_attention_frequency=2, encoder_hidden_size=1408)
    text = transformers.LlamaConfig(vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                                    rms_norm_eps=1e-6, tie_word_embeddings=False)
    return transformers.InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                           text_config=text.to_dict(), num_query_tokens=32, image_token_index=32000)


# Preset name → its HF config, built in code (no download), converted like any checkpoint's.
PRESETS: dict[str, Callable[[], Any]] = {
    "llava-1.5-7b": _llava_1_5_7b,
    "instructblip-vicuna-7b": _instructblip_vicuna_7b,
}
assert tuple(PRESETS) == PLAN_PRESETS


def plan_config(name_or_dir: str) -> VLMConfig:
    """The `VLMConfig` of a preset, an HF checkpoint directory or one of ours, from its config alone."""
    from sparsevlm.hf.load import MODEL_TYPES, vlm_config

    if name_or_dir in PRESETS:
        return vlm_config(PRESETS[name_or_dir](), CLIP_MEAN, CLIP_STD)
    path = Path(name_or_dir).expanduser() / "config.json"
    if not path.is_file():
        raise ValueError(f"--model {name_or_dir!r} is neither a preset ({', '.join(PRESETS)}) nor a directory with "
                         "a config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if raw.get("model_type") in MODEL_TYPES:
        import transformers

        try:
            hf_config = transformers.AutoConfig.for_model(**raw)
            return vlm_config(hf_config, CLIP_MEAN, CLIP_STD)
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{path}: cannot build this model: {' '.join(str(err).split())}") from None
    try:
        return VLMConfig.from_dict(raw)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{path}: not an HF VLM config (model_type one of {', '.join(MODEL_TYPES)}) nor ours: "
                         f"{' '.join(str(err).split())}") from None


def abstract_batch(config: VLMConfig, batch_size: int, seq_len: int) -> dict[str, Any]:
    """Shapes of a restoration batch whose language model sees `seq_len` positions (image tokens included)."""
    words = seq_len - config.num_image_tokens
    if words < 2:
        raise ValueError(f"--seq-len {seq_len} leaves {words} text positions after the {config.num_image_tokens} image "
                         "tokens; it must leave at least 2")
    # Image tokens replace placeholder tokens in the text (LLaVA, HF BLIP) or go before it.
    text = seq_len if config.image_token_id is not None else words
    size = config.vision.image_size
    spec = jax.ShapeDtypeStruct
    batch = {"images": spec((batch_size, size, size, config.vision.num_channels), jnp.float32),
             "tokens": spec((batch_size, text), jnp.int32), "text_mask": spec((batch_size, text), jnp.bool_),
             "loss_mask": spec((batch_size, text), jnp.bool_), "instruction_tokens": None, "instruction_mask": None,
             "segments": None}
    if config.connector.reads_text:
        batch |= {"instruction_tokens": spec((batch_size, 32), jnp.int32),
                  "instruction_mask": spec((batch_size, 32), jnp.bool_)}
    return batch


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """A restoration step for a config, before anything is allocated: how to build its inputs, their
    shapes and shardings on the mesh, and the jitted step."""

    build: Callable[[], tuple[PyTree, PyTree, PyTree]]  # () -> (params, packed masks, TrainState): random init
    params: PyTree  # abstract (ShapeDtypeStruct) trees from here on
    masks: PyTree
    state: PyTree
    batch: dict[str, Any]
    shardings: Any  # sharding.StepShardings
    step: Callable[..., Any]
    mesh: Any


def restoration_setup(
    config: VLMConfig, restore: RestoreConfig, batch_size: int, seq_len: int, mesh: Any = None,
    param_dtype: str = "bfloat16",
) -> StepSetup:
    """`restore`'s step for `config` on `mesh` (all local devices; None: one device), from shapes alone."""
    from sparsevlm import sharding
    from sparsevlm.lora import init_lora
    from sparsevlm.masks import is_prunable
    from sparsevlm.models.vlm import VLM, scan_stacks
    from sparsevlm.restoration import step_inputs
    from sparsevlm.train import TrainState, make_optimizer, make_train_step, restoration_loss
    from sparsevlm.tree import flatten, unflatten

    if param_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"param dtype {param_dtype!r} is not supported; allowed: bfloat16, float32")
    devices = jax.devices()[:1] if mesh is None else jax.devices()
    device_mesh = sharding.make_mesh(mesh or "data=1", devices)
    batch = abstract_batch(config, batch_size, seq_len)
    optimizer = make_optimizer(restore.learning_rate, restore.end_learning_rate, restore.warmup_steps, restore.steps,
                               restore.weight_decay, restore.grad_clip, restore.grad_accum)
    stacks = scan_stacks(config) if restore.scan_layers else {}
    size = config.vision.image_size
    instruction = ((jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool)) if config.connector.reads_text else None)

    def build() -> tuple[PyTree, PyTree, PyTree]:
        params = VLM(config).init(jax.random.key(0), jnp.zeros((1, size, size, config.vision.num_channels)),
                                  jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool), None, instruction)["params"]
        params = jax.tree.map(lambda x: x.astype(param_dtype), params)
        # Every prunable kernel masked (both towers and the connector pruned), half its weights kept.
        masks = unflatten({p: jax.random.bernoulli(jax.random.key(i), 0.5, v.shape) if is_prunable(p, v) else None
                           for i, (p, v) in enumerate(flatten(params).items())})
        lora = init_lora(params, restore.lora, jax.random.key(0))
        params, packed, lora = step_inputs(params, masks, lora, stacks)
        return params, packed, TrainState(lora, optimizer.init(lora), jnp.zeros((), jnp.int32))

    params, masks, state = jax.eval_shape(build)
    shardings = sharding.restore_shardings(device_mesh, optimizer, state, params, masks, batch)
    model = VLM(config, jnp.bfloat16 if restore.bf16 else jnp.float32, restore.scan_layers, restore.remat)
    step = make_train_step(restoration_loss(model, restore.lora.alpha, restore.method, restore.kl_weight,
                                            restore.temperature), optimizer, shardings)
    return StepSetup(build, params, masks, state, batch, shardings, step, device_mesh)


def plan_restoration(
    config: VLMConfig,
    restore: RestoreConfig,
    batch_size: int,
    seq_len: int,
    mesh: Any = None,
    param_dtype: str = "bfloat16",
) -> dict[str, Any]:
    """Per-device bytes (params, masks, LoRA, optimizer, batch, XLA's temporaries, total) and the compile
    seconds of `restore`'s step for `config`, on `mesh` (all local devices; None: one device)."""
    from sparsevlm import sharding

    setup = restoration_setup(config, restore, batch_size, seq_len, mesh, param_dtype)
    start = time.perf_counter()
    compiled = sharding.compile_step(setup.step, (setup.state, setup.batch, setup.params, setup.masks),
                                     (setup.shardings.state, *setup.shardings.inputs))
    seconds = time.perf_counter() - start
    memory = sharding.restore_memory(compiled, setup.shardings, setup.state, setup.params, setup.masks, setup.batch)
    return {
        "model": {"family": config.family, "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(setup.params)))},
        "batch_size": batch_size, "seq_len": seq_len, "mesh": dict(setup.mesh.shape),
        "devices": int(setup.mesh.devices.size), "device": jax.devices()[0].device_kind, "param_dtype": param_dtype,
        "restore": {k: v for k, v in dataclasses.asdict(restore).items()
                    if k in ("method", "kl_weight", "bf16", "remat", "scan_layers")},
        "per_device_bytes": memory | {"total": memory["step_total"]},
        "compile_seconds": round(seconds, 2),
        "flops": _flops(compiled),
    }


def _flops(compiled: Any) -> float | None:
    """XLA's FLOP count of a compiled step (None where the backend gives none)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    flops = analysis.get("flops") if analysis else None
    return None if flops is None else float(flops)


def format_plan(report: Mapping[str, Any]) -> str:
    """The plan as a short table, GiB per device."""
    lines = [f"restoration step plan: {report['model']['family']} ({report['model']['params'] / 1e9:.2f}B params, "
             f"{report['param_dtype']}), batch {report['batch_size']} × {report['seq_len']} positions, "
             f"mesh {report['mesh']} on {report['devices']} × {report['device']}"]
    names = ("params", "masks", "lora", "optimizer", "batch", "temporaries", "total")
    for name in names:
        lines.append(f"  {name:<12}{report['per_device_bytes'][name] / 2**30:>10.3f} GiB per device")
    lines.append(f"  compile     {report['compile_seconds']:>10.1f} s")
    return "\n".join(lines)
