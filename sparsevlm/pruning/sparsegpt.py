"""SparseGPT (Frantar & Alistarh, 2023): prune one layer with OBS error compensation.

Works on the Flax kernel `[in, out]` (row j holds input j's weights, the reference's column j of
`W = kernelᵀ`) and the input Hessian `H = XᵀX`. Inputs are processed in blocks of `block_size`; each
pruned weight's error is spread over the block's later inputs through the upper Cholesky factor U of
H⁻¹, and the block's accumulated error then updates all later inputs at once (the reference's lazy
batch update, `W[:, i2:] -= Err @ Hinv[i1:i2, i2:]`). Inside a block the same is done again one level
down: the sequential sweep runs over tiles of a few inputs, each tile's error reaching the rest of the
block by one matrix product, so the per-input step touches a tile, not the whole block. Masks are
chosen per block from the already-updated weights by the OBS saliency `w² / U_jj²` (for N:M, per
group when the sweep reaches it). The whole layer is one compiled call.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm.config import N_OF_M, UNSTRUCTURED, UNSTRUCTURED_LAYER, Pattern, num_pruned
from sparsevlm.pruning.criteria import LayerStats
from sparsevlm.pruning.patterns import lowest, lowest_in_groups

Array = jax.Array

TILE = 16  # inputs per step of the in-block sweep (rounded to a divisor of the block holding whole N:M groups)


def inverse_hessian_factor(hessian: Array, damp: float) -> tuple[Array, Array]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (λ = `damp` · mean diag) and the dead-input flags."""
    hessian = jnp.asarray(hessian, jnp.float32)
    size = hessian.shape[0]
    dead = jnp.diag(hessian) == 0
    # An input that is always zero carries no information; SparseGPT gives it unit curvature.
    hessian = hessian + jnp.diag(dead.astype(jnp.float32))
    hessian = hessian + damp * jnp.mean(jnp.diag(hessian)) * jnp.eye(size, dtype=jnp.float32)
    # With H = R Rᵀ, R upper (the Cholesky factor of H with inputs in reverse order, reversed back),
    # (H⁻¹) = R⁻ᵀ R⁻¹, so U = R⁻¹: one factorisation and one triangular solve, half the work of
    # inverting H and factorising the inverse as the reference does, and the same U.
    upper = jnp.linalg.cholesky(hessian[::-1, ::-1])[::-1, ::-1]
    return jax.scipy.linalg.solve_triangular(upper, jnp.eye(size, dtype=jnp.float32), lower=False), dead


def _tile_size(block_size: int, step: int) -> int:
    """The largest divisor of `block_size` that is a multiple of `step` and at most max(TILE, step)."""
    return max(t for t in range(step, max(TILE, step) + 1, step) if block_size % t == 0)


