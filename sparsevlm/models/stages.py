"""A model's forward pass as a chain of stages: the model runs the chain, calibration runs it one block at a time.

Each tower states its forward pass once, as a list of `Stage`s over a *carry* (a dict of arrays:
the hidden state `x` and whatever later stages read, e.g. masks, positions, a KV cache). The tower's
own `__call__` runs that list on its bound submodules (`run_stages`); block-wise calibration runs
the same list stage by stage, each on its own params subtree (`Stage.apply`), so there is no second
copy of the forward pass to drift out of step. Every carry entry has the batch as its leading axis,
or a leading axis of 1 when it is shared by all rows (a position bias); only `cache` (a list of
per-layer KV caches) and `cache_index` do not.

Consecutive block stages that share their module and step form a *stack* (`blocks_0 … blocks_N-1`).
An owner module built with `scan_layers` holds such a stack as one module, `blocks`, whose params
carry a leading layer axis; `run_stages` then runs the stack as one `nn.scan` (compiled once, not
N times). `stack_layers` / `unstack_layers` convert any tree keyed by param paths (params, masks,
LoRA factors) between the two layouts, so everything outside a train step keeps `blocks_N`.
`remat` rematerialises each block in the backward pass (`REMAT_POLICIES`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm.config import REMAT_MODES
from sparsevlm.sharding import constrain_batch
from sparsevlm.tree import flatten, unflatten

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
    scannable: bool = False  # a block whose stack an owner built with `scan_layers` holds as one module

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


# Remat policy per mode: what a block keeps for the backward pass (None: no remat).
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,  # only the block's input
    "matmuls": jax.checkpoint_policies.dots_saveable,  # matmul outputs; norms, softmax, activations recomputed
}
assert tuple(REMAT_POLICIES) == REMAT_MODES


def _stack_base(stage: Stage) -> str:
    return stage.prefix.rpartition("_")[0]


def stacks(stages: Sequence[Stage]) -> list[list[Stage]]:
    """`stages` split into runs: each block stack (consecutive scannable blocks sharing module and step,
    at `…/blocks_0 … blocks_N-1`) as one run, every other stage alone."""
    runs: list[list[Stage]] = []
    for stage in stages:
        last = runs[-1][-1] if runs else None
        if (stage.scannable and last is not None and last.scannable and last.module is stage.module
                and last.fn is stage.fn and _stack_base(last) == _stack_base(stage) and stage.layer == last.layer + 1):
            runs[-1].append(stage)
        else:
            runs.append([stage])
    return runs


def scanned_stacks(stages: Sequence[Stage]) -> dict[str, int]:
    """`{stack prefix: depth}` of the block stacks a `scan_layers` model holds as one module (e.g. `language/blocks`)."""
    return {_stack_base(run[0]): len(run) for run in stacks(stages) if run[0].scannable}


def _block_fn(fn: StageFn, layer: int | None, remat: str) -> Callable[[nn.Module, Carry], Carry]:
    def body(module: nn.Module, carry: Carry) -> Carry:
        carry = fn(functools.partial(_call_bound, module), carry, layer)
        return carry | {"x": constrain_batch(carry["x"])}  # activations stay split over the batch (FSDP)

    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat {remat!r} is not one of {', '.join(REMAT_POLICIES)}")
    policy = REMAT_POLICIES[remat]
    return body if policy is None else nn.remat(body, policy=policy)


def run_stages(root: nn.Module, stages: Sequence[Stage], carry: Carry, remat: str = "none") -> Carry:
    """Run `stages` (prefixes relative to the bound module `root`) from `carry`; returns the last carry.

    A block stack whose owner holds it as one module (`scan_layers`) runs as one `nn.scan`; with
    `remat`, every block is rematerialised in the backward pass.
    """
    for run in stacks(stages):
        first = run[0]
        if first.layer is None:
            carry = first.fn(functools.partial(_call_bound, submodule(root, first.prefix)), carry, None)
            continue
        owner_path, _, name = _stack_base(first).rpartition("/")
        held = getattr(submodule(root, owner_path), name, None) if first.scannable else None
        if isinstance(held, nn.Module):  # scanned: one module, params with a leading layer axis
            if "cache" in carry:
                raise ValueError("a model built with scan_layers has no KV cache path; decode with the "
                                 "unscanned model (its params via unstack_layers)")
            body = _block_fn(first.fn, None, remat)
            scan = nn.scan(lambda module, c, _: (body(module, c), None), variable_axes={True: 0},
                           split_rngs={"params": True}, length=len(run))
            carry, _ = scan(held, carry, None)
            continue
        for stage in run:
            carry = _block_fn(stage.fn, stage.layer, remat)(submodule(root, stage.prefix), carry)
    return carry


def block_stack(make: Callable[[], nn.Module], depth: int, scan: bool) -> nn.Module | list[nn.Module]:
    """An owner's `blocks`: one module whose params stack `depth` blocks (`scan`), else a list of `depth`."""
    return make() if scan else [make() for _ in range(depth)]


