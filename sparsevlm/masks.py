"""Mask pytrees: which leaves are prunable, applying masks, and measuring the sparsity that results.

A mask tree has the structure of the param tree; a pruned leaf holds a boolean array of the
kernel's shape (True = kept) and every other leaf is None. `mask_weights` is the one place a mask
meets a weight (pruning, LoRA, restoration and export all go through it).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm.config import TOWERS
from sparsevlm.tree import flatten, match_rules, unflatten

PyTree = Any

# Linear kernels inside the towers' transformer blocks (and the connector's linears). Embeddings,
# the LM head, norms, biases, positions and the patch embedding are never pruned, as in the
# paper's code.
PRUNABLE_RULES: tuple[tuple[str, bool], ...] = (
    (r"vision/blocks_\d+/(attn|mlp)/[^/]+/kernel", True),
    (r"connector/(.+/)?[^/]+/kernel", True),
    (r"language/((encoder|decoder)/)?blocks_\d+/(attn|cross|mlp)/[^/]+/kernel", True),
)


def is_prunable(path: str, value: Any, rules: Sequence[tuple[str, bool]] = PRUNABLE_RULES) -> bool:
    """True for a 2-D kernel whose path a prunable rule matches."""
    return bool(match_rules(path, rules, False)) and np.ndim(value) == 2


def prunable_paths(params: PyTree, rules: Sequence[tuple[str, bool]] = PRUNABLE_RULES) -> list[str]:
    """Every prunable leaf's path, in tree order."""
    return [path for path, value in flatten(params).items() if is_prunable(path, value, rules)]


def tower_of(path: str) -> str:
    """The tower a param path belongs to (its first component)."""
    return path.split("/", 1)[0]


def _check_leaf(path: str, mask: Any, kernel: Any, check_dtype: bool) -> None:
    # chex raises ValueError here (what callers and the CLI catch) with a message naming the path.
    expected = tuple(np.shape(kernel))
    chex.assert_shape(
        mask, expected, exception_type=ValueError,
        custom_message=f"mask for {path} has shape {tuple(np.shape(mask))}, the kernel {expected}",
    )
    if check_dtype:
        chex.assert_type(
            mask, bool, exception_type=ValueError,
            custom_message=f"mask for {path} has dtype {getattr(mask, 'dtype', type(mask).__name__)}, expected bool",
        )


def _check_flat(flat_params: Mapping[str, Any], pruned: Mapping[str, Any], check_dtype: bool = False) -> None:
    for path, mask in pruned.items():
        if path not in flat_params:
            raise ValueError(f"mask for {path!r} names no param of this model")
        _check_leaf(path, mask, flat_params[path], check_dtype)


def masks_from_flat(params: PyTree, pruned: Mapping[str, Any]) -> PyTree:
    """A full mask tree (None where not pruned) from `{path: bool array}`; a clear error if they disagree."""
    flat_params = flatten(params)
    _check_flat(flat_params, pruned)
    as_bool = {p: np.asarray(m, bool) if isinstance(m, np.ndarray) else m.astype(bool) for p, m in pruned.items()}
    return unflatten({path: as_bool.get(path) for path in flat_params})


def flat_masks(masks: PyTree) -> dict[str, Any]:
    """`{path: bool array}` for the pruned leaves of a mask tree."""
    return {path: m for path, m in flatten(masks).items() if m is not None}


def check_masks(params: PyTree, masks: PyTree) -> None:
    """A ValueError unless `masks` mirrors the params' tree, each leaf None or a bool array of its kernel's shape."""
    flat_params, flat_mask_tree = flatten(params), flatten(masks)
    # Only shapes and dtypes are read, never values: cheap even for sharded trees.
    missing = [p for p in flat_params if p not in flat_mask_tree]
    if missing:
        raise ValueError(
            f"mask tree has no leaf for param {missing[0]!r} ({len(missing)} missing; "
            "expected the params' structure, with None for leaves that are not pruned)"
        )
    extra = [p for p in flat_mask_tree if p not in flat_params]
    if extra:
        raise ValueError(f"mask for {extra[0]!r} names no param of this model ({len(extra)} such mask leaves)")
    _check_flat(flat_params, {p: m for p, m in flat_mask_tree.items() if m is not None}, check_dtype=True)


