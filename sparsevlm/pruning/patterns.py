"""Sparsity patterns: turn a score per weight into a boolean keep-mask.

Kernels are Flax `[in, out]`: an output unit ("row" in the PyTorch `[out, in]` sense the papers
use) is a column here, and N:M groups run along the input axis (axis 0), as Wanda and SparseGPT
group them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from functools import partial

import jax
import jax.numpy as jnp

Array = jax.Array

UNSTRUCTURED = "unstructured"
UNSTRUCTURED_LAYER = "unstructured-layer"
PATTERN_HELP = f"{UNSTRUCTURED} (per output row), {UNSTRUCTURED_LAYER} (whole matrix), or N:M (N of every M kept)"


@dataclasses.dataclass(frozen=True)
class Pattern:
    """How pruned weights are grouped: `row`, `layer`, or `n_of_m` (keep `n` of every `m` inputs)."""

    kind: str
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("row", "layer", "n_of_m"):
            raise ValueError(f"pattern kind {self.kind!r} is not one of row, layer, n_of_m")
        if self.kind == "n_of_m" and not 0 < self.n < self.m:
            raise ValueError(f"N:M pattern {self.n}:{self.m} needs 0 < N < M (N of every M weights are kept)")

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        """`unstructured`, `unstructured-layer`, or `N:M` meaning N of every M consecutive inputs are kept."""
        if text == UNSTRUCTURED:
            return cls("row")
        if text == UNSTRUCTURED_LAYER:
            return cls("layer")
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if not match:
            raise ValueError(f"pattern {text!r} is not understood; allowed: {PATTERN_HELP}")
        return cls.n_of_m(int(match.group(1)), int(match.group(2)))

    @classmethod
    def n_of_m(cls, n_kept: int, m: int) -> "Pattern":
        """Keep `n_kept` of every `m` consecutive input weights of each output unit."""
        return cls("n_of_m", n_kept, m)

    @property
    def name(self) -> str:
        """The string `parse` accepts."""
        return {"row": UNSTRUCTURED, "layer": UNSTRUCTURED_LAYER}.get(self.kind, f"{self.n}:{self.m}")

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (`1 - N/M`); None for unstructured patterns."""
        return 1.0 - self.n / self.m if self.kind == "n_of_m" else None

    def check_shape(self, shape: tuple[int, ...], what: str = "kernel") -> None:
        """A clear error if an N:M pattern cannot tile the input axis of a kernel of `shape`."""
        if self.kind == "n_of_m" and shape[0] % self.m:
            raise ValueError(
                f"{what} has input dimension {shape[0]}, which is not divisible by M={self.m} "
                f"of pattern {self.name}"
            )


def num_pruned(count: int, sparsity: float) -> int:
    """Weights to prune out of `count` at `sparsity`: floor(count · sparsity), as Wanda.

    Robust to float round-off: 100 × 0.57 prunes 57 (Python's `int(100 * 0.57)` gives 56).
    """
    return int(math.floor(count * sparsity * (1 + 1e-9)))


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
    if pattern.kind == "row":
        return ~lowest(scores, num_pruned(fan_in, sparsity), axis=0)
    if pattern.kind == "layer":
        # top_k with k in the millions is slower than one sort of the whole matrix.
        return (ranks(scores.reshape(-1), axis=0) >= num_pruned(scores.size, sparsity)).reshape(scores.shape)
    pattern.check_shape(scores.shape)
    grouped = scores.reshape(fan_in // pattern.m, pattern.m, scores.shape[1])
    return ~lowest(grouped, pattern.m - pattern.n, axis=1).reshape(scores.shape)
