"""Pruning criteria: a score per weight of a Flax `[in, out]` kernel; low scores are pruned first.

A criterion becomes a pruning method with `by_score`: score, then select under the pattern
(`patterns.select`). Magnitude, random and Wanda are registered this way (`registry.METHODS`).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from sparsevlm.config import Pattern
from sparsevlm.masks import mask_weights
from sparsevlm.pruning.patterns import select

Array = jax.Array


class LayerStats(NamedTuple):
    """Calibration statistics of one linear's inputs X `[tokens, in]` (padding tokens excluded)."""

    sq_norm: Array  # [in]: ‖X_j‖₂² per input feature
    hessian: Array | None  # [in, in]: XᵀX, when the method needs it
    tokens: Array  # scalar: how many tokens were seen
    total: Array | None = None  # [in]: Σ_t X_tj per input feature (DSnoT's expected input)

    @property
    def mean(self) -> Array:
        """E[x_j] over the calibration tokens."""
        if self.total is None:
            raise ValueError("these statistics carry no input sums (LayerStats.total)")
        return self.total / jnp.maximum(self.tokens, 1)

    @property
    def variance(self) -> Array:
        """Var[x_j] over the calibration tokens (population variance, E[x²] − E[x]²)."""
        return jnp.maximum(self.sq_norm / jnp.maximum(self.tokens, 1) - self.mean**2, 0.0)


def magnitude(kernel: Array, stats: LayerStats | None, key: Array | None) -> Array:
    """|W|."""
    return jnp.abs(kernel)


def random(kernel: Array, stats: LayerStats | None, key: Array | None) -> Array:
    """Uniform random scores from `key` (random pruning)."""
    if key is None:
        raise ValueError("random pruning needs a PRNG key")
    return jax.random.uniform(key, kernel.shape)


def wanda(kernel: Array, stats: LayerStats | None, key: Array | None) -> Array:
    """Wanda: |W_ij| · ‖X_i‖₂ (input feature i, output unit j)."""
    if stats is None:
        raise ValueError("wanda needs calibration statistics")
    return jnp.abs(kernel) * jnp.sqrt(stats.sq_norm)[:, None]


Criterion = Callable[[Array, "LayerStats | None", "Array | None"], Array]
LayerFunction = Callable[..., tuple[Array, Array]]


@partial(jax.jit, static_argnames=("criterion", "pattern", "sparsity"))
def _score_and_select(kernel: Array, stats: LayerStats | None, key: Array | None, criterion: Criterion,
                      pattern: Pattern, sparsity: float) -> tuple[Array, Array]:
    keep = select(criterion(kernel, stats, key), pattern, sparsity)
    return mask_weights(kernel, keep), keep


def by_score(criterion: Criterion) -> LayerFunction:
    """A registry layer function that keeps the highest `criterion` scores under the pattern."""

    def layer(kernel: Array, stats: LayerStats | None, pattern: Pattern, sparsity: float, key: Array | None,
              options: Any = None) -> tuple[Array, Array]:
        return _score_and_select(kernel, stats, key, criterion, pattern, float(sparsity))

    layer.__doc__ = f"Prune one kernel by {criterion.__name__} scores (`by_score`)."
    return layer


prune_magnitude = by_score(magnitude)
prune_random = by_score(random)
prune_wanda = by_score(wanda)
