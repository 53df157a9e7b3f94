"""The losses: next-token cross-entropy on target tokens, and the distillation KL to a teacher."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparsevlm.models.vlm import VLM

PyTree = Any
Array = jax.Array


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


def task_loss(model: VLM, params: PyTree, batch: dict[str, Any]) -> tuple[Array, Array]:
    """Mean next-token CE over a batch's target tokens, and how many there were."""
    logits, _ = model.apply(
        {"params": params}, batch["images"], batch["tokens"], batch["text_mask"], **model_inputs(batch)
    )
    total, count = token_cross_entropy(text_logits(logits, batch["tokens"].shape[1]), batch["tokens"], batch["loss_mask"])
    return total / jnp.maximum(count, 1.0), count


def distillation_kl(student: Array, teacher: Array, mask: Array, temperature: float) -> tuple[Array, Array]:
    """Summed KL(teacher ‖ student) of softmax(logits / T) over positions where `mask`, and their count."""
    log_student = jax.nn.log_softmax(student.astype(jnp.float32) / temperature, axis=-1)
    log_teacher = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature, axis=-1)
    per_position = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_position * mask), jnp.sum(mask)
