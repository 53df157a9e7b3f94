"""Losses, optimizers and the jit-compiled train step shared by pretraining and restoration."""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from sparsevlm.data.batch import Batch
from sparsevlm.models.vlm import VLM, prediction_mask
from sparsevlm.tree import flatten, unflatten

PyTree = Any
Array = jax.Array


class TrainState(NamedTuple):
    """Trainable params, optimizer state and the step counter."""

    params: PyTree
    opt_state: optax.OptState
    step: Array


def batch_arrays(batch: Batch) -> dict[str, Any]:
    """A `Batch` as the dict of arrays the jit-compiled step takes."""
    return dataclasses.asdict(batch)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keyword inputs of `VLM.__call__` a batch provides besides images and text."""
    instruction = None
    if batch.get("instruction_tokens") is not None:
        instruction = (batch["instruction_tokens"], batch["instruction_mask"])
    return {"instruction": instruction, "target_mask": batch["loss_mask"]}


def token_cross_entropy(logits: Array, tokens: Array, loss_mask: Array) -> tuple[Array, Array]:
    """Summed next-token CE over target positions, and their count.

    `logits` are the text part `[B, T, V]`; position t-1 predicts `tokens[:, t]` where `loss_mask[:, t]`.
    """
    predicted = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(predicted, targets)
    return jnp.sum(losses * mask), jnp.sum(mask)


def text_logits(logits: Array, num_text: int) -> Array:
    """The last `num_text` positions of `[image | text]` logits."""
    return logits[:, -num_text:]


def weight_decay_mask(params: PyTree) -> PyTree:
    """True for matrices (kernels), False for norms, biases, embeddings and position tables."""
    flat = flatten(params)
    return unflatten({path: path.endswith("kernel") and value.ndim >= 2 for path, value in flat.items()})


def make_optimizer(
    learning_rate: float,
    end_learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    weight_decay: float,
    grad_clip: float,
) -> optax.GradientTransformation:
    """AdamW on a warmup-cosine schedule with global-norm clipping; decay on kernels only."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=end_learning_rate,
    )
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=weight_decay, mask=weight_decay_mask),
    )


def keep_if_finite(new: PyTree, old: PyTree, metrics: Mapping[str, Array]) -> PyTree:
    """`new`, or `old` unchanged when the step's loss or gradient norm is not finite (a skipped step)."""
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


class NonFiniteGuard:
    """Host-side check of every step: stop at a non-finite loss or gradient, or skip up to `max_skipped` such steps.

    The jit steps already leave the state unchanged on a non-finite step (`keep_if_finite`), so a
    skipped step costs one batch and nothing else.
    """

    def __init__(self, max_skipped: int = 0, skipped: int = 0) -> None:
        if max_skipped < 0:
            raise ValueError(f"max_skipped={max_skipped} must be >= 0")
        self.max_skipped, self.skipped = max_skipped, skipped

    def check(self, metrics: Mapping[str, Array], step: int, where: str = "",
              last_good: Callable[[], str] | None = None) -> bool:
        """True if this step was non-finite and skipped; raises FloatingPointError past the allowance.

        `last_good()` (asked only when stopping) describes the checkpoint the user can go back to.
        """
        loss, grad_norm = (float(x) for x in jax.device_get((metrics["loss"], metrics["grad_norm"])))
        if np.isfinite(loss) and np.isfinite(grad_norm):
            return False
        what = f"loss {loss}" if not np.isfinite(loss) else f"gradient norm {grad_norm}"
        self.skipped += 1
        if self.skipped <= self.max_skipped:
            print(f"skipped step {step}{where}: non-finite {what} ({self.skipped} of at most {self.max_skipped})")
            return True
        allowance = f"; {self.skipped - 1} non-finite steps were already skipped" if self.max_skipped else ""
        kept = last_good() if last_good is not None else ""
        raise FloatingPointError(f"non-finite {what} at step {step}{where}{allowance}{kept}")


