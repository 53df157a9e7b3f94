"""Restoration training: LoRA or SparseLoRA factors on a pruned model, distilled from the dense teacher."""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sparsevlm import sharding
from sparsevlm.config import RestoreConfig, VLMConfig
from sparsevlm.data.batch import endless_batches
from sparsevlm.data.calibration import calibration_set
from sparsevlm.data.prompts import BUILTIN, PromptFormat
from sparsevlm.eval.evaluate import round_up
from sparsevlm.lora import LoraConfig, init_lora, lora_param_count, merge
from sparsevlm.pruning.masks import check_masks
from sparsevlm.models.vlm import VLM
from sparsevlm.train import LoraState, batch_arrays, make_optimizer, make_restore_step

PyTree = Any


@dataclasses.dataclass(frozen=True)
class RestoreResult:
    """Trained LoRA factors, the merged plain params, the loss history and the wall time."""

    lora: PyTree
    params: PyTree
    history: list[dict[str, float]]
    seconds: float
    memory: dict[str, int] | None = None  # per-device bytes on the mesh, when one was given


def lora_config(config: RestoreConfig, model_config: VLMConfig | None = None) -> LoraConfig:
    """The LoRA targets and ranks a restore config asks for, for this model's connector kind."""
    kind = model_config.connector.kind if model_config is not None else "mlp"
    return LoraConfig.with_ranks(config.vision_rank, config.connector_rank, config.language_rank, config.alpha, kind)


def teacher_base(pruned: PyTree, masks: PyTree, dense: PyTree) -> PyTree:
    """Base params for restoration: the pruned model's kept weights, the dense model's values elsewhere.

    Masking them gives the pruned model back exactly; unmasked they are the dense teacher (for
    SparseGPT, the dense model with its kept weights already error-compensated).
    """
    check_masks(dense, masks)
    return jax.tree.map(
        lambda mask, kept, original: kept if mask is None else np.where(mask, kept, original),
        masks, pruned, dense, is_leaf=lambda x: x is None,
    )


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
) -> RestoreResult:
    """Train LoRA factors on built-in data; returns them and the merged params (masked per the mode).

    With `mesh`, params, masks, LoRA, optimizer state and batches are sharded over it
    (`sparsevlm.sharding`); each host loads its own `batch_size / hosts` examples per step. The
    per-device memory is reported before the first step; `plan_only` stops there.
    """
    check_masks(base_params, masks)
    lora_cfg = lora_config(config, model_config)
    key = jax.random.key(config.seed)
    lora = init_lora(base_params, lora_cfg, key)
    data = calibration_set(config.train_data, tokenizer, config.train_images, config.seed,
                           model_config.vision.image_size, fmt, instruction_tokenizer, image_processor)
    hosts = jax.process_count() if mesh is not None else 1
    if config.batch_size % hosts:
        raise ValueError(f"batch size {config.batch_size} is not divisible by the {hosts} hosts")
    # Each host draws its own examples (its process index offsets the seed); one host: as before.
    rng = np.random.default_rng(config.seed + (jax.process_index() if hosts > 1 else 0))
    stream = endless_batches(data, config.batch_size // hosts, round_up(data.max_length, 8), tokenizer.pad_token_id,
                             model_config.vision, rng)
    optimizer = make_optimizer(config.learning_rate, config.end_learning_rate, config.warmup_steps, config.steps,
                               config.weight_decay, config.grad_clip)
    if config.grad_accum > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=config.grad_accum)
    model = VLM(model_config, jnp.bfloat16 if config.bf16 else jnp.float32)
    state = LoraState(lora, optimizer.init(lora), jnp.zeros((), jnp.int32))
    memory = None
    if mesh is None:
        step_fn = make_restore_step(model, optimizer, lora_cfg.alpha, config.method, config.kl_weight,
                                    config.temperature)
        params, device_masks = jax.device_put(base_params), jax.device_put(masks)
        place = batch_arrays
    else:
        first = next(stream)
        stream = itertools.chain([first], stream)
        example = sharding.global_batch(batch_arrays(first), mesh)
        shardings = sharding.restore_shardings(mesh, optimizer, state, base_params, masks, example)
        step_fn = make_restore_step(model, optimizer, lora_cfg.alpha, config.method, config.kl_weight,
                                    config.temperature, shardings)
        # Compiled once, ahead of time, from shapes: the memory report comes before any array is placed,
        # and the same executable then runs every step.
        step_fn = sharding.compile_step(step_fn, (state, base_params, masks, example),
                                        (shardings.state, *shardings.inputs))
        memory = sharding.restore_memory(step_fn, shardings, state, base_params, masks, example)
        print(sharding.format_memory(memory, mesh))
        if plan_only:
            return RestoreResult(None, None, [], 0.0, memory)
        state = sharding.shard(state, shardings.state)
        params, device_masks = sharding.shard(base_params, shardings.inputs[0]), sharding.shard(masks, shardings.inputs[1])
        place = lambda batch: sharding.global_batch(batch_arrays(batch), mesh)  # noqa: E731
    manager = None
    if checkpoint_dir is not None:
        manager = ocp.CheckpointManager(
            Path(checkpoint_dir).resolve(),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
        )
    print(f"restoring with {config.method}: {lora_param_count(lora):,} LoRA params, "
          f"{config.steps} steps of {config.batch_size}×{config.grad_accum}")
    started = time.perf_counter()
    history: list[dict[str, float]] = []
    micro_steps = config.steps * config.grad_accum
    bar = tqdm(range(micro_steps), desc=f"restore ({config.method})", disable=not progress, mininterval=1.0)
    for micro in bar:
        state, metrics = step_fn(state, params, device_masks, place(next(stream)))
        # Checked every step (one scalar sync), so no checkpoint is written after a bad step.
        loss, grad_norm = (float(x) for x in jax.device_get((metrics["loss"], metrics["grad_norm"])))
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            last = manager.latest_step() if manager is not None else None
            kept = f"; the last good checkpoint is step {last} in {checkpoint_dir}" if last is not None else ""
            raise FloatingPointError(
                f"non-finite {'loss' if not np.isfinite(loss) else 'gradient norm'} "
                f"{loss if not np.isfinite(loss) else grad_norm} at step {micro // config.grad_accum} "
                f"(micro-batch {micro}){kept}"
            )
        if micro % 10 == 0 or micro == micro_steps - 1:
            record = {k: float(v) for k, v in metrics.items() if k != "tokens"}
            record |= {"step": micro // config.grad_accum, "micro_step": micro}
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", kl=f"{record['kl']:.3f}")
        done = (micro + 1) // config.grad_accum  # optimizer steps taken
        if (manager is not None and config.checkpoint_every and (micro + 1) % config.grad_accum == 0
                and done % config.checkpoint_every == 0):
            manager.save(done, args=ocp.args.StandardSave({"lora": jax.device_get(state.lora)}))
    if manager is not None:
        if manager.latest_step() != config.steps:
            manager.save(config.steps, args=ocp.args.StandardSave({"lora": jax.device_get(state.lora)}), force=True)
        manager.wait_until_finished()
        manager.close()
    # All hosts get the whole factors (on one host this is a device_get).
    lora = multihost_utils.process_allgather(state.lora, tiled=True) if mesh is not None else jax.device_get(state.lora)
    merged = jax.device_get(merge(base_params, lora, masks, lora_cfg.alpha, config.method))
    return RestoreResult(lora, merged, history, time.perf_counter() - started, memory)
