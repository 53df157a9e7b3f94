"""Check a model's sparsity from its weights alone: zeros per tower and layer, N:M validity, mask agreement.

A pruned model's metadata records what was asked (`metadata["pruning"]`: a pattern and a target
sparsity per tower); `verify_params` recomputes what the weights actually are and says whether each
claim holds. N:M (N of every M weights kept) groups run along a Flax `[in, out]` kernel's input
axis (axis 0), as the pruners make them. Reports are plain JSON-serialisable dicts.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from sparsevlm.config import N_OF_M, UNSTRUCTURED_LAYER, Pattern, num_pruned
from sparsevlm.masks import PRUNABLE_RULES, check_masks, flat_masks, is_prunable, measure_sparsity, tower_of
from sparsevlm.tree import flatten

PyTree = Any

CHECKED_PATTERNS = ("2:4", "4:8")
# Measured sparsity may fall this far short of the (rounding-aware) claimed sparsity.
SPARSITY_TOLERANCE = 1e-3


def n_of_m_valid(kernel: Any, pattern: Pattern | str) -> bool:
    """True if every M consecutive inputs (axis 0) of each output hold at least M−N exact zeros."""
    pattern = Pattern.parse(pattern) if isinstance(pattern, str) else pattern
    if pattern.kind != N_OF_M:
        raise ValueError(f"pattern {pattern.name!r} is not an N:M pattern")
    kernel = np.asarray(kernel)
    if kernel.ndim != 2 or kernel.shape[0] % pattern.m:
        return False  # the pattern cannot tile this kernel's input axis
    zeros = (kernel == 0).reshape(kernel.shape[0] // pattern.m, pattern.m, kernel.shape[1]).sum(axis=1)
    return bool((zeros >= pattern.m - pattern.n).all())


def _achievable_sparsity(shapes: Sequence[tuple[int, int]], pattern: Pattern, sparsity: float) -> float:
    # The pruners prune floor(count · sparsity) per group (an output's inputs, or the whole layer), so a
    # faithful prune of a small layer can measure slightly below the target (0.3 of 32 inputs is 9/32).
    pruned = total = 0
    for fan_in, fan_out in shapes:
        if pattern.kind == UNSTRUCTURED_LAYER:
            pruned += num_pruned(fan_in * fan_out, sparsity)
        else:
            pruned += num_pruned(fan_in, sparsity) * fan_out
        total += fan_in * fan_out
    return pruned / total if total else 0.0


def _parse_claim(claimed: Mapping[str, Any]) -> tuple[Pattern, dict[str, float], dict[str, float] | None]:
    missing = [key for key in ("pattern", "target") if key not in claimed]
    if missing:
        raise ValueError(f"pruning claim has no {missing[0]!r} (expected 'pattern' and 'target', as prune_job writes)")
    ratios = claimed.get("ratios")
    return (Pattern.parse(claimed["pattern"]), {tower: float(t) for tower, t in claimed["target"].items()},
            None if ratios is None else {p: float(r) for p, r in ratios.items()})


def _check_claims(
    pattern: Pattern, targets: Mapping[str, float], ratios: Mapping[str, float] | None, flat: Mapping[str, Any],
    towers: Mapping[str, float], layers: Mapping[str, dict],
) -> list[dict[str, Any]]:
    # With per-layer ratios (a global allocation such as ECoFLaP's) each tower claims what its layers'
    # ratios add up to; the budget across towers is the targets', not each tower's own target.
    results = []
    for tower, target in targets.items():
        if target <= 0:
            continue
        paths = [p for p in layers if tower_of(p) == tower]
        measured = float(towers.get(tower, 0.0))
        if ratios is None:
            achievable = _achievable_sparsity([np.shape(flat[p]) for p in paths], pattern, target)
        else:
            sizes = {p: int(np.prod(np.shape(flat[p]))) for p in paths}
            total = sum(sizes.values()) or 1
            target = sum(ratios.get(p, 0.0) * sizes[p] for p in paths) / total
            achievable = sum(_achievable_sparsity([np.shape(flat[p])], pattern, ratios.get(p, 0.0)) * sizes[p]
                             for p in paths) / total
        claim: dict[str, Any] = {
            "tower": tower, "pattern": pattern.name, "claimed": target, "achievable": achievable,
            "measured": measured, "n_of_m_valid": None,
        }
        problems = []
        if not paths:
            problems.append(f"the model has no prunable {tower} weights")
        if measured < achievable - SPARSITY_TOLERANCE:
            problems.append(f"measured sparsity {measured:.4f} < claimed {target:g}")
        if pattern.kind == N_OF_M:
            broken = [p for p in paths if not layers[p]["n_of_m"][pattern.name]]
            claim["n_of_m_valid"] = bool(paths) and not broken
            if broken:
                problems.append(f"{len(broken)} of {len(paths)} layers break {pattern.name} (first: {broken[0]})")
        claim["ok"] = not problems
        claim["problems"] = problems
        results.append(claim)
    return results


def verify_params(
    params: PyTree,
    masks: PyTree | None = None,
    claimed: Mapping[str, Any] | None = None,
    patterns: Sequence[str] = CHECKED_PATTERNS,
    rules: Sequence[tuple[str, bool]] = PRUNABLE_RULES,
) -> dict[str, Any]:
    """Sparsity, N:M validity and mask violations recomputed from the weights, and whether `claimed` holds.

    `claimed` is a pruned model's `metadata["pruning"]` (its `pattern` and per-tower `target`). A
    claimed tower must measure at least its target less `SPARSITY_TOLERANCE` (the target as the
    pruners round it: floor(count · sparsity) per output or layer), and with an N:M pattern every
    one of its prunable layers must be N:M. A tower's "pruned layers" (over which its N:M summary
    runs) are its masked ones when `masks` is given, else those with any exact zero.
    """
    if masks is not None:
        check_masks(params, masks)
    claim = _parse_claim(claimed) if claimed else None
    checked = [Pattern.parse(name) for name in patterns]
    for pattern in checked:
        if pattern.kind != N_OF_M:
            raise ValueError(f"patterns to check must be N:M, got {pattern.name!r}")
    if claim is not None and claim[0].kind == N_OF_M and claim[0] not in checked:
        checked.append(claim[0])
    flat = flatten(params)
    kept = flat_masks(masks) if masks is not None else {}
    measured = measure_sparsity(params, rules)

    # Weights nonzero where their mask prunes them (NaN != 0, so a pruned NaN counts), per masked leaf and tower.
    violations = {path: int((~np.asarray(mask, bool) & (np.asarray(flat[path]) != 0)).sum())
                  for path, mask in kept.items()}
    tower_violations: dict[str, int] = {}
    for path, count in violations.items():
        tower_violations[tower_of(path)] = tower_violations.get(tower_of(path), 0) + count
    layers: dict[str, dict[str, Any]] = {}
    for path, value in flat.items():
        if not is_prunable(path, value, rules):
            continue
        layers[path] = {
            "sparsity": measured["layers"][path],
            "pruned": path in kept if masks is not None else measured["layers"][path] > 0,
            "n_of_m": {p.name: n_of_m_valid(value, p) for p in checked},
            "mask_violations": None if masks is None else violations.get(path, 0),
        }

    towers: dict[str, dict[str, Any]] = {}
    for tower, sparsity in measured["towers"].items():
        own = [layer for path, layer in layers.items() if tower_of(path) == tower]
        pruned = [layer for layer in own if layer["pruned"]]
        towers[tower] = {
            "sparsity": float(sparsity),
            "layers": len(own),
            "pruned_layers": len(pruned),
            # None: no pruned layer to hold (or break) a pattern.
            "n_of_m": {p.name: all(layer["n_of_m"][p.name] for layer in pruned) if pruned else None for p in checked},
            "mask_violations": None if masks is None else tower_violations.get(tower, 0),
        }

    claims = _check_claims(*claim, flat, measured["towers"], layers) if claim is not None else []
    failures = [f"{c['tower']} claims {c['pattern']} at sparsity {c['claimed']:g}: {'; '.join(c['problems'])}"
                for c in claims if not c["ok"]]
    failures += [f"{tower}: {count} weights are nonzero where the mask prunes them"
                 for tower, count in tower_violations.items() if count]
    return {
        "patterns": [p.name for p in checked],
        "masks_checked": masks is not None,
        "towers": towers,
        "layers": layers,
        "claims": claims,
        "failures": failures,
        "ok": not failures,
    }


def claimed_pruning(metadata: Mapping[str, Any]) -> tuple[Mapping[str, Any] | None, str | None]:
    """The pruning claim a saved model's metadata makes, if it still applies, and a note when it does not."""
    claimed = metadata.get("pruning")
    restoration = metadata.get("restoration") or {}
    if claimed and restoration.get("method") == "lora" and not restoration.get("remask"):
        # LoRA restoration without remasking merges a dense update on purpose: the pruning claim is history.
        return None, "restored with dense LoRA (no remask): the recorded pruning no longer applies"
    return claimed, None


