"""A model's forward pass as a chain of pure stages, so calibration can run it one block at a time."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

PyTree = Any
Carry = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the forward pass: `carry = fn(params_at(prefix), carry)`.

    `prefix` is the `/`-joined param subtree the stage reads. Stages of the same shape share one
    `fn` object, so a driver that jits `fn` compiles it once for all of them.
    """

    prefix: str
    fn: Callable[[PyTree, Carry], Carry]
