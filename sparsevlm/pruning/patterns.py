"""Selection: turn a score per weight into a boolean keep-mask under a sparsity `Pattern`.

Kernels are Flax `[in, out]`: an output unit ("row" in the PyTorch `[out, in]` sense the papers
use) is a column here, and N:M groups run along the input axis (axis 0), as Wanda and SparseGPT
group them. The lowest scores are pruned.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from sparsevlm.config import UNSTRUCTURED, UNSTRUCTURED_LAYER, Pattern, num_pruned

Array = jax.Array


def ranks(scores: Array, axis: int) -> Array:
    """Rank of each score along `axis` (0 = lowest); ties broken by position, as torch.sort(stable=True)."""
    order = jnp.argsort(scores, axis=axis, stable=True)
    # Inverting the permutation by a scatter costs far less than a second sort on large layers.
    shape = [1] * scores.ndim
    shape[axis] = scores.shape[axis]
    positions = jnp.broadcast_to(jnp.arange(scores.shape[axis]).reshape(shape), order.shape)
    return jnp.put_along_axis(jnp.zeros_like(order), order, positions, axis=axis, inplace=False)


def lowest(scores: Array, count: int, axis: int) -> Array:
    """Boolean mask of the `count` lowest scores along `axis`; ties go to the earlier position.

    Uses `lax.top_k` (ties → lower index first, like a stable sort), several times faster than a
    full sort on large layers.
    """
    moved = jnp.moveaxis(scores, axis, -1)
    if count == 0:
        return jnp.zeros(scores.shape, bool)
    _, index = jax.lax.top_k(-moved, count)
    flat_rows = moved.reshape(-1, moved.shape[-1])
    hit = jnp.zeros(flat_rows.shape, bool).at[jnp.arange(flat_rows.shape[0])[:, None], index.reshape(-1, count)].set(True)
    return jnp.moveaxis(hit.reshape(moved.shape), -1, axis)


@partial(jax.jit, static_argnames=("pattern", "sparsity"))
def select(scores: Array, pattern: Pattern, sparsity: float) -> Array:
    """Keep-mask (True = kept) of a `[in, out]` score matrix: the lowest scores are pruned."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D [in, out] kernel score, got shape {scores.shape}")
    fan_in = scores.shape[0]
    if pattern.kind == UNSTRUCTURED:
        return ~lowest(scores, num_pruned(fan_in, sparsity), axis=0)
    if pattern.kind == UNSTRUCTURED_LAYER:
        # top_k with k in the millions is slower than one sort of the whole matrix.
        return (ranks(scores.reshape(-1), axis=0) >= num_pruned(scores.size, sparsity)).reshape(scores.shape)
    pattern.check_shape(scores.shape)
    grouped = scores.reshape(fan_in // pattern.m, pattern.m, scores.shape[1])
    return ~lowest(grouped, pattern.m - pattern.n, axis=1).reshape(scores.shape)
