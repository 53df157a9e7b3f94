"""Losses, the optimizer and the one jit-compiled train step.

Every training job is `make_train_step(loss_fn, optimizer)` run by `trainer.run`: pretraining's
whole-model stage (`lm_loss`), its vision stage (a probe loss), and restoration
(`restoration_loss`, which trains only LoRA factors and takes the base params and masks as inputs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from sparsevlm.data.batch import Batch
from sparsevlm.lora import adapter_variables, lora_scope
from sparsevlm.losses import LOSS_CHUNK, model_inputs, task_loss, vocab_losses
from sparsevlm.models.vlm import VLM, prediction_mask
from sparsevlm.sharding import StepShardings, activation_mesh, gathers_weights
from sparsevlm.tree import flatten, unflatten

PyTree = Any
Array = jax.Array
# loss_fn(trained tree, batch, *inputs) -> (loss, metrics): what a train step differentiates.
LossFn = Callable[..., tuple[Array, dict[str, Array]]]
StepFn = Callable[..., tuple["TrainState", dict[str, Array]]]


class TrainState(NamedTuple):
    """The tree being trained (all params, or LoRA factors), its optimizer state and the step counter."""

    params: PyTree
    opt_state: optax.OptState
    step: Array


def batch_arrays(batch: Batch) -> dict[str, Any]:
    """A `Batch` as the dict of arrays the jit-compiled step takes."""
    return dataclasses.asdict(batch)


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
    accumulate: int = 1,
) -> optax.GradientTransformation:
    """AdamW on a warmup-cosine schedule with global-norm clipping; decay on kernels only.

    With `accumulate` > 1 the update is applied every that many calls (`optax.MultiSteps`).
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=end_learning_rate,
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=weight_decay, mask=weight_decay_mask),
    )
    return optax.MultiSteps(optimizer, every_k_schedule=accumulate) if accumulate > 1 else optimizer


def keep_if_finite(new: PyTree, old: PyTree, metrics: Mapping[str, Array]) -> PyTree:
    """`new`, or `old` unchanged when the step's loss or gradient norm is not finite (a skipped step)."""
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def make_train_step(
    loss_fn: LossFn, optimizer: optax.GradientTransformation, shardings: StepShardings | None = None
) -> StepFn:
    """A jit-compiled `step(state, batch, *inputs) -> (state, metrics)` minimising `loss_fn(state.params, batch, *inputs)`.

    The metrics are `loss_fn`'s, plus `loss` and `grad_norm`; a step whose loss or gradient is not
    finite leaves the state as it was (`keep_if_finite`). `inputs` are arrays the loss reads but does
    not train (restoration's base params and masks). With `shardings` (state, then batch and inputs
    in order) the step's layout is pinned on a mesh (`sparsevlm.sharding`).
    """

    mesh = None if shardings is None else jax.tree.leaves(shardings.state)[0].mesh

    def step(state: TrainState, batch: dict[str, Any], *inputs: PyTree) -> tuple[TrainState, dict[str, Array]]:
        with activation_mesh(mesh):  # traced on the mesh: activations pinned to the batch axes
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, *inputs)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = metrics | {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return keep_if_finite(TrainState(params, opt_state, state.step + 1), state, metrics), metrics

    if shardings is None:
        return jax.jit(step)
    metrics = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(shardings.state, *shardings.inputs), out_shardings=(shardings.state, metrics))


def lm_loss(model: VLM) -> LossFn:
    """Full-parameter training's loss: mean next-token CE on target tokens (metrics: `tokens`)."""

    def loss_fn(params: PyTree, batch: dict[str, Any]) -> tuple[Array, dict[str, Array]]:
        loss, count = task_loss(model, params, batch)
        return loss, {"tokens": count}

    return loss_fn


def restoration_loss(model: VLM, alpha: float, mode: str, kl_weight: float, temperature: float,
                     loss_chunk: int = LOSS_CHUNK) -> LossFn:
    """Restoration's loss `loss_fn(lora, batch, params, masks)`: only the LoRA factors train.

    Loss = (1 − λ)·CE + λ·KL(teacher ‖ student) at temperature T. The student is the masked model
    with LoRA (`mode`, see `sparsevlm.lora`; masks bool or packed); the teacher is the same base
    params with neither masks nor LoRA, computed in the same step under `stop_gradient` (no second
    copy of the weights). Both run to their last hidden states; the LM head and the vocabulary losses
    then run over the text positions only, `loss_chunk` positions at a time (`vocab_losses`). CE
    counts target tokens; KL counts every position that predicts a real (non-padding) text token.
    `model` may be built with `scan_layers` (params, masks and LoRA then in the `stack_layers`
    layout) and `remat`. Metrics: `ce`, `kl`, `tokens`.
    """

    def loss_fn(lora: PyTree, batch: dict[str, Any], params: PyTree, masks: PyTree) -> tuple[Array, dict]:
        inputs = model_inputs(batch)
        args = (batch["images"], batch["tokens"], batch["text_mask"])
        num_text = batch["tokens"].shape[1]
        student_vars = adapter_variables(params, lora, masks)
        with lora_scope(alpha, mode):
            hidden = model.apply(student_vars, *args, **inputs, method="hidden_states")[:, -num_text:]

        def student_head(h: Array) -> Array:
            with lora_scope(alpha, mode):
                return model.apply(student_vars, h, method="logits")

        teacher: dict[str, Any] = {}
        if kl_weight != 0.0:  # static: with λ = 0 there is no teacher pass at all
            teacher_hidden = model.apply({"params": params}, *args, **inputs, method="hidden_states")
            # Positions that predict a real next token (for T5: the decoder's, from the start token on).
            predicts = prediction_mask(model.config, batch["text_mask"], batch["loss_mask"])
            teacher = {
                "teacher_head": lambda h: jax.lax.stop_gradient(model.apply({"params": params}, h, method="logits")),
                "teacher_hidden": jax.lax.stop_gradient(teacher_hidden[:, -num_text:]),
                "kl_mask": batch["text_mask"][:, 1:] & predicts[:, :-1],
            }
        # Without LoRA or a mask on the LM head, the teacher's head is the student's: on an FSDP mesh
        # one call for both gathers the head once (on one device two calls hold fewer logits copies).
        adapted = [p for p, v in flatten({"lora": lora, "masks": masks}).items() if v is not None]
        shared = bool(teacher) and gathers_weights() and not any("lm_head/" in p for p in adapted)
        ce_sum, ce_count, kl_sum, kl_count = vocab_losses(
            student_head, hidden, batch["tokens"], batch["loss_mask"], **teacher, temperature=temperature,
            chunk=loss_chunk, shared_head=shared)
        ce = ce_sum / jnp.maximum(ce_count, 1.0)
        metrics = {"ce": ce, "tokens": ce_count}
        if kl_weight == 0.0:
            return ce, metrics | {"kl": jnp.zeros(())}
        kl = kl_sum / jnp.maximum(kl_count, 1.0)
        return (1.0 - kl_weight) * ce + kl_weight * kl, metrics | {"kl": kl}

    return loss_fn