class TrainingCheckpoints:
    """Resumable training checkpoints in one directory: the train state, and JSON for the data position etc.

    Each save is an orbax step directory, written under a temporary name and renamed when complete,
    so a kill mid-save leaves the previous checkpoint as the latest; a sha256 manifest is added to
    each, and checked before a resume. `run` identifies the run (config, model): resuming a
    directory written by a different run is an error naming what differs.
    """

    def __init__(self, directory: str | Path, run: Mapping[str, Any], keep: int = 2) -> None:
        import orbax.checkpoint as ocp

        self.directory = Path(directory).resolve()
        if self.directory.exists() and not self.directory.is_dir():
            raise FileExistsError(f"checkpoint directory {self.directory} exists and is not a directory")
        self.run = json.loads(json.dumps(dict(run)))  # what a JSON round trip gives back, for comparison
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def describe_latest(self) -> str:
        """"; the last good checkpoint is step N in DIR" (empty when there is none), for error messages."""
        step = self.latest_step()
        return "" if step is None else f"; the last good checkpoint is step {step} in {self.directory}"

    def restore(self, like: PyTree) -> tuple[int, PyTree, dict[str, Any]] | None:
        """(step, state laid out like `like`, extras) from the newest checkpoint, or None if there is none."""
        import orbax.checkpoint as ocp

        from sparsevlm.integrity import CorruptCheckpointError, one_line_error, verify_checksums

        step = self.latest_step()
        if step is None:
            return None
        where = self.directory / str(step)
        verify_checksums(where)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # noqa: BLE001 — whatever orbax raises, the user needs the path
            raise CorruptCheckpointError(f"checkpoint {where} is unreadable: {one_line_error(err)}") from err
        if not isinstance(meta, dict) or "run" not in meta:
            raise CorruptCheckpointError(f"checkpoint {where} has no run description: not a sparsevlm checkpoint")
        now, then = _dotted(self.run), _dotted(meta["run"])
        differs = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
        if differs:
            shown = ", ".join(f"{k} {then.get(k)!r} there, {now.get(k)!r} now" for k in differs[:4])
            more = f" and {len(differs) - 4} more" if len(differs) > 4 else ""
            raise ValueError(
                f"{self.directory} holds checkpoints of a different run ({shown}{more}); delete it to start "
                "afresh, or choose another output"
            )
        try:
            state = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as err:  # noqa: BLE001
            raise CorruptCheckpointError(f"checkpoint {where} is unreadable: {one_line_error(err)}") from err
        return step, jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(state)), meta.get("extra", {})

    def save(self, step: int, state: PyTree, extra: Mapping[str, Any]) -> None:
        """Write step `step` (state arrays + JSON extras) and its manifest; older ones beyond `keep` go."""
        import orbax.checkpoint as ocp

        from sparsevlm.integrity import write_checksums

        meta = {"run": self.run, "step": step, "extra": dict(extra)}
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            write_checksums(self.directory / str(step))

    def close(self) -> None:
        """Finish pending writes."""
        self._manager.wait_until_finished()
        self._manager.close()


