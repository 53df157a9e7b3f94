"""The pruning entry point: params (+ calibration data) and a sparsity spec → pruned params and masks."""

from __future__ import annotations

import dataclasses
import time
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sparsevlm import sharding
from sparsevlm.config import CALIBRATION_MODES, Pattern, SparsitySpec, VLMConfig
from sparsevlm.masks import PRUNABLE_RULES, masks_from_flat
from sparsevlm.models.stages import Carry
from sparsevlm.models.vlm import forward_stages
from sparsevlm.pruning import registry
from sparsevlm.pruning.allocation import check_ratios, uniform_ratios
from sparsevlm.pruning.calibrate import prune_blockwise, to_host
from sparsevlm.pruning.criteria import LayerStats
from sparsevlm.tree import flatten, unflatten

PyTree = Any
Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PruneResult:
    """Pruned params (zeros written in; SparseGPT's also updated), the mask tree and per-layer ratios."""

    params: PyTree
    masks: PyTree
    ratios: dict[str, float]
    seconds: float
    phases: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per phase (`calibrate.PHASES`)


def prune_layer(
    method: str,
    kernel: Array,
    stats: LayerStats | None,
    pattern: Pattern,
    sparsity: float,
    key: Array | None = None,
    options: Any = None,
) -> tuple[Array, Array]:
    """Prune one `[in, out]` kernel with a registered method; returns `(new kernel, keep-mask)` laid out as the kernel.

    `options` are the method's own settings (`DSnoTConfig` for dsnot), None for its defaults.
    """
    layer = registry.method(method).layer_function()
    sharding = getattr(kernel, "sharding", None)
    if isinstance(sharding, NamedSharding) and not sharding.is_fully_replicated:
        # Every device solves the whole layer — one layer at a time, like FSDP's gather — so per-row
        # sorts and SparseGPT's column loop run without collectives inside them (and give the
        # one-device answer); the result goes back to the kernel's layout.
        whole = NamedSharding(sharding.mesh, PartitionSpec())
        kernel, stats = jax.device_put((kernel, stats), whole)
        new_kernel, mask = layer(kernel, stats, pattern, sparsity, key, options)
        return jax.device_put(new_kernel, sharding), jax.device_put(mask, sharding)
    return layer(kernel, stats, pattern, sparsity, key, options)


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
    options: Any = None,
) -> PruneResult:
    """Prune a VLM's params to `spec` with `method`; calibration-based methods need `calibration`.

    `ratios` overrides the uniform per-layer allocation the spec implies (`{path: sparsity}`, e.g.
    from `allocation.global_ratios`); `options` are the method's own settings (`DSnoTConfig` for
    dsnot); `config` is needed only to run calibration. Params and calibration data may be sharded
    over a mesh (`sparsevlm.sharding`): the calibration passes then run sharded, and the masks are the same.
    """
    entry = registry.method(method)
    if calibration_mode not in CALIBRATION_MODES:
        raise ValueError(f"calibration mode {calibration_mode!r} is not one of {', '.join(CALIBRATION_MODES)}")
    pattern = spec.parsed_pattern
    if ratios is None:
        ratios = uniform_ratios(params, spec, rules)
    else:
        check_ratios(params, ratios, pattern, rules)
    ratios = {p: r for p, r in ratios.items() if r > 0}
    if entry.needs_calibration and (calibration is None or config is None):
        raise ValueError(f"{method} needs calibration data and the model config")
    key = jax.random.key(0) if key is None else key
    started = time.perf_counter()

    def layer(path: str, kernel: Array, stats: LayerStats | None) -> tuple[Array, Array]:
        return prune_layer(method, kernel, stats, pattern, ratios[path], _layer_key(key, path), options)

    phases: dict[str, float] = {}
    if entry.needs_calibration:
        new_params, flat_masks = prune_blockwise(
            params, forward_stages(config), calibration, ratios, layer,
            need_hessian=entry.hessian(options), mode=calibration_mode, batch_size=batch_size, progress=progress,
            phases=phases,
        )
    else:
        flat = dict(flatten(params))
        flat_masks = {}
        for path in ratios:
            # One layer on the device at a time when the params live on the host.
            new, mask = layer(path, jnp.asarray(flat[path]), None)
            if isinstance(flat[path], np.ndarray):
                new, mask = to_host(new), to_host(mask)
            flat[path], flat_masks[path] = new, mask
        new_params = unflatten(flat)
        phases["solve"] = time.perf_counter() - started
    fetched = time.perf_counter()
    new_params = sharding.to_host(new_params)  # gathered from every process of a multi-process run
    flat_masks = sharding.to_host(flat_masks)
    phases["to_host"] = phases.get("to_host", 0.0) + time.perf_counter() - fetched
    return PruneResult(new_params, masks_from_flat(new_params, flat_masks), dict(ratios), time.perf_counter() - started,
                       {name: round(seconds, 4) for name, seconds in phases.items()})
