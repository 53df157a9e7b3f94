"""DSnoT (Zhang et al., ICLR 2024): training-free refinement of a pruning mask by prune-and-regrow swaps.

For output unit i the *expected reconstruction error* of a mask is
ε_i = Σ_{j pruned} W_ij·E[x_j] = E[y_dense − y_sparse]_i. Each cycle, every row whose |ε_i| is above
the threshold regrows one pruned weight and prunes one kept weight, so its kept count never changes:

- regrow the pruned weight whose contribution W_ij·E[x_j] has ε_i's sign and is largest relative to
  the input's variance (`|W_ij·E[x_j]| / Var[x_j]^p`, p = `regrow_variance_power`);
- prune the kept weight whose contribution has the *opposite* sign (so pruning it also moves ε_i
  towards zero) and whose Wanda score `|W_ij|·‖X_j‖₂`, times `Var[x_j]^q` (q =
  `prune_variance_power`), is lowest. Under N:M the pruned weight comes from the regrown weight's
  group, so every group keeps exactly N.

A swap is made only if ε_i keeps its initial sign (it never overshoots), so |ε_i| falls with every
swap; a row stops at its first rejected swap, once |ε_i| ≤ `threshold`, or after `max_cycles` cycles.

The expected error is the mean of the output error, not its size: a swap that lowers |ε_i| can still
raise the squared error ‖(W_i − Ŵ_i)X‖² over the calibration tokens. `guard=True` (not in the
published algorithm) also rejects such swaps, tracking (W_i − Ŵ_i)·XᵀX per row with the inputs'
Hessian, so the layer's squared reconstruction error never rises either.
Unlike the copy in the seed paper's code, swaps are written into the mask and stay there, and the
two candidate sets are the live mask's pruned and kept weights (a weight moved once cannot move back,
because its contribution then has the wrong sign for the other move).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from sparsevlm.config import N_OF_M, DSnoTConfig, Pattern
from sparsevlm.masks import mask_weights
from sparsevlm.pruning import registry
from sparsevlm.pruning.criteria import LayerStats

Array = jax.Array

def expected_error(kernel: Array, keep: Array, mean: Array) -> Array:
    """Σ_{j pruned} W_ji·E[x_j] per output unit i of a `[in, out]` kernel: E[y_dense − y_sparse]."""
    contribution = kernel.astype(jnp.float32) * mean.astype(jnp.float32)[:, None]
    return jnp.sum(jnp.where(keep, 0.0, contribution), axis=0)


def dsnot(kernel: Array, keep: Array, stats: LayerStats, pattern: Pattern,
          config: DSnoTConfig = DSnoTConfig()) -> tuple[Array, Array]:
    """Refine the keep-mask of a `[in, out]` kernel; returns `(new keep-mask, cycles run)`."""
    if keep.shape != kernel.shape or keep.dtype != jnp.bool_:
        raise ValueError(f"keep-mask must be bool of the kernel's shape {kernel.shape}, got {keep.dtype}{keep.shape}")
    if pattern.kind == N_OF_M:
        pattern.check_shape(kernel.shape)
    if config.guard and stats.hessian is None:
        raise ValueError("DSnoT's squared-error guard needs the inputs' Hessian XᵀX")
    hessian = stats.hessian if config.guard else None
    return _refine(kernel, keep, stats.mean, stats.variance, stats.sq_norm, hessian, pattern, float(config.threshold),
                   int(config.max_cycles), float(config.regrow_variance_power), float(config.prune_variance_power))


def squared_error(kernel: Array, keep: Array, hessian: Array) -> Array:
    """‖(W − Ŵ)ᵀX‖² per output unit of a `[in, out]` kernel, from the inputs' Hessian XᵀX."""
    removed = jnp.where(keep, 0.0, kernel.astype(jnp.float32))
    return jnp.sum(removed * (hessian.astype(jnp.float32) @ removed), axis=0)