def _dotted(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` → `{"a.b": 1}`: leaf settings, for naming what differs."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, value in tree.items() for k, v in _dotted(value, f"{prefix}.{key}" if prefix else key).items()}


class StepShardings(NamedTuple):
    """Shardings of a step's arguments (state, then the other inputs in order); see `sparsevlm.sharding`."""

    state: PyTree
    inputs: tuple[PyTree, ...]


def _jit_step(step: Callable, shardings: StepShardings | None) -> Callable:
    """`jax.jit(step)`; with shardings, pinned so the new state comes back sharded as the old one went in."""
    if shardings is None:
        return jax.jit(step)
    metrics = NamedSharding(jax.tree.leaves(shardings.state)[0].mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(shardings.state, *shardings.inputs), out_shardings=(shardings.state, metrics))


def task_loss(model: VLM, params: PyTree, batch: dict[str, Any]) -> tuple[Array, Array]:
    """Mean next-token CE over a batch's target tokens, and how many there were."""
    logits, _ = model.apply(
        {"params": params}, batch["images"], batch["tokens"], batch["text_mask"], **model_inputs(batch)
    )
    total, count = token_cross_entropy(text_logits(logits, batch["tokens"].shape[1]), batch["tokens"], batch["loss_mask"])
    return total / jnp.maximum(count, 1.0), count


def make_train_step(
    model: VLM, optimizer: optax.GradientTransformation, shardings: StepShardings | None = None
) -> Callable[[TrainState, dict[str, Any]], tuple[TrainState, dict[str, Array]]]:
    """A jit-compiled full-parameter step minimising mean next-token CE on target tokens (sharded if asked)."""

    def step(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, Array]]:
        (loss, count), grads = jax.value_and_grad(partial(task_loss, model), has_aux=True)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "tokens": count, "grad_norm": optax.tree.norm(grads)}
        return keep_if_finite(TrainState(params, opt_state, state.step + 1), state, metrics), metrics

    return _jit_step(step, shardings)


def distillation_kl(student: Array, teacher: Array, mask: Array, temperature: float) -> tuple[Array, Array]:
    """Summed KL(teacher ‖ student) of softmax(logits / T) over positions where `mask`, and their count."""
    log_student = jax.nn.log_softmax(student.astype(jnp.float32) / temperature, axis=-1)
    log_teacher = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature, axis=-1)
    per_position = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_position * mask), jnp.sum(mask)


class LoraState(NamedTuple):
    """Trainable LoRA factors, their optimizer state and the step counter."""

    lora: PyTree
    opt_state: optax.OptState
    step: Array


def make_restore_step(
    model: VLM,
    optimizer: optax.GradientTransformation,
    alpha: float,
    mode: str,
    kl_weight: float,
    temperature: float,
    shardings: StepShardings | None = None,
) -> Callable[[LoraState, PyTree, PyTree, dict[str, Any]], tuple[LoraState, dict[str, Array]]]:
    """A jit-compiled restoration step: only LoRA factors train; base params and masks are inputs.

    Loss = (1 − λ)·CE + λ·KL(teacher ‖ student) at temperature T. The student is the masked model
    with LoRA (`mode`); the teacher is the same base params with neither masks nor LoRA, computed
    in the same step under `stop_gradient`. CE counts target tokens; KL counts every position that
    predicts a real (non-padding) text token. `shardings` (state; params, masks, batch) pins the
    step's layout on a mesh (`sparsevlm.sharding.restore_shardings`).
    """
    from sparsevlm.lora import lora_scope  # lora imports pruning, which imports models: keep train light

    def loss_fn(lora: PyTree, params: PyTree, masks: PyTree, batch: dict[str, Any]) -> tuple[Array, dict]:
        inputs = model_inputs(batch)
        with lora_scope(lora, masks, alpha, mode):
            logits, _ = model.apply({"params": params}, batch["images"], batch["tokens"], batch["text_mask"], **inputs)
        num_text = batch["tokens"].shape[1]
        student = text_logits(logits, num_text)
        ce_sum, ce_count = token_cross_entropy(student, batch["tokens"], batch["loss_mask"])
        ce = ce_sum / jnp.maximum(ce_count, 1.0)
        metrics = {"ce": ce, "tokens": ce_count}
        if kl_weight == 0.0:  # static: no teacher pass at all
            return ce, metrics | {"kl": jnp.zeros(())}
        teacher_logits, _ = model.apply(
            {"params": params}, batch["images"], batch["tokens"], batch["text_mask"], **inputs
        )
        teacher = jax.lax.stop_gradient(text_logits(teacher_logits, num_text))
        # Positions that predict a real next token (for T5: the decoder's, from the start token on).
        predicts = prediction_mask(model.config, batch["text_mask"], batch["loss_mask"])
        kl_mask = batch["text_mask"][:, 1:] & predicts[:, :-1]
        kl_sum, kl_count = distillation_kl(student[:, :-1], teacher[:, :-1], kl_mask, temperature)
        kl = kl_sum / jnp.maximum(kl_count, 1.0)
        return (1.0 - kl_weight) * ce + kl_weight * kl, metrics | {"kl": kl}

    def step(state: LoraState, params: PyTree, masks: PyTree, batch: dict[str, Any]) -> tuple[LoraState, dict]:
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.lora, params, masks, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.lora)
        lora = optax.apply_updates(state.lora, updates)
        metrics = metrics | {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return keep_if_finite(LoraState(lora, opt_state, state.step + 1), state, metrics), metrics

    return _jit_step(step, shardings)
