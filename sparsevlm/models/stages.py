"""A model's forward pass as a chain of stages: the model runs the chain, calibration runs it one block at a time.

Each tower states its forward pass once, as a list of `Stage`s over a *carry* (a dict of arrays:
the hidden state `x` and whatever later stages read, e.g. masks, positions, a KV cache). The tower's
own `__call__` runs that list on its bound submodules (`run_stages`); block-wise calibration runs
the same list stage by stage, each on its own params subtree (`Stage.apply`), so there is no second
copy of the forward pass to drift out of step. Every carry entry has the batch as its leading axis,
or a leading axis of 1 when it is shared by all rows (a position bias); only `cache` (a list of
per-layer KV caches) and `cache_index` do not.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn

PyTree = Any
Carry = dict[str, Any]
# call(*args, method=None): run the stage's module (its `__call__`, or the named method).
Call = Callable[..., Any]
StageFn = Callable[[Call, Carry, "int | None"], Carry]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the forward pass: `carry = fn(call, carry, layer)`.

    `prefix` is the `/`-joined path of the module the step runs, relative to the model that owns the
    list; `module` is that module's definition (unbound), `call` runs it, and `layer` is a block's
    index in its stack (it picks the block's KV cache slot), None for other steps. Blocks of one
    stack share `module` and `fn`, so a driver that jit-compiles `(module, fn)` compiles once per stack.
    """

    prefix: str
    module: nn.Module
    fn: StageFn
    layer: int | None = None

    def apply(self, params: PyTree, carry: Carry) -> Carry:
        """Run this step alone on its params subtree (the module's `params` collection)."""
        return self.fn(functools.partial(_call_unbound, self.module, params), carry, None)


def _call_unbound(module: nn.Module, params: PyTree, *args: Any, method: str | None = None) -> Any:
    return module.apply({"params": params}, *args, method=method)


def _call_bound(module: nn.Module, *args: Any, method: str | None = None) -> Any:
    return getattr(module, method or "__call__")(*args)


def submodule(root: nn.Module, prefix: str) -> nn.Module:
    """The bound submodule of `root` at `prefix` (`blocks_3` is the fourth of a `blocks` list)."""
    node = root
    for part in filter(None, prefix.split("/")):
        name, sep, index = part.rpartition("_")
        children = getattr(node, name, None) if sep and index.isdigit() else None
        node = children[int(index)] if isinstance(children, (list, tuple)) else getattr(node, part)
    return node


def run_stages(root: nn.Module, stages: Sequence[Stage], carry: Carry) -> Carry:
    """Run `stages` (prefixes relative to the bound module `root`) from `carry`; returns the last carry."""
    for stage in stages:
        carry = stage.fn(functools.partial(_call_bound, submodule(root, stage.prefix)), carry, stage.layer)
    return carry


def prefixed(stages: Sequence[Stage], prefix: str) -> list[Stage]:
    """The same stages as seen from a parent module that holds their owner at `prefix`."""
    return [dataclasses.replace(s, prefix="/".join(filter(None, (prefix, s.prefix)))) for s in stages]


def subtree(params: PyTree, prefix: str) -> PyTree:
    """The params subtree at a `/`-joined prefix (the whole tree for the empty prefix)."""
    node = params
    for key in filter(None, prefix.split("/")):
        node = node[key]
    return node


def layer_cache(carry: Carry, layer: int | None) -> Any:
    """Block `layer`'s KV cache from the carry, or None when the carry holds none."""
    cache = carry.get("cache")
    return None if cache is None else cache[layer]


def with_layer_cache(carry: Carry, layer: int | None, new: Any) -> Carry:
    """The carry with block `layer`'s KV cache replaced (unchanged when it holds none)."""
    cache = carry.get("cache")
    if cache is None:
        return carry
    return carry | {"cache": [*cache[:layer], new, *cache[layer + 1:]]}


def carry_batch_size(carry: Carry) -> int:
    """The carry's batch size (the largest leading axis; shared entries have 1)."""
    return max(int(v.shape[0]) for k, v in carry.items() if k not in ("cache", "cache_index") and hasattr(v, "shape"))


def is_shared(value: Any, batch: int) -> bool:
    """True for a carry entry with a leading axis of 1 that every row of a larger batch shares."""
    return batch != 1 and getattr(value, "shape", (batch,))[0] == 1

