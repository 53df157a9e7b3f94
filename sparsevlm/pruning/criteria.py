"""Pruning criteria: a score per weight of a Flax `[in, out]` kernel; low scores are pruned first."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

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
CRITERIA: dict[str, Criterion] = {"magnitude": magnitude, "random": random, "wanda": wanda}
