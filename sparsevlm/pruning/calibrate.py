"""Block-by-block calibration: capture each prunable linear's input statistics and prune as we go.

The forward pass is a chain of `Stage`s (one per transformer block). For each stage the driver
runs the calibration set through it in chunks, accumulating per-linear statistics of the inputs
(padding tokens excluded), prunes the stage's linears, and hands the next stage either the
*pruned* stage's outputs (`sequential`, as Wanda and SparseGPT do) or the dense outputs (`dense`,
the alternative the paper's restoration code used). Only one boundary's activations for the
calibration set are alive at a time, and each stage function is jit-compiled once per shape. Params
kept on the host visit the device one stage at a time, and only the leaves the stage reads (the
embedding step does not take the LM head along), so a model larger than the device prunes in the
memory of one block.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sparsevlm.config import CALIBRATION_MODES, VisionConfig
from sparsevlm.data.batch import EncodedSet
from sparsevlm.models.layers import intercept_linears
from sparsevlm.models.stages import Carry, Stage, carry_batch_size, is_shared, subtree
from sparsevlm.pruning.criteria import LayerStats
from sparsevlm.tree import flatten, unflatten

PyTree = Any
Array = jax.Array
LayerFn = Callable[[str, Array, LayerStats], tuple[Array, Array]]


def calibration_carry(
    data: EncodedSet, num_samples: int, pad_id: int, vision: VisionConfig, seed: int = 0
) -> Carry:
    """The first carry (`images`, `tokens`, `text_mask`) for `num_samples` examples drawn from `data`."""
    if num_samples <= 0:
        raise ValueError(f"calibration samples {num_samples} must be positive")
    if num_samples > len(data):
        raise ValueError(f"calibration samples {num_samples} exceed the {len(data)} examples available")
    chosen = np.sort(np.random.default_rng(seed).choice(len(data), num_samples, replace=False))
    length = max(len(data.sequences[i][0]) for i in chosen)
    batch = data.collate(chosen, length, pad_id, vision)
    carry = {"images": batch.images, "tokens": batch.tokens, "text_mask": batch.text_mask,
             "target_mask": batch.loss_mask}
    if batch.instruction_tokens is not None:
        carry |= {"instruction_tokens": batch.instruction_tokens, "instruction_mask": batch.instruction_mask}
    return carry


def _input_stats(x: Array, weight: Array | None, need_hessian: bool) -> LayerStats:
    features = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if weight is not None and weight.shape == x.shape[:-1]:
        w = weight.reshape(-1).astype(jnp.float32)
    else:  # e.g. cross-attention keys, whose token axis is not the carry's
        w = jnp.ones(features.shape[:1], jnp.float32)
    hessian = (features * w[:, None]).T @ features if need_hessian else None
    return LayerStats(jnp.einsum("t,ti->i", w, features**2), hessian, w.sum(), jnp.einsum("t,ti->i", w, features))


Absent = tuple[tuple[str, tuple[int, ...], Any], ...]  # (path, shape, dtype) of leaves a stage does not read


def _filled(params: PyTree, absent: Absent) -> PyTree:
    # Flax's `setup` fetches every declared param, read or not; zeros stand in for the unread ones
    # inside the jitted function, where XLA drops them unused, so they never take device memory.
    if not absent:
        return params
    return unflatten(flatten(params) | {path: jnp.zeros(shape, dtype) for path, shape, dtype in absent})


@functools.lru_cache(maxsize=64)
def _jit(module: Any, fn: Any, absent: Absent = ()) -> Callable[[PyTree, Carry], Carry]:
    # One jitted function per stage kind (module, step), so every block of a stack (and every later
    # pruning run of the same model) reuses one compilation.
    return jax.jit(lambda params, carry: Stage("", module, fn).apply(_filled(params, absent), carry))


@functools.lru_cache(maxsize=64)
def _capturing(module: Any, fn: Any, need_hessian: bool, absent: Absent = ()) -> Callable[[PyTree, Carry], tuple[Carry, dict]]:
    """A stage kind, jitted, that also returns `{module path: LayerStats}` of every `Linear` it calls."""

    def run(params: PyTree, carry: Carry) -> tuple[Carry, dict[str, LayerStats]]:
        stats: dict[str, LayerStats] = {}
        weight = carry.get("weight")
        kv_weight = carry.get("kv_weight")  # padding of the sequence a cross-attention reads (T5 decoder)

        def record(name: str, module: Any, x: Array, call: Callable[[Array], Array]) -> Array:
            reads_other = kv_weight is not None and name.split("/")[-2:] in (["cross", "k"], ["cross", "v"])
            new = _input_stats(x, kv_weight if reads_other else weight, need_hessian)
            stats[name] = new if name not in stats else jax.tree.map(jnp.add, stats[name], new)
            return call(x)

        with intercept_linears(record):
            out = Stage("", module, fn).apply(_filled(params, absent), carry)
        return out, stats

    return jax.jit(run)


# The phases of a calibrated prune, as `prune_blockwise` times them; `to_host` also covers `prune`'s final copy.
PHASES = ("pass_through", "capture", "solve", "refresh", "to_host")


@contextlib.contextmanager
def _timed(phases: dict[str, float] | None, name: str, result: Callable[[], Any]) -> Iterator[None]:
    """Add the block's seconds to `phases[name]`, waiting for `result()` to be computed (async backends)."""
    if phases is None:
        yield
        return
    started = time.perf_counter()
    yield
    jax.block_until_ready(result())
    phases[name] = phases.get(name, 0.0) + time.perf_counter() - started