def _is_none(x: Any) -> bool:
    return x is None


def mask_weights(weights: Any, keep: Any, pruned: Any = None) -> Any:
    """`weights` where `keep`, else `pruned` (default zero); NumPy arrays stay NumPy.

    `where`, not a product: a pruned NaN/inf weight must become 0, not NaN. In JAX, zeroing 16- and
    32-bit float weights clears their bits (`_clear_pruned`) rather than selecting a broadcast zero,
    which XLA would hoist out of a scanned layer loop and hold as a weight-sized buffer.
    """
    if isinstance(weights, np.ndarray) and isinstance(keep, np.ndarray) and not isinstance(pruned, jax.Array):
        return np.where(keep, weights, np.zeros((), weights.dtype) if pruned is None else pruned)
    weights = jnp.asarray(weights)
    if pruned is None and weights.dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        return _clear_pruned(weights, jnp.asarray(keep))
    return jnp.where(keep, weights, jnp.zeros((), weights.dtype) if pruned is None else pruned)


@jax.custom_jvp
def _clear_pruned(weights: Any, keep: Any) -> Any:
    """`weights` with the bits of every pruned (not `keep`) entry cleared: +0, whatever the weight was."""
    word = jnp.uint16 if weights.dtype.itemsize == 2 else jnp.uint32
    bits = jax.lax.bitcast_convert_type(weights, word)
    return jax.lax.bitcast_convert_type(bits & -keep.astype(word), weights.dtype)


@_clear_pruned.defjvp
def _clear_pruned_jvp(primals: tuple[Any, Any], tangents: tuple[Any, Any]) -> tuple[Any, Any]:
    weights, keep = primals
    return _clear_pruned(weights, keep), jnp.where(keep, tangents[0], jnp.zeros((), tangents[0].dtype))


def pack_mask(mask: Any) -> Any:
    """A boolean mask as 1 bit per weight: uint8 `[..., ceil(out/8)]`, packed along the last (output) axis."""
    packbits = np.packbits if isinstance(mask, np.ndarray) else jnp.packbits
    return packbits(mask.astype(bool), axis=-1)


def unpack_mask(packed: Any, features: int) -> Any:
    """`pack_mask`'s inverse for a kernel with `features` outputs; a boolean mask passes through."""
    if packed.dtype == bool:
        return packed
    return jnp.unpackbits(packed, axis=-1, count=features).astype(bool)


def pack_masks(masks: PyTree) -> PyTree:
    """Every mask of a mask tree packed to 1 bit per weight (None leaves stay None)."""
    return jax.tree.map(lambda m: None if m is None else pack_mask(m), masks, is_leaf=_is_none)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Params with every masked-out weight set to zero (leaves whose mask is None are unchanged)."""
    return jax.tree.map(lambda mask, value: value if mask is None else mask_weights(value, mask), masks, params,
                        is_leaf=_is_none)


def measure_sparsity(params: PyTree, rules: Sequence[tuple[str, bool]] = PRUNABLE_RULES) -> dict[str, Any]:
    """Fraction of exact zeros among prunable weights: per tower, per layer, and per-row range per layer.

    Rows are output units (columns of a Flax `[in, out]` kernel), Wanda's comparison group.
    """
    zeros = {t: 0 for t in TOWERS}
    totals = {t: 0 for t in TOWERS}
    layers: dict[str, float] = {}
    rows: dict[str, tuple[float, float]] = {}
    for path, value in flatten(params).items():
        if not is_prunable(path, value, rules):
            continue
        is_zero = np.asarray(value) == 0
        tower = tower_of(path)
        zeros[tower] = zeros.get(tower, 0) + int(is_zero.sum())
        totals[tower] = totals.get(tower, 0) + is_zero.size
        layers[path] = float(is_zero.mean())
        per_row = is_zero.mean(axis=0)
        rows[path] = (float(per_row.min()), float(per_row.max()))
    towers = {t: (zeros[t] / totals[t] if totals[t] else 0.0) for t in totals}
    return {"towers": towers, "layers": layers, "rows": rows}
