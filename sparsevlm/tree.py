"""Param trees addressed by `/`-joined paths, and the one helper that matches path patterns."""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence, TypeVar

from flax import traverse_util

PyTree = Any
V = TypeVar("V")

SEP = "/"


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict → `{"a/b/c": leaf}`."""
    return traverse_util.flatten_dict(_to_dict(tree), sep=SEP)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """`{"a/b/c": leaf}` → nested dict."""
    return traverse_util.unflatten_dict(dict(flat), sep=SEP)


def _to_dict(tree: Mapping[str, Any]) -> dict[str, Any]:
    # Flax may hand back FrozenDict-like mappings; flatten_dict wants plain dicts.
    return {k: _to_dict(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def match_rules(path: str, rules: Sequence[tuple[str, V]], default: V | None = None) -> V | None:
    """Value of the first `(regex, value)` rule whose regex fully matches `path`, else `default`."""
    for pattern, value in rules:
        if re.fullmatch(pattern, path):
            return value
    return default


def select(paths: Iterable[str], patterns: Sequence[str]) -> list[str]:
    """The paths that fully match any of the regex `patterns`, in input order."""
    compiled = [re.compile(p) for p in patterns]
    return [p for p in paths if any(c.fullmatch(p) for c in compiled)]


def count_params(tree: Mapping[str, Any]) -> int:
    """Total number of scalars in a param tree."""
    return sum(int(getattr(v, "size", 0)) for v in flatten(tree).values())
