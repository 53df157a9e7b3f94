"""How sparse each tower and layer is: the per-tower sparsity spec and its per-layer ratios."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Sequence

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
