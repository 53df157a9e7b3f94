"""The losses: next-token cross-entropy on target tokens, and the distillation KL to a teacher.

`vocab_losses` computes both from hidden states, the LM head applied one chunk of positions at a
time (rematerialised), so a step never holds more than one chunk of `[B, T, vocab]` float32 logits
per model.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from sparsevlm.models.vlm import VLM

PyTree = Any
Array = jax.Array
# Positions per chunk of `vocab_losses` (sequences up to this long take one chunk, no loop).
LOSS_CHUNK = 128


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keyword inputs of `VLM.__call__` a batch provides besides images and text."""
    instruction = None
    if batch.get("instruction_tokens") is not None:
        instruction = (batch["instruction_tokens"], batch["instruction_mask"])
    return {"instruction": instruction, "target_mask": batch["loss_mask"], "segments": batch.get("segments")}


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


def vocab_losses(
    student_head: Callable[[Array], Array],
    student_hidden: Array,
    tokens: Array,
    loss_mask: Array,
    teacher_head: Callable[[Array], Array] | None = None,
    teacher_hidden: Array | None = None,
    kl_mask: Array | None = None,
    temperature: float = 1.0,
    chunk: int = LOSS_CHUNK,
    shared_head: bool = False,
) -> tuple[Array, Array, Array, Array]:
    """`token_cross_entropy` and (with a teacher) `distillation_kl` from hidden states `[B, T, E]`:
    `(ce_sum, ce_count, kl_sum, kl_count)`.

    `*_head` map hidden states to logits. Over `chunk` positions the heads run one chunk at a time
    inside a rematerialised loop, so at most one chunk of logits per model is alive, forward or
    backward; the sums equal the one-pass values up to summation order. `kl_mask` `[B, T-1]` marks
    the positions (predicting token t + 1) the KL counts. `shared_head`: the teacher's head is the
    student's without gradient, so both run as one call on their positions side by side (one head
    matmul, and on an FSDP mesh one gather of the head).
    """
    with_kl = teacher_head is not None

    def heads(h: Array, t: Array) -> tuple[Array, Array]:
        if not shared_head:
            return student_head(h), teacher_head(t)
        both = student_head(jnp.concatenate([h, t], axis=1))  # along positions: batch sharding unchanged
        return both[:, :h.shape[1]], jax.lax.stop_gradient(both[:, h.shape[1]:])

    length = tokens.shape[1]
    if length <= chunk:
        if not with_kl:
            student = student_head(student_hidden)
            ce_sum, ce_count = token_cross_entropy(student, tokens, loss_mask)
            return ce_sum, ce_count, jnp.zeros(()), jnp.zeros(())
        student, teacher = heads(student_hidden, teacher_hidden)
        ce_sum, ce_count = token_cross_entropy(student, tokens, loss_mask)
        kl_sum, kl_count = distillation_kl(student[:, :-1], teacher[:, :-1], kl_mask, temperature)
        return ce_sum, ce_count, kl_sum, kl_count
    # Position t (of T - 1) predicts token t + 1; pad to whole chunks with weight-0 positions.
    steps = -(-(length - 1) // chunk)
    pad = steps * chunk - (length - 1)

    def chunks(x: Array) -> Array:  # [B, T-1, ...] → [steps, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(x.shape[0], steps, chunk, *x.shape[2:]), 1, 0)

    xs = {"h": chunks(student_hidden[:, :-1]), "targets": chunks(tokens[:, 1:]),
          "ce_w": chunks(loss_mask[:, 1:].astype(jnp.float32))}
    if with_kl:
        xs |= {"t": chunks(teacher_hidden[:, :-1]), "kl_w": chunks(kl_mask.astype(jnp.float32))}

    @jax.checkpoint
    def one(x: dict[str, Array]) -> Array:
        if with_kl:
            student, teacher = heads(x["h"], x["t"])
        else:
            student = student_head(x["h"])
        student = student.astype(jnp.float32)
        ce = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(student, x["targets"]) * x["ce_w"])
        if not with_kl:
            return jnp.stack([ce, jnp.zeros(())])
        log_s = jax.nn.log_softmax(student / temperature, axis=-1)
        log_t = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature, axis=-1)
        kl = jnp.sum(jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1) * x["kl_w"])
        return jnp.stack([ce, kl])

    sums, _ = jax.lax.scan(lambda total, x: (total + one(x), None), jnp.zeros(2), xs)
    kl_count = jnp.sum(kl_mask.astype(jnp.float32)) if with_kl else jnp.zeros(())
    return sums[0], jnp.sum(loss_mask[:, 1:].astype(jnp.float32)), sums[1], kl_count
