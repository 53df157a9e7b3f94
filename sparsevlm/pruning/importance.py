"""ECoFLaP's layer importance on calibration batches (Sung et al., ICLR 2024), and its allocation.

First order: Σ_b Σ_ij |W_ij|·|∂L_b/∂W_ij| over calibration batches b (one backward pass each).
Zeroth order (no backward pass): for every weight matrix and batch, perturb the matrix by ±ε·z with
z ~ N(0, I) and take g = (L(W + εz) − L(W − εz)) / 2ε, an estimate of the directional derivative
⟨∇W L, z⟩. E|g| = √(2/π)·‖∇W L‖_F, so |g| / √(2n/π) estimates the root-mean-square gradient of the
matrix's n weights, and the layer's score is Σ_b Σ_ij |W_ij|·|g_b| / √(2n/π): the first-order score
with each |∂L/∂W_ij| replaced by the matrix's estimated RMS gradient.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm.config import ALLOCATIONS, ECOFLAP_BATCHES, SparsitySpec, VLMConfig
from sparsevlm.losses import task_loss
from sparsevlm.masks import prunable_paths
from sparsevlm.models.stages import Carry
from sparsevlm.models.vlm import VLM
from sparsevlm.pruning.allocation import global_ratios, uniform_ratios
from sparsevlm.tree import flatten, unflatten

PyTree = Any
Array = jax.Array

ECOFLAP_ORDERS = {"ecoflap-zeroth": "zeroth", "ecoflap-first": "first"}  # allocation → importance order
NOISE_EPS = 1e-3  # ECoFLaP's perturbation size


def loss_batches(calibration: Carry, count: int = ECOFLAP_BATCHES) -> list[dict[str, Array]]:
    """The calibration examples split into `count` loss batches (fewer if there are fewer examples)."""
    if count <= 0:
        raise ValueError(f"calibration batches {count} must be positive")
    total = int(next(iter(calibration.values())).shape[0])
    edges = np.linspace(0, total, min(count, total) + 1).round().astype(int)
    batches = []
    for start, stop in zip(edges[:-1], edges[1:]):
        part = {k: v[start:stop] for k, v in calibration.items()}
        batch = {k: part[k] for k in ("images", "tokens", "text_mask")} | {"loss_mask": part["target_mask"]}
        if "instruction_tokens" in part:
            batch |= {"instruction_tokens": part["instruction_tokens"], "instruction_mask": part["instruction_mask"]}
        batches.append(batch)
    return batches


def _loss(config: VLMConfig) -> Callable[[PyTree, dict[str, Array]], Array]:
    model = VLM(config)
    return lambda params, batch: task_loss(model, params, batch)[0]


@functools.lru_cache(maxsize=8)
def _first_order(config: VLMConfig, paths: tuple[str, ...]) -> Callable[..., dict[str, Array]]:
    """A jitted `scores(chosen, rest, batch)`: Σ_ij |W_ij|·|∂L/∂W_ij| per matrix of `chosen`; one per model."""
    loss = _loss(config)

    @jax.jit
    def scores(chosen: dict[str, Array], rest: dict[str, Array], batch: dict[str, Array]) -> dict[str, Array]:
        grads = jax.grad(lambda c: loss(unflatten(rest | c), batch))(chosen)
        return {p: jnp.sum(jnp.abs(chosen[p]) * jnp.abs(grads[p])) for p in paths}

    return scores


def first_order_scores(params: PyTree, config: VLMConfig, batches: Sequence[dict[str, Array]],
                       paths: Sequence[str]) -> dict[str, float]:
    """`{path: Σ_b Σ_ij |W_ij|·|∂L_b/∂W_ij|}` for the weight matrices at `paths`."""
    scores = _first_order(config, tuple(paths))
    flat = jax.device_put(dict(flatten(params)))  # once, not once per batch
    chosen = {p: flat[p] for p in paths}
    rest = {p: v for p, v in flat.items() if p not in chosen}
    total = {p: 0.0 for p in paths}
    for batch in batches:
        for p, value in jax.device_get(scores(chosen, rest, batch)).items():
            total[p] += float(value)
    return total


@functools.lru_cache(maxsize=8)
def _projection(config: VLMConfig, paths: tuple[str, ...]) -> Callable[..., Array]:
    """A jitted `g(flat, batch, key, index, eps)`: (L(W + εz) − L(W − εz)) / 2ε for matrix `paths[index]`.

    z ~ N(0, I) is drawn from `fold_in(key, index)` for that matrix alone (`lax.switch`), so one
    compilation serves every matrix (and every later call on the same model) and only one matrix's
    noise is generated per call.
    """
    loss = _loss(config)

    def noise(i: int) -> Callable[[dict[str, Array], Array], dict[str, Array]]:
        def draw(flat: dict[str, Array], key: Array) -> dict[str, Array]:
            return {p: jax.random.normal(jax.random.fold_in(key, i), flat[p].shape, jnp.float32) if j == i
                    else jnp.zeros(flat[p].shape, jnp.float32) for j, p in enumerate(paths)}
        return draw

    @jax.jit
    def g(flat: dict[str, Array], batch: dict[str, Array], key: Array, index: Array, eps: Array) -> Array:
        z = jax.lax.switch(index, [noise(i) for i in range(len(paths))], flat, key)

        def moved(scale: Array) -> PyTree:
            return unflatten(flat | {p: (flat[p].astype(jnp.float32) + scale * z[p]).astype(flat[p].dtype)
                                     for p in paths})

        return (loss(moved(eps), batch) - loss(moved(-eps), batch)) / (2 * eps)

    return g


def zeroth_order_projections(params: PyTree, config: VLMConfig, batches: Sequence[dict[str, Array]],
                             paths: Sequence[str], key: Array, eps: float = NOISE_EPS) -> np.ndarray:
    """`g[b, i] = (L_b(W + εz) − L_b(W − εz)) / 2ε` for matrix `paths[i]` along z_i ~ N(0, I) of batch b.

    z_i is `normal(fold_in(fold_in(key, b), i))`; g estimates ⟨∇W L_b, z_i⟩ without a backward pass.
    """
    if not eps > 0:
        raise ValueError(f"perturbation size {eps!r} must be positive")
    g = _projection(config, tuple(paths))
    flat = jax.device_put(dict(flatten(params)))  # once, not once per matrix and batch
    rows = []
    for b, batch in enumerate(batches):
        batch_key = jax.random.fold_in(key, b)
        rows.append([g(flat, batch, batch_key, jnp.int32(i), jnp.float32(eps)) for i in range(len(paths))])
    return np.asarray(jax.device_get(rows), np.float64).reshape(len(batches), len(paths))


def zeroth_order_scores(params: PyTree, config: VLMConfig, batches: Sequence[dict[str, Array]],
                        paths: Sequence[str], key: Array, eps: float = NOISE_EPS) -> dict[str, float]:
    """`{path: Σ_b Σ_ij |W_ij|·|g_b| / √(2n/π)}` with g_b the ±ε finite difference along a Gaussian z."""
    g = zeroth_order_projections(params, config, batches, paths, key, eps)
    flat = dict(flatten(params))
    scores = {}
    for i, p in enumerate(paths):
        size = int(np.prod(np.shape(flat[p])))
        l1 = float(jnp.sum(jnp.abs(jnp.asarray(flat[p], jnp.float32))))
        scores[p] = l1 * float(np.abs(g[:, i]).sum()) / math.sqrt(2 * size / math.pi)
    return scores


def importance_scores(params: PyTree, config: VLMConfig, calibration: Carry, paths: Sequence[str],
                      order: str = "zeroth", key: Array | None = None, batches: int = ECOFLAP_BATCHES
                      ) -> dict[str, float]:
    """ECoFLaP's `{path: importance}` of the matrices at `paths`, zeroth- or first-order."""
    if order not in ("zeroth", "first"):
        raise ValueError(f"importance order {order!r} is not one of zeroth, first")
    data = loss_batches(calibration, batches)
    if order == "first":
        return first_order_scores(params, config, data, paths)
    return zeroth_order_scores(params, config, data, paths, jax.random.key(0) if key is None else key)


def allocation_ratios(
    allocation: str,
    params: PyTree,
    config: VLMConfig,
    spec: SparsitySpec,
    calibration: Carry | None,
    max_layer_sparsity: float = 0.8,
    key: Array | None = None,
    batches: int = ECOFLAP_BATCHES,
    scores: dict[str, float] | None = None,
) -> dict[str, float]:
    """Per-layer ratios for an allocation name: `uniform`, or ECoFLaP's global budget by `ecoflap-{zeroth,first}` importance.

    ECoFLaP's importance is computed for every prunable matrix (so one set of `scores` serves any
    spec; pass them to reuse them) and spent over the spec's pruned towers (`global_ratios`).
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation {allocation!r} is not one of {', '.join(ALLOCATIONS)}")
    if allocation == "uniform":
        return uniform_ratios(params, spec)
    if scores is None:
        if calibration is None:
            raise ValueError(f"{allocation} allocation needs calibration data")
        scores = importance_scores(params, config, calibration, prunable_paths(params), ECOFLAP_ORDERS[allocation],
                                   key, batches)
    return global_ratios(params, spec, scores, max_layer_sparsity)
