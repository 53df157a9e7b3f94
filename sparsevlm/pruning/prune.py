"""The pruning entry point: params (+ calibration data) and a sparsity spec → pruned params and masks."""

from __future__ import annotations

import dataclasses
import time
import zlib
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from sparsevlm.config import VLMConfig
from sparsevlm.models.stages import Carry
from sparsevlm.models.vlm import calibration_stages
from sparsevlm.pruning.allocation import SparsitySpec, check_ratios, uniform_ratios
from sparsevlm.pruning.calibrate import CALIBRATION_MODES, prune_blockwise
from sparsevlm.pruning.criteria import CRITERIA, LayerStats
from sparsevlm.pruning.dsnot import DSnoTConfig, dsnot
from sparsevlm.pruning.masks import PRUNABLE_RULES, masks_from_flat
from sparsevlm.pruning.patterns import Pattern, select
from sparsevlm.pruning.sparsegpt import sparsegpt
from sparsevlm.tree import flatten, unflatten

PyTree = Any
Array = jax.Array

METHODS = ("magnitude", "random", "wanda", "sparsegpt", "dsnot")
NEEDS_CALIBRATION = ("wanda", "sparsegpt", "dsnot")


def needs_hessian(method: str, dsnot_config: DSnoTConfig = DSnoTConfig()) -> bool:
    """Whether `method` needs the inputs' Hessian XᵀX (SparseGPT, or DSnoT starting from SparseGPT)."""
    return method == "sparsegpt" or (method == "dsnot" and (dsnot_config.init == "sparsegpt" or dsnot_config.guard))


@dataclasses.dataclass(frozen=True)
class PruneResult:
    """Pruned params (zeros written in; SparseGPT's also updated), the mask tree and per-layer ratios."""

    params: PyTree
    masks: PyTree
    ratios: dict[str, float]
    seconds: float


@partial(jax.jit, static_argnames=("method", "pattern", "sparsity"))
def _score_and_select(kernel: Array, stats: LayerStats | None, key: Array | None, method: str, pattern: Pattern,
                      sparsity: float) -> tuple[Array, Array]:
    keep = select(CRITERIA[method](kernel, stats, key), pattern, sparsity)
    return jnp.where(keep, kernel, jnp.zeros((), kernel.dtype)), keep


def prune_layer(
    method: str,
    kernel: Array,
    stats: LayerStats | None,
    pattern: Pattern,
    sparsity: float,
    key: Array | None = None,
    dsnot_config: DSnoTConfig = DSnoTConfig(),
) -> tuple[Array, Array]:
    """Prune one `[in, out]` kernel; returns `(new kernel, keep-mask)`, laid out as the kernel was.

    `dsnot` refines the mask of `dsnot_config.init` on the original weights (SparseGPT's weight
    updates are not kept: DSnoT is training-free).
    """
    if method not in METHODS:
        raise ValueError(f"pruning method {method!r} is not one of {', '.join(METHODS)}")
    sharding = getattr(kernel, "sharding", None)
    if isinstance(sharding, NamedSharding) and not sharding.is_fully_replicated:
        # Every device solves the whole layer — one layer at a time, like FSDP's gather — so per-row
        # sorts and SparseGPT's column loop run without collectives inside them (and give the
        # one-device answer); the result goes back to the kernel's layout.
        whole = NamedSharding(sharding.mesh, PartitionSpec())
        kernel, stats = jax.device_put((kernel, stats), whole)
        new_kernel, mask = prune_layer(method, kernel, stats, pattern, sparsity, key, dsnot_config)
        return jax.device_put(new_kernel, sharding), jax.device_put(mask, sharding)
    if method == "dsnot":
        if stats is None or stats.total is None:
            raise ValueError("dsnot needs calibration statistics with input sums")
        _, keep = prune_layer(dsnot_config.init, kernel, stats, pattern, sparsity, key)
        keep, _ = dsnot(kernel, keep, stats, pattern, dsnot_config)
        return jnp.where(keep, kernel, jnp.zeros((), kernel.dtype)), keep
    if method == "sparsegpt":
        if stats is None or stats.hessian is None:
            raise ValueError("sparsegpt needs the inputs' Hessian XᵀX")
        return sparsegpt(kernel, stats.hessian, pattern, sparsity)
    return _score_and_select(kernel, stats, key, method, pattern, float(sparsity))


def _layer_key(key: Array, path: str) -> Array:
    # Keyed by the path itself, so a layer's random mask does not depend on which other layers are pruned.
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def prune(
    params: PyTree,
    config: VLMConfig | None,
    spec: SparsitySpec,
    method: str,
    calibration: Carry | None = None,
    calibration_mode: str = "sequential",
    key: Array | None = None,
    batch_size: int = 32,
    ratios: dict[str, float] | None = None,
    rules: Sequence[tuple[str, bool]] = PRUNABLE_RULES,
    progress: bool = False,
    dsnot_config: DSnoTConfig = DSnoTConfig(),
) -> PruneResult:
    """Prune a VLM's params to `spec` with `method`; calibration-based methods need `calibration`.

    `ratios` overrides the uniform per-layer allocation the spec implies (`{path: sparsity}`, e.g.
    from `allocation.global_ratios`); `dsnot_config` sets DSnoT's starting method, stopping rules and
    guard; `config` is needed only to run calibration. Params and calibration data may be sharded over a
    mesh (`sparsevlm.sharding`): the calibration passes then run sharded, and the masks are the same.
    """
    if method not in METHODS:
        raise ValueError(f"pruning method {method!r} is not one of {', '.join(METHODS)}")
    if calibration_mode not in CALIBRATION_MODES:
        raise ValueError(f"calibration mode {calibration_mode!r} is not one of {', '.join(CALIBRATION_MODES)}")
    pattern = spec.parsed_pattern
    if ratios is None:
        ratios = uniform_ratios(params, spec, rules)
    else:
        check_ratios(params, ratios, pattern, rules)
    ratios = {p: r for p, r in ratios.items() if r > 0}
    if method in NEEDS_CALIBRATION and (calibration is None or config is None):
        raise ValueError(f"{method} needs calibration data and the model config")
    key = jax.random.key(0) if key is None else key
    started = time.perf_counter()

    def layer(path: str, kernel: Array, stats: LayerStats | None) -> tuple[Array, Array]:
        return prune_layer(method, kernel, stats, pattern, ratios[path], _layer_key(key, path), dsnot_config)

    if method in NEEDS_CALIBRATION:
        new_params, flat_masks = prune_blockwise(
            params, calibration_stages(config), calibration, ratios, layer,
            need_hessian=needs_hessian(method, dsnot_config), mode=calibration_mode, batch_size=batch_size, progress=progress,
        )
    else:
        flat = dict(flatten(params))
        flat_masks = {}
        for path in ratios:
            flat[path], flat_masks[path] = layer(path, jnp.asarray(flat[path]), None)
        new_params = unflatten(flat)
    new_params = jax.device_get(new_params)
    flat_masks = jax.device_get(flat_masks)
    return PruneResult(new_params, masks_from_flat(new_params, flat_masks), dict(ratios), time.perf_counter() - started)
