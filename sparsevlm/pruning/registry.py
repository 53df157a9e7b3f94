"""The pruning methods: one entry each, saying what the method needs and which function prunes a layer.

A method is a function that prunes one Flax `[in, out]` kernel,

    layer(kernel, stats, pattern, sparsity, key, options) -> (new kernel, keep-mask)

where `stats` are the calibration statistics of the layer's inputs (`LayerStats`; None for methods
that need no calibration), `pattern` a `Pattern`, `key` a PRNG key for this layer and `options` the
method's own settings (None unless the method has some). Everything else — calibration passes,
per-layer ratios, sharding, masks, reports, the command line — reads this table, so a new method
is one module with its layer function plus one line here (docs/new-pruning-method.md).

The table imports nothing: layer functions are named `"module:function"` and imported on first use,
so the command line lists the methods without loading JAX.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Method:
    """One pruning method's facts.

    `needs_hessian` is a bool, or a function of the method's options (DSnoT needs XᵀX only when it
    starts from SparseGPT or guards its swaps). `options` names the `PruneConfig` field that holds the
    method's settings, passed to the layer function as `options`.
    """

    layer: str  # "module:function"
    needs_calibration: bool
    needs_hessian: bool | Callable[[Any], bool] = False
    options: str | None = None

    def layer_function(self) -> Callable[..., Any]:
        """The layer function, imported on first use."""
        module, _, name = self.layer.partition(":")
        return getattr(importlib.import_module(module), name)

    def hessian(self, options: Any = None) -> bool:
        """Whether pruning with these options needs the inputs' Hessian XᵀX."""
        return self.needs_hessian(options) if callable(self.needs_hessian) else self.needs_hessian


def _dsnot_needs_hessian(options: Any) -> bool:
    return options is not None and (options.init == "sparsegpt" or options.guard)


METHODS: dict[str, Method] = {
    "magnitude": Method("sparsevlm.pruning.criteria:prune_magnitude", needs_calibration=False),
    "random": Method("sparsevlm.pruning.criteria:prune_random", needs_calibration=False),
    "wanda": Method("sparsevlm.pruning.criteria:prune_wanda", needs_calibration=True),
    "sparsegpt": Method("sparsevlm.pruning.sparsegpt:prune_layer", needs_calibration=True, needs_hessian=True),
    "dsnot": Method("sparsevlm.pruning.dsnot:prune_layer", needs_calibration=True,
                    needs_hessian=_dsnot_needs_hessian, options="dsnot"),
}


def method(name: str) -> Method:
    """The registered method `name`; a clear error naming the allowed ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"pruning method {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]
