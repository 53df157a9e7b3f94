"""Pruning: criteria (scores), patterns (score → mask), allocation (how sparse), calibration (block-wise)."""

from sparsevlm.pruning.allocation import SparsitySpec, global_ratios, uniform_ratios
from sparsevlm.pruning.dsnot import DSnoTConfig
from sparsevlm.pruning.masks import PRUNABLE_RULES, apply_masks, measure_sparsity, prunable_paths
from sparsevlm.pruning.patterns import Pattern
from sparsevlm.pruning.prune import METHODS, PruneResult, prune, prune_layer

__all__ = [
    "DSnoTConfig",
    "METHODS",
    "PRUNABLE_RULES",
    "Pattern",
    "PruneResult",
    "SparsitySpec",
    "apply_masks",
    "global_ratios",
    "measure_sparsity",
    "prunable_paths",
    "prune",
    "prune_layer",
    "uniform_ratios",
]