def format_verify(report: Mapping[str, Any]) -> str:
    """A short table (one line per tower) and an OK/FAILED line per claim and problem."""
    patterns = list(report["patterns"])
    header = f"{'tower':<10} {'sparsity':>8}  " + "  ".join(f"{p:>5}" for p in patterns) + "  mask violations"
    lines = [header]

    def cell(value: Any) -> str:
        return "-" if value is None else ("yes" if value else "no")

    for tower, summary in report["towers"].items():
        valid = "  ".join(f"{cell(summary['n_of_m'][p]):>5}" for p in patterns)
        violations = "-" if summary["mask_violations"] is None else str(summary["mask_violations"])
        lines.append(f"{tower:<10} {summary['sparsity']:>8.4f}  {valid}  {violations}")
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    for claim in report["claims"]:
        if claim["ok"]:
            lines.append(f"OK      {claim['tower']} claims {claim['pattern']} at sparsity {claim['claimed']:g} "
                         f"(measured {claim['measured']:.4f})")
    lines.extend(f"OK      sparsity_config claims {c['claim']}" for c in report.get("declared", []) if c["ok"])
    lines.extend(f"FAILED  {failure}" for failure in report["failures"])
    lines.append("verify: OK" if report["ok"] else f"verify: FAILED ({len(report['failures'])} problems)")
    return "\n".join(lines)


__all__: Sequence[str] = ["CHECKED_PATTERNS", "claimed_pruning", "format_verify", "n_of_m_valid", "verify_params"]
