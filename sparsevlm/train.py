"""Losses, optimizers and the jit-compiled train step shared by pretraining and restoration."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
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


def make_train_step(
    model: VLM, optimizer: optax.GradientTransformation, shardings: StepShardings | None = None
) -> Callable[[TrainState, dict[str, Any]], tuple[TrainState, dict[str, Array]]]:
    """A jit-compiled full-parameter step minimising mean next-token CE on target tokens (sharded if asked)."""

    def loss_fn(params: PyTree, batch: dict[str, Any]) -> tuple[Array, Array]:
        logits, _ = model.apply(
            {"params": params}, batch["images"], batch["tokens"], batch["text_mask"], **model_inputs(batch)
        )
        total, count = token_cross_entropy(
            text_logits(logits, batch["tokens"].shape[1]), batch["tokens"], batch["loss_mask"]
        )
        return total / jnp.maximum(count, 1.0), count

    def step(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, Array]]:
        (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "tokens": count, "grad_norm": optax.tree.norm(grads)}
        return TrainState(params, opt_state, state.step + 1), metrics

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
        return LoraState(lora, opt_state, state.step + 1), metrics

    return _jit_step(step, shardings)
