"""SparseGPT (Frantar & Alistarh, 2023): prune one layer with OBS error compensation.

Works on the PyTorch-layout matrix `W = kernelᵀ` `[out, in]` and the input Hessian `H = XᵀX`.
Columns are processed in blocks; inside a block, each pruned weight's error is spread over the
block's later columns through the upper Cholesky factor of H⁻¹, and the block's accumulated error
updates all later columns at once (lazy batch updates). Masks are chosen per block from the
already-updated weights by the OBS saliency `w² / [H⁻¹]_jj²`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm.config import N_OF_M, UNSTRUCTURED, UNSTRUCTURED_LAYER, Pattern, num_pruned
from sparsevlm.pruning.criteria import LayerStats
from sparsevlm.pruning.patterns import ranks

Array = jax.Array


def inverse_hessian_factor(hessian: Array, damp: float) -> tuple[Array, Array]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (λ = `damp` · mean diag) and the dead-input flags."""
    hessian = jnp.asarray(hessian, jnp.float32)
    diag = jnp.diag(hessian)
    dead = diag == 0
    # An input that is always zero carries no information; SparseGPT gives it unit curvature.
    hessian = hessian + jnp.diag(dead.astype(jnp.float32))
    hessian = hessian + damp * jnp.mean(jnp.diag(hessian)) * jnp.eye(hessian.shape[0], dtype=jnp.float32)
    lower = jnp.linalg.cholesky(hessian)
    inverse = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(hessian.shape[0], dtype=jnp.float32))
    return jnp.linalg.cholesky(inverse).T, dead


@partial(jax.jit, static_argnames=("count", "pattern"), donate_argnums=(0, 1))
def _block(weights: Array, keep: Array, factor: Array, start: Array, prune_count: Array, count: int,
           pattern: Pattern) -> tuple[Array, Array]:
    rows, cols = weights.shape
    block = jax.lax.dynamic_slice(weights, (0, start), (rows, count))
    block_factor = jax.lax.dynamic_slice(factor, (start, start), (count, count))
    diag = jnp.diag(block_factor)
    if pattern.kind == UNSTRUCTURED:
        pruned = ranks(block**2 / diag[None] ** 2, axis=1) < prune_count
    elif pattern.kind == UNSTRUCTURED_LAYER:
        saliency = (block**2 / diag[None] ** 2).reshape(-1)
        pruned = (ranks(saliency, axis=0) < prune_count).reshape(block.shape)
    else:
        pruned = jnp.zeros(block.shape, bool)

    def choose_group(i: Array, block: Array, pruned: Array) -> Array:
        # N:M groups are chosen when the sweep reaches them, from the weights updated so far.
        group = jax.lax.dynamic_slice(block, (0, i), (rows, pattern.m))
        group_diag = jax.lax.dynamic_slice(diag, (i,), (pattern.m,))
        drop = ranks(group**2 / group_diag[None] ** 2, axis=1) < pattern.m - pattern.n
        return jax.lax.dynamic_update_slice(pruned, drop, (0, i))

    def column(i: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        block, pruned, errors = carry
        if pattern.kind == N_OF_M:
            pruned = jax.lax.cond(i % pattern.m == 0, choose_group, lambda i, b, p: p, i, block, pruned)
        w = block[:, i]
        q = jnp.where(pruned[:, i], 0.0, w)
        error = (w - q) / block_factor[i, i]
        # The factor is upper triangular, so its row i is zero left of column i: this touches only
        # columns i.. of the block, and sets column i to q exactly.
        block = block - error[:, None] * block_factor[i][None, :]
        block = block.at[:, i].set(q)
        return block, pruned, errors.at[:, i].set(error)

    block, pruned, errors = jax.lax.fori_loop(
        0, count, column, (block, pruned, jnp.zeros_like(block))
    )
    weights = jax.lax.dynamic_update_slice(weights, block, (0, start))
    if cols % count == 0:
        # The block's error reaches only the columns right of it, one block-wide tile at a time (as the
        # reference's `W[:, i2:] -= Err @ Hinv[i1:i2, i2:]`): half the FLOPs of updating every column.
        def tile(j: Array, weights: Array) -> Array:
            at = j * count
            update = errors @ jax.lax.dynamic_slice(factor, (start, at), (count, count))
            current = jax.lax.dynamic_slice(weights, (0, at), (rows, count))
            return jax.lax.dynamic_update_slice(weights, current - update, (0, at))

        weights = jax.lax.fori_loop(start // count + 1, cols // count, tile, weights)
    else:  # a ragged last block: every column at once, the earlier ones masked out
        trailing = errors @ jax.lax.dynamic_slice(factor, (start, 0), (count, cols))
        later = jnp.arange(cols) >= start + count
        weights = weights - jnp.where(later[None, :], trailing, 0.0)
    keep = jax.lax.dynamic_update_slice(keep, ~pruned, (0, start))
    return weights, keep


def sparsegpt(
    kernel: Array,
    hessian: Array,
    pattern: Pattern,
    sparsity: float,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[Array, Array]:
    """Prune a Flax `[in, out]` kernel given its inputs' `XᵀX`; returns `(updated kernel, keep-mask)`."""
    fan_in, fan_out = kernel.shape
    if hessian.shape != (fan_in, fan_in):
        raise ValueError(f"hessian shape {hessian.shape} does not match kernel input dimension {fan_in}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
    pattern.check_shape(kernel.shape)
    if pattern.kind == N_OF_M and block_size % pattern.m:
        raise ValueError(f"block_size={block_size} must be a multiple of M={pattern.m}")
    factor, dead = inverse_hessian_factor(hessian, damp)
    weights = jnp.where(dead[None, :], 0.0, jnp.asarray(kernel, jnp.float32).T)
    keep = jnp.ones(weights.shape, bool)
    # Cumulative budgets so that per-block counts add up to exactly the pattern's total.
    per_unit = fan_out if pattern.kind == UNSTRUCTURED_LAYER else 1
    for start in range(0, fan_in, block_size):
        stop = min(start + block_size, fan_in)
        budget = num_pruned(stop * per_unit, sparsity) - num_pruned(start * per_unit, sparsity)
        weights, keep = _block(weights, keep, factor, np.int32(start), np.int32(budget), stop - start, pattern)
    return weights.T.astype(kernel.dtype), keep.T


def prune_layer(kernel: Array, stats: LayerStats | None, pattern: Pattern, sparsity: float, key: Array | None,
                options: None = None) -> tuple[Array, Array]:
    """SparseGPT as a registered method (`sparsevlm.pruning.registry`): needs the inputs' Hessian."""
    if stats is None or stats.hessian is None:
        raise ValueError("sparsegpt needs the inputs' Hessian XᵀX")
    return sparsegpt(kernel, stats.hessian, pattern, sparsity)
