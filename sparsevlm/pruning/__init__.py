"""Pruning: criteria (scores), patterns (score → mask), allocation (how sparse), calibration (block-wise).

The methods and what each needs are one table, `registry.METHODS`. Names are exported lazily, so
importing a light module of the package (the registry) does not load JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "METHODS": "sparsevlm.pruning.registry",
    "PruneResult": "sparsevlm.pruning.pruner",
    "prune": "sparsevlm.pruning.pruner",
    "prune_layer": "sparsevlm.pruning.pruner",
    "global_ratios": "sparsevlm.pruning.allocation",
    "uniform_ratios": "sparsevlm.pruning.allocation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparsevlm.pruning' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
