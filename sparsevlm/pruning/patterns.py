"""Selection: turn a score per weight into a boolean keep-mask under a sparsity `Pattern`.

Kernels are Flax `[in, out]`: an output unit ("row" in the PyTorch `[out, in]` sense the papers
use) is a column here, and N:M groups run along the input axis (axis 0), as Wanda and SparseGPT
group them. The lowest scores are pruned; among equal scores the earlier position goes first, as a
stable sort orders them (`torch.sort(stable=True)` in the references).

Choosing the `count` lowest of a row needs one order statistic, the row's `count`-th smallest score.
XLA's CPU sort and top-k run a scalar comparator loop (~100x slower than NumPy on a 4096² layer),
so on a CPU the threshold comes from NumPy's linear-time `np.partition` through a host callback (the
buffers already live in host memory); on a GPU or TPU XLA's own sort gives it. The choice is made
when the function is lowered (`jax.lax.platform_dependent`), and both give the same mask.
"""

from __future__ import annotations

from functools import partial
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm.config import UNSTRUCTURED, UNSTRUCTURED_LAYER, Pattern, num_pruned

Array = jax.Array


def _fill_ties(scores: Any, threshold: Any, count: Any, xp: ModuleType) -> Any:
    """Below the threshold, plus the threshold's ties in position order while the budget lasts (last axis)."""
    below = scores < threshold
    tied = scores == threshold
    room = count - xp.sum(below, axis=-1, keepdims=True, dtype=xp.int32)
    return below | (tied & (xp.cumsum(tied, axis=-1, dtype=xp.int32) <= room))


def _lowest_host(scores: np.ndarray, count: np.ndarray) -> np.ndarray:
    """`lowest` along the last axis in NumPy: `np.partition` for the threshold."""
    scores, count = np.asarray(scores), int(count)
    if count <= 0:
        return np.zeros(scores.shape, bool)
    if count >= scores.shape[-1]:
        return np.ones(scores.shape, bool)
    threshold = np.partition(scores, count - 1, axis=-1)[..., count - 1 : count]
    below = scores < threshold
    if np.all(np.sum(below | (scores == threshold), axis=-1) <= count):  # no tie to split: the usual case
        return below | (scores == threshold)
    return _fill_ties(scores, threshold, count, np)


def _lowest_device(scores: Array, count: Array) -> Array:
    """`lowest` along the last axis with XLA's sort (GPU, TPU)."""
    length = scores.shape[-1]
    ordered = jnp.sort(scores, axis=-1)
    threshold = jax.lax.dynamic_slice_in_dim(ordered, jnp.clip(count - 1, 0, length - 1), 1, axis=-1)
    below, tied = scores < threshold, scores == threshold
    split = jnp.any(jnp.sum(below | tied, axis=-1) > count)
    # The running count along the row costs as much as the sort on some backends: only when a tie straddles the budget.
    chosen = jax.lax.cond(split, lambda: _fill_ties(scores, threshold, count, jnp), lambda: below | tied)
    return chosen & (count > 0)


def _lowest_last(scores: Array, count: Array) -> Array:
    host = partial(jax.pure_callback, _lowest_host, jax.ShapeDtypeStruct(scores.shape, jnp.bool_),
                   vmap_method="sequential")
    return jax.lax.platform_dependent(scores, count, cpu=host, default=_lowest_device)


def lowest(scores: Array, count: int | Array, axis: int) -> Array:
    """Boolean mask of the `count` lowest scores along `axis`; ties go to the earlier position.

    `count` is one number for every row and may be traced. NaN scores are never chosen.
    """
    if scores.shape[axis] == 0:
        return jnp.zeros(scores.shape, bool)
    moved = jnp.moveaxis(scores, axis, -1)
    return jnp.moveaxis(_lowest_last(moved, jnp.asarray(count, jnp.int32)), -1, axis)


def lowest_in_groups(scores: Array, count: int, axis: int) -> Array:
    """`lowest` for short groups (N:M's M) by pairwise comparison: no sort, the same on every backend."""
    moved = jnp.moveaxis(scores, axis, -1)
    size = moved.shape[-1]
    earlier = jnp.arange(size)[:, None] > jnp.arange(size)[None, :]  # [i, j]: j comes before i
    a, b = moved[..., :, None], moved[..., None, :]
    rank = jnp.sum((b < a) | ((b == a) & earlier), axis=-1)
    return jnp.moveaxis(rank < count, -1, axis)


@partial(jax.jit, static_argnames=("pattern", "sparsity"))
def select(scores: Array, pattern: Pattern, sparsity: float) -> Array:
    """Keep-mask (True = kept) of a `[in, out]` score matrix: the lowest scores are pruned."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D [in, out] kernel score, got shape {scores.shape}")
    fan_in = scores.shape[0]
    if pattern.kind == UNSTRUCTURED:
        return ~lowest(scores, num_pruned(fan_in, sparsity), axis=0)
    if pattern.kind == UNSTRUCTURED_LAYER:
        return ~lowest(scores.reshape(-1), num_pruned(scores.size, sparsity), axis=0).reshape(scores.shape)
    pattern.check_shape(scores.shape)
    grouped = scores.reshape(fan_in // pattern.m, pattern.m, scores.shape[1])
    return ~lowest_in_groups(grouped, pattern.m - pattern.n, axis=1).reshape(scores.shape)