def _layer_key(path: str, stack_names: Mapping[str, int]) -> tuple[str, int, str] | None:
    for base in stack_names:
        match = re.fullmatch(re.escape(base) + r"_(\d+)/(.*)", path)
        if match:
            return base, int(match.group(1)), match.group(2)
    return None


def stack_layers(tree: PyTree, stack_names: Mapping[str, int], fill: Callable[[Any], Any] | None = None) -> PyTree:
    """A tree keyed by param paths (params, masks, LoRA) with each stack's `base_i/...` leaves stacked
    along a new leading axis at `base/...` (the `scan_layers` layout).

    Every layer of a stack must have the same leaves; where some layers have a leaf as None (a mask
    tree's unpruned kernels) and others do not, `fill(other_leaf)` stands in for the None ones, else
    it is an error naming the path.
    """
    flat = flatten(tree)
    out: dict[str, Any] = {}
    grouped: dict[tuple[str, str], dict[int, Any]] = {}
    for path, leaf in flat.items():
        key = _layer_key(path, stack_names)
        if key is None:
            out[path] = leaf
        else:
            grouped.setdefault((key[0], key[2]), {})[key[1]] = leaf
    for (base, rest), layers in grouped.items():
        depth = stack_names[base]
        if sorted(layers) != list(range(depth)):
            missing = sorted(set(range(depth)) - set(layers))
            raise ValueError(f"cannot stack {base}_N/{rest}: layers {missing} of {depth} have no such leaf "
                             "(every block of a scanned stack needs the same leaves, e.g. the same LoRA targets)")
        leaves = [layers[i] for i in range(depth)]
        present = [x for x in leaves if x is not None]
        if not present:
            out[f"{base}/{rest}"] = None
            continue
        if len(present) < depth:
            if fill is None:
                raise ValueError(f"cannot stack {base}_N/{rest}: some layers have it as None, others do not")
            leaves = [fill(present[0]) if x is None else x for x in leaves]
        stack = jnp.stack if any(isinstance(x, jax.Array) for x in leaves) else np.stack
        out[f"{base}/{rest}"] = stack(leaves)
    return unflatten(out)


def unstack_layers(tree: PyTree, stack_names: Mapping[str, int]) -> PyTree:
    """The inverse of `stack_layers`: each `base/...` leaf split back into `base_i/...` leaves."""
    out: dict[str, Any] = {}
    for path, leaf in flatten(tree).items():
        base = next((b for b in stack_names if path.startswith(b + "/")), None)
        if base is None:
            out[path] = leaf
            continue
        rest = path[len(base) + 1:]
        for i in range(stack_names[base]):
            out[f"{base}_{i}/{rest}"] = None if leaf is None else leaf[i]
    return unflatten(out)


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

