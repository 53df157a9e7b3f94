"""How sparse each tower and layer is: the per-tower sparsity spec and its per-layer ratios."""

from __future__ import annotations

import dataclasses
import numbers
import re
from typing import Any, Mapping, Sequence

import numpy as np

from sparsevlm.models.vlm import TOWERS
from sparsevlm.pruning.masks import PRUNABLE_RULES, prunable_paths, tower_of
from sparsevlm.pruning.patterns import UNSTRUCTURED, Pattern
from sparsevlm.tree import flatten

PyTree = Any


@dataclasses.dataclass(frozen=True)
class SparsitySpec:
    """Target sparsity per tower (fraction of prunable weights set to zero) and one pattern for all.

    With an N:M pattern (N of every M weights kept) a pruned tower's sparsity is `1 - N/M`.
    """

    vision: float = 0.0
    connector: float = 0.0
    language: float = 0.0
    pattern: str = UNSTRUCTURED

    def __post_init__(self) -> None:
        pattern = Pattern.parse(self.pattern)
        for tower in TOWERS:
            value = getattr(self, tower)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{tower} sparsity {value!r} is not a number")
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{tower} sparsity {value!r} is outside [0, 1)")
            fixed = pattern.fixed_sparsity
            if fixed is not None and value not in (0.0,) and abs(value - fixed) > 1e-9:
                raise ValueError(
                    f"{tower} sparsity {value} does not match pattern {self.pattern}, which keeps "
                    f"{pattern.n} of every {pattern.m} weights (sparsity {fixed:g}); use 0 or {fixed:g}"
                )

    @property
    def parsed_pattern(self) -> Pattern:
        """The pattern as a `Pattern`."""
        return Pattern.parse(self.pattern)

    @property
    def targets(self) -> dict[str, float]:
        """`{tower: sparsity}`."""
        return {tower: float(getattr(self, tower)) for tower in TOWERS}

    @classmethod
    def same(cls, sparsity: float, pattern: str = UNSTRUCTURED) -> "SparsitySpec":
        """The same ratio for the vision tower and the language model (connector dense)."""
        return cls(vision=sparsity, language=sparsity, pattern=pattern)

    @classmethod
    def language_only(cls, sparsity: float, pattern: str = UNSTRUCTURED) -> "SparsitySpec":
        """Prune only the language model."""
        return cls(language=sparsity, pattern=pattern)

    @classmethod
    def vision_only(cls, sparsity: float, pattern: str = UNSTRUCTURED) -> "SparsitySpec":
        """Prune only the vision tower."""
        return cls(vision=sparsity, pattern=pattern)

    @classmethod
    def constant_sum(cls, total: float, vision: Sequence[float], pattern: str = UNSTRUCTURED) -> list["SparsitySpec"]:
        """Splits with `vision + language = total`, one per vision sparsity."""
        return [cls(vision=v, language=round(total - v, 10), pattern=pattern) for v in vision]

    def describe(self) -> str:
        """Short human-readable form, e.g. `vision 0.5 / language 0.5 (unstructured)`."""
        parts = [f"{t} {v:g}" for t, v in self.targets.items() if v > 0] or ["dense"]
        return " / ".join(parts) + f" ({self.pattern})"


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


def check_global_allocation(spec: SparsitySpec, max_layer_sparsity: float,
                            what: str = "a global sparsity allocation", cap: str = "max layer sparsity") -> None:
    """A clear error if `spec` cannot be allocated globally: N:M patterns, or a cap below a target."""
    pattern = spec.parsed_pattern
    if pattern.kind == "n_of_m":
        raise ValueError(f"{what} needs an unstructured pattern, not {pattern.name}: N:M fixes every layer's sparsity")
    if not 0.0 < max_layer_sparsity < 1.0:
        raise ValueError(f"{cap} {max_layer_sparsity!r} is outside (0, 1)")
    highest = max(spec.targets.values())
    if max_layer_sparsity < highest:
        raise ValueError(f"{cap} {max_layer_sparsity:g} is below the target sparsity {highest:g}")


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
