"""How sparse each layer is: a `SparsitySpec`'s uniform per-layer ratios, or a global budget by importance."""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from sparsevlm.config import Pattern, SparsitySpec, check_global_allocation
from sparsevlm.masks import PRUNABLE_RULES, prunable_paths, tower_of
from sparsevlm.tree import flatten

PyTree = Any


def uniform_ratios(
    params: PyTree, spec: SparsitySpec, rules: Sequence[tuple[str, bool]] = PRUNABLE_RULES
) -> dict[str, float]:
    """Every prunable layer of a tower gets the tower's target; a clear error if a tower has none."""
    paths = prunable_paths(params, rules)
    ratios: dict[str, float] = {}
    for tower, target in spec.targets.items():
        if target == 0.0:
            continue
        layers = [p for p in paths if tower_of(p) == tower]
        if not layers:
            raise ValueError(f"{tower} sparsity {target:g} was requested, but the model has no prunable {tower} weights")
        ratios.update({p: target for p in layers})
    check_ratios(params, ratios, spec.parsed_pattern, rules)
    return ratios


def check_ratios(
    params: PyTree, ratios: dict[str, float], pattern: Pattern, rules: Sequence[tuple[str, bool]] = PRUNABLE_RULES
) -> None:
    """Per-layer ratios name prunable leaves, lie in [0, 1), and fit the pattern's shape constraints."""
    flat = flatten(params)
    allowed = set(prunable_paths(params, rules))
    for path, ratio in ratios.items():
        if path not in allowed:
            raise ValueError(f"{path!r} is not a prunable weight of this model")
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"sparsity {ratio!r} for {path} is outside [0, 1)")
        pattern.check_shape(flat[path].shape, what=path)


def block_of(path: str) -> str:
    """The block a param path belongs to: up to its first numbered component (`language/blocks_3`), else its tower."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if re.fullmatch(r"[A-Za-z_]+_\d+", part):
            return "/".join(parts[: i + 1])
    return parts[0]


def global_ratios(
    params: PyTree,
    spec: SparsitySpec,
    scores: Mapping[str, float],
    max_layer_sparsity: float = 0.8,
    rules: Sequence[tuple[str, bool]] = PRUNABLE_RULES,
) -> dict[str, float]:
    """Per-layer ratios that spend the spec's total pruning budget across its towers by block importance.

    `scores` are per-layer importances (`{path: score ≥ 0}`, e.g. Σ|W|·|∇W|); a block's score is
    the sum over its layers. Every block keeps at least `1 - max_layer_sparsity` of its weights; the
    rest of the kept-weight budget goes to blocks in proportion to their scores (water-filling, no
    block above its size), rounded to whole weights, so Σ ratio·size equals the budget to float
    round-off. Scores proportional to block size give the spec's uniform ratios. This is ECoFLaP's
    allocation; the ratios work with any pruning criterion (`prune(..., ratios=...)`).
    """
    check_global_allocation(spec, max_layer_sparsity)
    pattern = spec.parsed_pattern
    targets = uniform_ratios(params, spec, rules)
    flat = dict(flatten(params))
    sizes = {path: int(np.prod(np.shape(flat[path]))) for path in targets}
    missing = sorted(set(targets) - set(scores))
    if missing:
        raise ValueError(f"no importance score for {len(missing)} layers to prune, e.g. {missing[0]}")
    for path in targets:
        value = float(scores[path])
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"importance score {value!r} of {path} is not a finite non-negative number")
    blocks: dict[str, list[str]] = {}
    for path in targets:
        blocks.setdefault(block_of(path), []).append(path)
    names = sorted(blocks)
    size = np.array([sum(sizes[p] for p in blocks[b]) for b in names], np.int64)
    score = np.array([sum(float(scores[p]) for p in blocks[b]) for b in names], np.float64)
    budget = int(round(sum(targets[p] * sizes[p] for p in targets)))  # weights to prune
    keep = _water_fill(size, score, int(size.sum()) - budget, max_layer_sparsity)
    block_ratio = {name: float(1.0 - k / n) for name, k, n in zip(names, keep, size)}
    ratios = {path: block_ratio[block_of(path)] for path in targets}
    check_ratios(params, ratios, pattern, rules)
    return ratios


def _water_fill(size: np.ndarray, score: np.ndarray, total_keep: int, max_sparsity: float) -> np.ndarray:
    """Whole kept-weight counts per block: at least ⌈(1 − max)·size⌉, the rest ∝ score, none above size."""
    low = np.ceil((1.0 - max_sparsity) * size - 1e-9).astype(np.int64)
    if low.sum() > total_keep:
        raise ValueError(f"a max layer sparsity of {max_sparsity:g} keeps {int(low.sum())} weights, "
                         f"more than the budget of {total_keep}")
    if score.sum() == 0:
        score = size.astype(np.float64)  # nothing to go on: in proportion to size, i.e. uniform
    rest = size - low

    def kept(lam: float) -> np.ndarray:
        return low + np.minimum(rest, lam * score)

    top = float(np.max(np.where(score > 0, rest / np.where(score > 0, score, 1.0), 0.0)))
    lo_lam, hi_lam = 0.0, top
    for _ in range(200):
        mid = 0.5 * (lo_lam + hi_lam)
        lo_lam, hi_lam = (mid, hi_lam) if kept(mid).sum() < total_keep else (lo_lam, mid)
    share = kept(hi_lam)
    short = total_keep - share.sum()
    if short > 0:  # blocks with zero score take what the others cannot, in proportion to their room
        room = size - share
        share = share + room * min(1.0, short / max(room.sum(), 1))
    whole = np.minimum(np.floor(share).astype(np.int64), size)
    for index in np.argsort(-(share - whole), kind="stable"):
        if whole.sum() >= total_keep:
            break
        if whole[index] < size[index]:
            whole[index] += 1
    while whole.sum() > total_keep:  # float round-off above the budget: take from the largest share
        index = int(np.argmax(np.where(whole > low, whole - share, -np.inf)))
        whole[index] -= 1
    return whole
