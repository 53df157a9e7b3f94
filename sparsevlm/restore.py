"""Restoration training: LoRA or SparseLoRA factors on a pruned model, distilled from the dense teacher."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sparsevlm import sharding
from sparsevlm.config import RestoreConfig, VLMConfig
from sparsevlm.data.batch import BatchStream, rng_state, set_rng_state
from sparsevlm.data.calibration import calibration_set
from sparsevlm.data.prompts import BUILTIN, PromptFormat
from sparsevlm.eval.evaluate import round_up
from sparsevlm.lora import LoraConfig, init_lora, lora_param_count, merge
from sparsevlm.pruning.masks import check_masks, flat_masks
from sparsevlm.models.vlm import VLM
from sparsevlm.train import (LoraState, NonFiniteGuard, TrainingCheckpoints, batch_arrays, make_optimizer,
                             make_restore_step)

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
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("checkpoint_every", "skip_nonfinite")}
    kept = {path: int(np.sum(mask)) for path, mask in flat_masks(masks).items()}
    return {"restore": settings, "model": model_config.to_dict(), "kept_weights": sum(kept.values()),
            "pruned_layers": len(kept)}


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
    stream = BatchStream(data, config.batch_size // hosts, round_up(data.max_length, 8), tokenizer.pad_token_id,
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
        example = sharding.global_batch(batch_arrays(stream.example()), mesh)
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
    checkpoints = None
    micro_start, guard = 0, NonFiniteGuard(config.skip_nonfinite)
    history: list[dict[str, float]] = []
    if checkpoint_dir is not None:
        checkpoints = TrainingCheckpoints(checkpoint_dir, _run_identity(config, model_config, masks))
        resumed = checkpoints.restore(state if mesh is not None else jax.device_put(state))
        if resumed is not None:
            if hosts > 1:
                raise ValueError("resuming a multi-host restoration is not supported yet: each host's data "
                                 f"position is not saved; delete {checkpoint_dir} to start afresh")
            done, state, extra = resumed
            set_rng_state(rng, extra["rng"])
            stream.load_state(extra["data"])
            guard.skipped, history = extra["skipped"], extra["history"]
            micro_start = done * config.grad_accum
            print(f"resuming from step {done} of {config.steps} ({checkpoint_dir})")
    print(f"restoring with {config.method}: {lora_param_count(lora):,} LoRA params, "
          f"{config.steps} steps of {config.batch_size}×{config.grad_accum}")
    started = time.perf_counter()
    micro_steps = config.steps * config.grad_accum
    bar = tqdm(range(micro_start, micro_steps), desc=f"restore ({config.method})", disable=not progress,
               mininterval=1.0, initial=micro_start, total=micro_steps)

    def save(done: int) -> None:
        extra = {"rng": rng_state(rng), "data": stream.state(), "skipped": guard.skipped, "history": history}
        checkpoints.save(done, state, extra)

    for micro in bar:
        state, metrics = step_fn(state, params, device_masks, place(next(stream)))
        # Checked every step (one scalar sync): a non-finite step left the state as it was, and either
        # stops the run (no checkpoint is written after it) or is skipped and counted.
        last_good = checkpoints.describe_latest if checkpoints is not None else None
        if guard.check(metrics, micro // config.grad_accum, f" (micro-batch {micro})", last_good):
            continue
        if micro % 10 == 0 or micro == micro_steps - 1:
            record = {k: float(v) for k, v in metrics.items() if k != "tokens"}
            record |= {"step": micro // config.grad_accum, "micro_step": micro}
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", kl=f"{record['kl']:.3f}")
        done = (micro + 1) // config.grad_accum  # optimizer steps taken
        if (checkpoints is not None and config.checkpoint_every and (micro + 1) % config.grad_accum == 0
                and done % config.checkpoint_every == 0 and done < config.steps):
            save(done)
    if checkpoints is not None:
        if checkpoints.latest_step() != config.steps:
            save(config.steps)
        checkpoints.close()
    # All hosts get the whole factors (on one host this is a device_get).
    lora = multihost_utils.process_allgather(state.lora, tiled=True) if mesh is not None else jax.device_get(state.lora)
    merged = jax.device_get(merge(base_params, lora, masks, lora_cfg.alpha, config.method))
    return RestoreResult(lora, merged, history, time.perf_counter() - started, memory, guard.skipped)