def _chunks(carry: Carry, size: int) -> list[Carry]:
    total = carry_batch_size(carry)
    return [{k: v if is_shared(v, total) else v[i : i + size] for k, v in carry.items()} for i in range(0, total, size)]


def _owners(stages: Sequence[Stage], targets: Mapping[str, Any]) -> set[int]:
    """The stage that runs each target: the last one whose prefix is the target's longest stage prefix."""
    owners = set()
    for target in targets:
        matching = [i for i, s in enumerate(stages) if target.startswith(s.prefix + "/" if s.prefix else "")]
        if matching:
            longest = max(len(stages[i].prefix) for i in matching)
            owners.add(max(i for i in matching if len(stages[i].prefix) == longest))
    return owners


def own_params(params: PyTree, stages: Sequence[Stage], index: int) -> PyTree:
    """Stage `index`'s params subtree without the subtrees of the stages nested under it.

    The splice stage at `language` runs only the embedding; handing it the blocks as well would put
    the whole tower on the device.
    """
    prefix = stages[index].prefix
    below = prefix + "/" if prefix else ""
    nested = {s.prefix[len(below):].split("/")[0] for s in stages if s.prefix.startswith(below) and s.prefix != prefix}
    sub = subtree(params, prefix)
    return {k: v for k, v in sub.items() if k not in nested} if nested else sub


@functools.lru_cache(maxsize=256)
def _read_leaves(module: Any, fn: Any, params_def: Any, params_avals: tuple, carry_def: Any,
                 carry_avals: tuple) -> tuple[bool, ...]:
    # Which params leaves the stage's jaxpr consumes: the splice stage at `language` owns the embedding
    # *and* the LM head but reads only the embedding, and a Llama's position stage reads nothing.
    # Traced without jit, so a leaf counts as read only where an operation takes it (or returns it).
    params = jax.tree.unflatten(params_def, [jax.ShapeDtypeStruct(*a) for a in params_avals])
    carry = jax.tree.unflatten(carry_def, [jax.ShapeDtypeStruct(*a) for a in carry_avals])
    jaxpr = jax.make_jaxpr(lambda p, c: Stage("", module, fn).apply(p, c))(params, carry).jaxpr
    read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    return tuple(id(v) in read for v in jaxpr.invars[: len(params_avals)])


def _avals(tree: PyTree) -> tuple[Any, tuple]:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(np.shape(x)), jnp.result_type(x)) for x in leaves)


def read_params(stage: Stage, params: PyTree, carry: Carry) -> tuple[PyTree, Absent]:
    """The leaves of `params` (a stage's own subtree) that the stage reads on `carry`, and the others'
    `(path, shape, dtype)`, for the stage's jitted functions to stand in for."""
    leaves = [("/".join(str(k.key) for k in path), value) for path, value in jax.tree.leaves_with_path(params)]
    if not leaves:
        return params, ()
    read = _read_leaves(stage.module, stage.fn, *_avals(params), *_avals(carry))
    absent = tuple((path, tuple(np.shape(v)), jnp.result_type(v)) for (path, v), used in zip(leaves, read) if not used)
    return unflatten({path: v for (path, v), used in zip(leaves, read) if used}), absent


