"""Declarative HF ↔ sparsevlm name mapping: one `Rule` per HF tensor, with a layout transform.

A family's conversion is a list of rules (built by small functions per tower), read in both
directions: `to_ours` converts HF tensors one at a time into our flat `{path: array}`; `to_hf`
is its inverse for export. Layouts:

- `copy`: same layout (biases, norms, embeddings);
- `linear`: HF `[out, in]` ↔ Flax `[in, out]` (transpose);
- `conv`: HF `[O, I, kh, kw]` ↔ Flax `[kh, kw, I, O]`;
- `squeeze`: HF has `lead` leading axes of size 1 that we drop (BLIP-2 `query_tokens`, position tables);
- `zeros`: no HF tensor; our leaf is zeros on load and must still be zeros on export (BLIP-2's
  vision attention has q and v biases but no k bias).

HF tensors the Flax forward never reads (e.g. the CLIP layers after LLaVA's feature layer) are
kept verbatim under `unused/<HF name>` (`unused_rules`), so an exported checkpoint is complete.

A rule with several `ours` paths splits the converted tensor along its last axis into equal
parts (HF's fused `qkv` ↔ our `q`, `k`, `v`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

LAYOUTS = ("copy", "linear", "conv", "squeeze", "zeros")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF tensor (`hf`) ↔ one or more of our `/`-joined leaves (`ours`), with a layout."""

    hf: str
    ours: tuple[str, ...]
    layout: str = "copy"
    lead: int = 1  # `squeeze`: how many leading size-1 axes HF has

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"rule layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if isinstance(self.ours, str):
            object.__setattr__(self, "ours", (self.ours,))


UNUSED = "unused"


def rule(hf: str, ours: str | tuple[str, ...], layout: str = "copy", lead: int = 1) -> Rule:
    """Shorthand constructor."""
    return Rule(hf, ours if isinstance(ours, tuple) else (ours,), layout, lead)


def unused_rules(names: Iterable[str]) -> list[Rule]:
    """Keep these HF tensors verbatim under `unused/`, for export only."""
    return [Rule(name, (f"{UNUSED}/{name}",)) for name in names]


def linear_rules(hf: str, ours: str | tuple[str, ...], bias: bool = True) -> list[Rule]:
    """`{hf}.weight` → `{ours}/kernel` (transposed) and, with `bias`, `{hf}.bias` → `{ours}/bias`."""
    names = ours if isinstance(ours, tuple) else (ours,)
    rules = [Rule(f"{hf}.weight", tuple(f"{o}/kernel" for o in names), "linear")]
    if bias:
        rules.append(Rule(f"{hf}.bias", tuple(f"{o}/bias" for o in names), "copy"))
    return rules


def norm_rules(hf: str, ours: str, bias: bool = True) -> list[Rule]:
    """A LayerNorm (`weight`, `bias`) or RMSNorm (`weight`) → Flax `scale` (and `bias`)."""
    rules = [Rule(f"{hf}.weight", (f"{ours}/scale",))]
    if bias:
        rules.append(Rule(f"{hf}.bias", (f"{ours}/bias",)))
    return rules


def _to_our_layout(value: np.ndarray, r: Rule) -> np.ndarray:
    if r.layout == "linear":
        return value.T
    if r.layout == "conv":
        return value.transpose(2, 3, 1, 0)
    if r.layout == "squeeze":
        if value.shape[: r.lead] != (1,) * r.lead:
            raise ValueError(f"expected {r.lead} leading axes of size 1, got shape {tuple(value.shape)}")
        return value.reshape(value.shape[r.lead :])
    return value


def _to_hf_layout(value: np.ndarray, r: Rule) -> np.ndarray:
    if r.layout == "linear":
        return value.T
    if r.layout == "conv":
        return value.transpose(3, 2, 0, 1)
    if r.layout == "squeeze":
        return value.reshape((1,) * r.lead + value.shape)
    return value


def to_ours(
    rules: Iterable[Rule],
    read: Callable[[str], np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    dtype: np.dtype | type,
    where: Callable[[str], str] = lambda name: name,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(our path, array)` one HF tensor at a time, checked against the expected shapes.

    `read(name)` returns one HF tensor; `where(name)` says which file holds it (for errors).
    """
    for r in rules:
        if r.layout == "zeros":
            for path in r.ours:
                yield path, np.zeros(expected[path], dtype)
            continue
        raw = read(r.hf)
        try:
            value = _to_our_layout(raw, r)
        except ValueError as err:
            raise ValueError(f"tensor {r.hf} in {where(r.hf)}: {err}") from None
        parts = np.split(value, len(r.ours), axis=-1) if len(r.ours) > 1 else [value]
        for path, part in zip(r.ours, parts):
            if path.startswith(f"{UNUSED}/"):
                yield path, part
                continue
            if path not in expected:
                raise ValueError(f"conversion rule for {r.hf} names {path!r}, which this model does not have")
            if tuple(part.shape) != tuple(expected[path]):
                raise ValueError(
                    f"tensor {r.hf} in {where(r.hf)} has shape {tuple(raw.shape)} but the config "
                    f"implies {tuple(expected[path])} for {path} (layout {r.layout})"
                )
            yield path, np.ascontiguousarray(part, dtype=dtype)


def to_hf(
    rules: Iterable[Rule],
    flat: Mapping[str, np.ndarray],
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(HF name, array)` from our flat params, one HF tensor at a time (the inverse of `to_ours`)."""
    for r in rules:
        if r.layout == "zeros":
            for path in r.ours:
                if np.any(np.asarray(flat[path]) != 0):
                    raise ValueError(f"{path} has no HF counterpart and must stay zero, but it is not")
            continue
        missing = [p for p in r.ours if p not in flat]
        if missing:
            raise ValueError(f"cannot export {r.hf}: the params have no {missing[0]!r}")
        parts = [np.asarray(flat[p]) for p in r.ours]
        value = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        yield r.hf, np.ascontiguousarray(_to_hf_layout(value, r))


def layer_rules(depth: int, build: Callable[[int], list[Rule]]) -> list[Rule]:
    """Rules for `depth` repeated layers, `build(i)` giving layer i's."""
    return [r for i in range(depth) for r in build(i)]
