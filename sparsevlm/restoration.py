"""Restoration: LoRA or SparseLoRA factors trained on a pruned model, distilled from the dense teacher."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from transformers import PreTrainedTokenizerBase

from sparsevlm import sharding, trainer
from sparsevlm.checkpoint import TrainingCheckpoints
from sparsevlm.config import RestoreConfig, VLMConfig
from sparsevlm.data.batch import BatchStream, round_up
from sparsevlm.data.examples import EncodedSet, load_examples
from sparsevlm.data.prompts import BUILTIN, PromptFormat
from sparsevlm.lora import init_lora, lora_param_count, merge
from sparsevlm.masks import check_masks, flat_masks, mask_weights, pack_masks
from sparsevlm.models.stages import stack_layers, unstack_layers
from sparsevlm.models.vlm import VLM, scan_stacks
from sparsevlm.train import StepFn, TrainState, batch_arrays, make_optimizer, make_train_step, restoration_loss

PyTree = Any


@dataclasses.dataclass(frozen=True)
class RestoreResult:
    """Trained LoRA factors, the merged plain params, the loss history and the wall time."""

    lora: PyTree
    params: PyTree
    history: list[dict[str, float]]
    seconds: float
    memory: dict[str, int] | None = None  # per-device bytes on the mesh, when one was given
    skipped: int = 0  # steps skipped for a non-finite loss or gradient (RestoreConfig.skip_nonfinite)


def _run_identity(config: RestoreConfig, model_config: VLMConfig, masks: PyTree) -> dict[str, Any]:
    """What a resumed run must share with the one that wrote the checkpoints."""
    ignored = ("checkpoint_every", "skip_nonfinite", "remask", "remat")  # none of them changes what is trained
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ignored}
    kept = {path: int(np.sum(mask)) for path, mask in flat_masks(masks).items()}
    return {"restore": settings, "model": model_config.to_dict(), "kept_weights": sum(kept.values()),
            "pruned_layers": len(kept)}


@functools.lru_cache(maxsize=8)
def _unsharded_step(model: VLM, method: str, alpha: float, kl_weight: float, temperature: float,
                    schedule: tuple[float, float, int, int, float, float, int]) -> tuple[optax.GradientTransformation, StepFn]:
    """The optimizer and jit-compiled step of a one-device run: runs that share the model and the training
    settings (a study's settings and pruners) share one compilation."""
    optimizer = make_optimizer(*schedule)
    return optimizer, make_train_step(restoration_loss(model, alpha, method, kl_weight, temperature), optimizer)


def dense_where_pruned(pruned: PyTree, masks: PyTree, dense: PyTree) -> PyTree:
    """Restoration's base params: the pruned model's kept weights, and the dense model's values where it pruned.

    Masking them gives the pruned model back exactly; unmasked they are the dense teacher (for
    SparseGPT, the dense model with its kept weights already error-compensated).
    """
    check_masks(dense, masks)
    return jax.tree.map(
        lambda mask, kept, original: kept if mask is None else mask_weights(kept, mask, original),
        masks, pruned, dense, is_leaf=lambda x: x is None,
    )


def step_inputs(base_params: PyTree, masks: PyTree, lora: PyTree, stacks: dict[str, int]) -> tuple[PyTree, PyTree, PyTree]:
    """Params, masks and LoRA factors as a restoration step takes them: block stacks in the scanned
    layout (`stack_layers`, when `stacks` is not empty) and masks packed to 1 bit per weight."""
    stacked_masks = stack_layers(masks, stacks, fill=lambda m: np.ones(np.shape(m), bool))
    return stack_layers(base_params, stacks), pack_masks(stacked_masks), stack_layers(lora, stacks)


def restore(
    base_params: PyTree,
    masks: PyTree,
    model_config: VLMConfig,
    tokenizer: PreTrainedTokenizerBase,
    config: RestoreConfig,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    fmt: PromptFormat = BUILTIN,
    instruction_tokenizer: PreTrainedTokenizerBase | None = None,
    image_processor: Any = None,
    mesh: Mesh | None = None,
    plan_only: bool = False,
    examples: EncodedSet | None = None,
) -> RestoreResult:
    """Train LoRA factors (`config.method`, `config.lora`); returns them and the merged params (masked per the mode).

    `base_params` are `dense_where_pruned(...)`: the student masks them, the teacher does not. With
    `mesh`, params, masks, LoRA, optimizer state and batches are sharded over it
    (`sparsevlm.sharding`); each process loads only its rows of every batch (`sharding.host_rows`). The
    per-device memory is reported before the first step; `plan_only` stops there. `examples` are
    `config.train_data`'s, already loaded (`load_examples` of the same config; a `Pipeline` keeps them).
    """
    check_masks(base_params, masks)
    if config.train_data is None:
        raise ValueError("config.train_data is None: name the restoration data (e.g. shapes-mix); Pipeline.restore "
                         "and `sparsevlm restore` default it to the model's own task's set")
    lora = init_lora(base_params, config.lora, jax.random.key(config.seed))
    data = examples if examples is not None else load_examples(
        config.train_data, tokenizer, config.train_images, config.seed, model_config.vision.image_size, fmt,
        instruction_tokenizer, image_processor, config.train_source)
    if mesh is None and jax.process_count() > 1:
        raise ValueError(f"restoring as {jax.process_count()} processes needs a mesh over their devices (--mesh)")
    # Every process draws the same batches from the same generator and loads only its own rows of
    # each, so the run, and the data position it checkpoints, are those of one process on this mesh.
    rows = sharding.host_rows(mesh, config.batch_size) if mesh is not None else None
    stream = BatchStream(data, config.batch_size, round_up(data.max_length, 8), tokenizer.pad_token_id,
                         model_config.vision, np.random.default_rng(config.seed), rows)
    schedule = (config.learning_rate, config.end_learning_rate, config.warmup_steps, config.steps,
                config.weight_decay, config.grad_clip, config.grad_accum)
    model = VLM(model_config, jnp.bfloat16 if config.bf16 else jnp.float32, config.scan_layers, config.remat)
    # One conversion at the boundary: the step sees scanned stacks and packed masks; outside, `blocks_N`.
    stacks = scan_stacks(model_config) if config.scan_layers else {}
    step_params, step_masks, lora = step_inputs(base_params, masks, lora, stacks)
    optimizer, step = _unsharded_step(model, config.method, config.lora.alpha, config.kl_weight, config.temperature,
                                      schedule)
    state = TrainState(lora, optimizer.init(lora), jnp.zeros((), jnp.int32))
    memory = None
    if mesh is None:
        state, params, device_masks = jax.device_put((state, step_params, step_masks))
        place = batch_arrays
    else:
        example = sharding.global_batch(batch_arrays(stream.example()), mesh, config.batch_size)
        shardings = sharding.restore_shardings(mesh, optimizer, state, step_params, step_masks, example)
        # Compiled once, ahead of time, from shapes: the memory report comes before any array is placed,
        # and the same executable then runs every step.
        loss_fn = restoration_loss(model, config.lora.alpha, config.method, config.kl_weight, config.temperature)
        step = sharding.compile_step(make_train_step(loss_fn, optimizer, shardings),
                                     (state, example, step_params, step_masks), (shardings.state, *shardings.inputs))
        memory = sharding.restore_memory(step, shardings, state, step_params, step_masks, example)
        print(sharding.format_memory(memory, mesh))
        if plan_only:
            return RestoreResult(None, None, [], 0.0, memory)
        state = sharding.shard(state, shardings.state)
        params = sharding.shard(step_params, shardings.inputs[1])
        device_masks = sharding.shard(step_masks, shardings.inputs[2])
        place = lambda batch: sharding.global_batch(batch_arrays(batch), mesh, config.batch_size)  # noqa: E731
    checkpoints = None
    if checkpoint_dir is not None:
        checkpoints = TrainingCheckpoints(checkpoint_dir, _run_identity(config, model_config, masks))
    print(f"restoring with {config.method}: {lora_param_count(lora):,} LoRA params, "
          f"{config.steps} steps of {config.batch_size}×{config.grad_accum}")
    result = trainer.run(
        step, state, stream, config.steps, inputs=(params, device_masks), place=place, accumulate=config.grad_accum,
        checkpoints=checkpoints, checkpoint_every=config.checkpoint_every, skip_nonfinite=config.skip_nonfinite,
        log_every=10, desc=f"restore ({config.method})", progress=progress,
    )
    # Every process gets the whole factors (on one process this is a device_get).
    lora = unstack_layers(sharding.to_host(result.state.params), stacks)
    merged = jax.device_get(merge(base_params, lora, masks, config.lora.alpha, config.method))
    return RestoreResult(lora, merged, result.history, result.seconds, memory, result.skipped)