def to_device(tree: PyTree) -> PyTree:
    """Host (NumPy) leaves copied to the default device; device arrays, sharded or not, left where they are."""
    return jax.tree.map(lambda x: jax.device_put(x) if isinstance(x, np.ndarray) else x, tree)


def to_host(x: Array) -> np.ndarray:
    """A host copy that owns its memory, so the device buffer is freed (on a CPU, `np.asarray` would alias it)."""
    return np.array(x, copy=True)


def prune_blockwise(
    params: PyTree,
    stages: Sequence[Stage],
    calibration: Carry,
    targets: Mapping[str, Any],
    prune_layer: LayerFn,
    need_hessian: bool,
    mode: str = "sequential",
    batch_size: int = 32,
    progress: bool = False,
    phases: dict[str, float] | None = None,
) -> tuple[PyTree, dict[str, Array]]:
    """Run `stages` over the calibration set, pruning every linear in `targets` with `prune_layer`.

    `prune_layer(path, kernel, stats) -> (new kernel, keep-mask)`. Returns the new params and the
    masks as `{path: array}`. Stages after the last one holding a target are never run.

    Params held on the host (NumPy leaves, as a loaded model's are) are copied to the device one
    stage at a time, and that stage's pruned kernels and masks come back to the host when it is done,
    so the device holds one block's weights, its statistics and the calibration activations, never
    the whole model. Params already on a device (sharded or not) stay there, and so do the results.
    With `phases`, the seconds of each phase (`PHASES`) are added to it; each phase then waits for
    its results, which costs a little overlap on asynchronous backends.
    """
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"calibration mode {mode!r} is not one of {', '.join(CALIBRATION_MODES)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    flat = dict(flatten(params))
    masks: dict[str, Array] = {}

    stream = _chunks(to_device(dict(calibration)), batch_size)  # sharded calibration stays on its mesh
    owners = _owners(stages, targets)
    for index, stage in enumerate(tqdm(stages[: max(owners, default=-1) + 1], desc="prune", disable=not progress,
                                       leave=False)):
        # Only the leaves the stage reads travel, and the last stage's are gone before these arrive.
        sub, absent = read_params(stage, own_params(params, stages, index), stream[0])
        sub = to_device(sub)
        apply = _jit(stage.module, stage.fn, absent)
        if index not in owners:
            with _timed(phases, "pass_through", lambda: stream):
                stream = [apply(sub, chunk) for chunk in stream]
            del sub
            continue
        capture = _capturing(stage.module, stage.fn, need_hessian, absent)
        outputs, total = [], None
        with _timed(phases, "capture", lambda: (outputs, total)):
            for chunk in stream:
                out, stats = capture(sub, chunk)
                outputs.append(out)
                total = stats if total is None else jax.tree.map(jnp.add, total, stats)
        own = dict(flatten(sub))
        del sub  # `own` holds the block now: each dense kernel is freed as its pruned one replaces it
        pruned: dict[str, Array] = {}  # {name: keep-mask}
        with _timed(phases, "solve", lambda: (own, pruned)):
            for name, stats in (total or {}).items():
                path = "/".join(filter(None, (stage.prefix, name, "kernel")))
                if path in targets:
                    own[name + "/kernel"], pruned[name + "/kernel"] = prune_layer(path, own[name + "/kernel"], stats)
        total = stats = None  # the block's statistics (Hessians) go before the next block's arrive
        if mode == "sequential" and pruned:
            with _timed(phases, "refresh", lambda: stream):
                stream = [apply(unflatten(own), chunk) for chunk in stream]
        else:
            stream = outputs
        outputs = None
        with _timed(phases, "to_host", lambda: None):
            for name, mask in pruned.items():
                path = "/".join(filter(None, (stage.prefix, name)))
                kernel = own[name]
                if isinstance(flat[path], np.ndarray):
                    kernel, mask = to_host(kernel), to_host(mask)
                flat[path], masks[path] = kernel, mask
        own = pruned = None  # this block's device arrays go before the next block's arrive
    missing = sorted(set(targets) - set(masks))
    if missing:
        raise ValueError(f"these layers were never reached by the calibration stages: {missing[:5]}")
    return unflatten(flat), masks