def _sweep(block: Array, pruned: Array, factor: Array, pattern: Pattern) -> tuple[Array, Array, Array]:
    """OBS over one block `[count, out]` in input order; returns (updated block, pruned, errors)."""
    count = block.shape[0]
    step = pattern.m if pattern.kind == N_OF_M else 1
    size = _tile_size(count, step)

    def group(g: Array, carry: tuple[Array, Array, Array, Array]) -> tuple[Array, Array, Array, Array]:
        tile, tile_pruned, tile_factor, errors = carry
        first = g * step
        if pattern.kind == N_OF_M:
            # N:M groups are chosen when the sweep reaches them, from the weights updated so far.
            weights = jax.lax.dynamic_slice_in_dim(tile, first, step)
            scale = jax.lax.dynamic_slice_in_dim(jnp.diag(tile_factor), first, step)
            drop = lowest_in_groups(weights**2 / scale[:, None] ** 2, pattern.m - pattern.n, axis=0)
            tile_pruned = jax.lax.dynamic_update_slice_in_dim(tile_pruned, drop, first, 0)
        for k in range(step):
            i = first + k
            w = tile[i]
            q = jnp.where(tile_pruned[i], 0.0, w)
            error = (w - q) / tile_factor[i, i]
            # U is upper triangular: its row i is zero before input i, so earlier inputs stay as they are.
            tile = (tile - tile_factor[i][:, None] * error[None, :]).at[i].set(q)
            errors = errors.at[i].set(error)
        return tile, tile_pruned, tile_factor, errors

    def tile_step(t: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        block, pruned, errors = carry
        first = t * size
        tile = jax.lax.dynamic_slice_in_dim(block, first, size)
        tile_pruned = jax.lax.dynamic_slice_in_dim(pruned, first, size)
        tile_factor = jax.lax.dynamic_slice(factor, (first, first), (size, size))
        tile, tile_pruned, _, tile_errors = jax.lax.fori_loop(
            0, size // step, group, (tile, tile_pruned, tile_factor, jnp.zeros_like(tile)))
        # The tile's error reaches the block's later inputs in one product.
        coupling = jax.lax.dynamic_slice_in_dim(factor, first, size)
        coupling = jnp.where(jnp.arange(count)[None, :] >= first + size, coupling, 0.0)
        block = jax.lax.dynamic_update_slice_in_dim(block - coupling.T @ tile_errors, tile, first, 0)
        pruned = jax.lax.dynamic_update_slice_in_dim(pruned, tile_pruned, first, 0)
        errors = jax.lax.dynamic_update_slice_in_dim(errors, tile_errors, first, 0)
        return block, pruned, errors

    return jax.lax.fori_loop(0, count // size, tile_step, (block, pruned, jnp.zeros_like(block)))


@partial(jax.jit, static_argnames=("pattern", "block_size"))
def _sparsegpt(kernel: Array, hessian: Array, budgets: Array, pattern: Pattern, block_size: int,
               damp: float) -> tuple[Array, Array]:
    fan_in, fan_out = kernel.shape
    factor, dead = inverse_hessian_factor(hessian, damp)
    blocks = -(-fan_in // block_size)
    padded = blocks * block_size
    # Pad the inputs to whole blocks: zero weights, unit curvature, never chosen, cut off at the end.
    weights = jnp.zeros((padded, fan_out), jnp.float32).at[:fan_in].set(
        jnp.where(dead[:, None], 0.0, kernel.astype(jnp.float32)))
    factor = jnp.eye(padded, dtype=jnp.float32).at[:fan_in, :fan_in].set(factor)
    real = jnp.arange(padded) < fan_in

    def one_block(b: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        weights, pruned = carry
        start = b * block_size
        block = jax.lax.dynamic_slice_in_dim(weights, start, block_size)
        block_factor = jax.lax.dynamic_slice(factor, (start, start), (block_size, block_size))
        saliency = block**2 / jnp.diag(block_factor)[:, None] ** 2
        saliency = jnp.where(jax.lax.dynamic_slice_in_dim(real, start, block_size)[:, None], saliency, jnp.inf)
        if pattern.kind == UNSTRUCTURED:
            chosen = lowest(saliency, budgets[b], axis=0)
        elif pattern.kind == UNSTRUCTURED_LAYER:
            # Ranked over the block in the reference's [out, in] order, so ties fall as they do there.
            chosen = lowest(saliency.T.reshape(-1), budgets[b], axis=0).reshape(fan_out, block_size).T
        else:
            chosen = jnp.zeros(block.shape, bool)
        block, chosen, errors = _sweep(block, chosen, block_factor, pattern)
        weights = jax.lax.dynamic_update_slice_in_dim(weights, block, start, 0)
        pruned = jax.lax.dynamic_update_slice_in_dim(pruned, chosen, start, 0)

        # The block's error reaches only the inputs after it, one block-sized tile at a time.
        def later(j: Array, weights: Array) -> Array:
            at = j * block_size
            coupling = jax.lax.dynamic_slice(factor, (start, at), (block_size, block_size))
            current = jax.lax.dynamic_slice_in_dim(weights, at, block_size)
            return jax.lax.dynamic_update_slice_in_dim(weights, current - coupling.T @ errors, at, 0)

        return jax.lax.fori_loop(b + 1, blocks, later, weights), pruned

    weights, pruned = jax.lax.fori_loop(0, blocks, one_block, (weights, jnp.zeros(weights.shape, bool)))
    return weights[:fan_in].astype(kernel.dtype), ~pruned[:fan_in]


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
    if block_size <= 0:
        raise ValueError(f"block_size={block_size} must be positive")
    pattern.check_shape(kernel.shape)
    if pattern.kind == N_OF_M and block_size % pattern.m:
        raise ValueError(f"block_size={block_size} must be a multiple of M={pattern.m}")
    # Cumulative budgets, so that the per-block counts add up to exactly the pattern's total.
    per_unit = fan_out if pattern.kind == UNSTRUCTURED_LAYER else 1
    edges = [min(start, fan_in) * per_unit for start in range(0, fan_in + block_size, block_size)]
    budgets = np.diff([num_pruned(edge, sparsity) for edge in edges]).astype(np.int32)
    return _sparsegpt(kernel, hessian, budgets, pattern, block_size, jnp.float32(damp))


def prune_layer(kernel: Array, stats: LayerStats | None, pattern: Pattern, sparsity: float, key: Array | None,
                options: None = None) -> tuple[Array, Array]:
    """SparseGPT as a registered method (`sparsevlm.pruning.registry`): needs the inputs' Hessian."""
    if stats is None or stats.hessian is None:
        raise ValueError("sparsegpt needs the inputs' Hessian XᵀX")
    return sparsegpt(kernel, stats.hessian, pattern, sparsity)