@partial(jax.jit, static_argnames=("pattern", "threshold", "max_cycles", "regrow_power", "prune_power"))
def _refine(kernel: Array, keep: Array, mean: Array, variance: Array, sq_norm: Array, hessian: Array | None,
            pattern: Pattern, threshold: float, max_cycles: int, regrow_power: float, prune_power: float
            ) -> tuple[Array, Array]:
    # Rows are output units: work on the [out, in] transposes.
    weights = kernel.T.astype(jnp.float32)
    rows, fan_in = weights.shape
    contribution = weights * mean.astype(jnp.float32)[None, :]
    variance = jnp.maximum(variance.astype(jnp.float32), jnp.finfo(jnp.float32).tiny)
    regrow_score = jnp.abs(contribution) / variance[None, :] ** regrow_power
    prune_score = jnp.abs(weights) * jnp.sqrt(sq_norm.astype(jnp.float32))[None, :] * variance[None, :] ** prune_power
    group_size = pattern.m if pattern.kind == N_OF_M else fan_in
    group_of = jnp.arange(fan_in) // group_size
    row_index = jnp.arange(rows)

    mask = keep.T
    error = jnp.sum(jnp.where(mask, 0.0, contribution), axis=1)
    sign = jnp.sign(error)
    active = jnp.abs(error) > threshold
    guard = hessian is not None
    if guard:
        hessian = hessian.astype(jnp.float32)
        # Row i of `pull` is H·(W_i − Ŵ_i): the squared error's gradient (halved) in Ŵ_i's pruned weights.
        pull = jnp.where(mask, 0.0, weights) @ hessian
    else:
        pull = jnp.zeros((), jnp.float32)

    def swap(state: tuple[Array, Array, Array, Array, Array]) -> tuple[Array, Array, Array, Array, Array]:
        mask, error, active, cycle, pull = state
        toward = sign[:, None] * contribution
        can_regrow = ~mask & (toward > 0)
        can_prune = mask & (toward < 0)
        # A regrown weight needs a weight to prune in its group (the whole row unless N:M).
        prunable_groups = can_prune.reshape(rows, -1, group_size).any(axis=2)
        can_regrow &= jnp.repeat(prunable_groups, group_size, axis=1)
        regrow = jnp.argmax(jnp.where(can_regrow, regrow_score, -jnp.inf), axis=1)
        in_group = group_of[None, :] == group_of[regrow][:, None]
        prune = jnp.argmin(jnp.where(can_prune & in_group, prune_score, jnp.inf), axis=1)
        after = error - contribution[row_index, regrow] + contribution[row_index, prune]
        accept = active & can_regrow.any(axis=1) & (jnp.sign(after) == sign)
        if guard:
            w_r, w_k = weights[row_index, regrow], weights[row_index, prune]
            change = (-2 * w_r * pull[row_index, regrow] + w_r**2 * hessian[regrow, regrow]
                      + 2 * w_k * pull[row_index, prune] + w_k**2 * hessian[prune, prune]
                      - 2 * w_r * w_k * hessian[regrow, prune])
            accept &= change <= 0
            step = jnp.where(accept, 1.0, 0.0)
            pull = pull + step[:, None] * (w_k[:, None] * hessian[prune] - w_r[:, None] * hessian[regrow])
        mask = mask.at[row_index, regrow].set(mask[row_index, regrow] | accept)
        mask = mask.at[row_index, prune].set(mask[row_index, prune] & ~accept)
        error = jnp.where(accept, after, error)
        return mask, error, accept & (jnp.abs(error) > threshold), cycle + 1, pull

    def running(state: tuple[Array, Array, Array, Array, Array]) -> Array:
        return jnp.any(state[2]) & (state[3] < max_cycles)

    start = (mask, error, active, jnp.zeros((), jnp.int32), pull)
    mask, _, _, cycles, _ = jax.lax.while_loop(running, swap, start)
    return mask.T, cycles


def prune_layer(kernel: Array, stats: LayerStats | None, pattern: Pattern, sparsity: float, key: Array | None,
                options: DSnoTConfig | None = None) -> tuple[Array, Array]:
    """DSnoT as a registered method: `options.init`'s mask, refined; the weights stay the dense ones.

    SparseGPT's weight updates are not kept when it is the starting method: DSnoT is training-free.
    """
    options = options if options is not None else DSnoTConfig()
    if stats is None or stats.total is None:
        raise ValueError("dsnot needs calibration statistics with input sums")
    _, keep = registry.method(options.init).layer_function()(kernel, stats, pattern, sparsity, key, None)
    keep, _ = dsnot(kernel, keep, stats, pattern, options)
    return mask_weights(kernel, keep), keep
