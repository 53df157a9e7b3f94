"""What DSnoT does to each layer's reconstruction error, with and without the squared-error guard.

Every prunable layer of both towers is pruned block by block (sequential calibration, Wanda's masks
fed forward); each layer's Wanda mask is refined by DSnoT and by DSnoT with `guard=True`, and both
are compared with the starting mask on the calibration tokens: the expected error Σ_i |E[y − ŷ]_i|
(what DSnoT drives down) and the squared error ‖(W − Ŵ)ᵀX‖² (from XᵀX).

    python experiments/dsnot_error.py [--model default] [--out results]
"""

from __future__ import annotations

import argparse
from typing import Any

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sparsevlm.config import (
    DSnoTConfig,  # noqa: E402
    SparsitySpec,  # noqa: E402
)
from sparsevlm.models.vlm import forward_stages  # noqa: E402
from sparsevlm.pruning import uniform_ratios  # noqa: E402
from sparsevlm.pruning.calibrate import prune_blockwise  # noqa: E402
from sparsevlm.pruning.dsnot import dsnot, expected_error, squared_error  # noqa: E402
from sparsevlm.pruning.pruner import prune_layer  # noqa: E402

from common import Study, add_arguments, check_seeds, load_study, markdown_table, write_outputs  # noqa: E402

STEM = "dsnot_error"
SETTINGS = {"50%": SparsitySpec.same(0.5), "70%": SparsitySpec.same(0.7), "2:4": SparsitySpec.same(0.5, "2:4")}
VARIANTS = {"DSnoT": DSnoTConfig(), "DSnoT + guard": DSnoTConfig(guard=True)}


def run(study: Study) -> list[dict[str, Any]]:
    """Per (setting, variant): layers changed, and the ratios of both errors to the starting mask's."""
    rows = []
    for setting, spec in SETTINGS.items():
        pattern = spec.parsed_pattern
        ratios = uniform_ratios(study.bundle.params, spec)
        layers: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}

        def layer(path: str, kernel: Any, stats: Any) -> tuple[Any, Any]:
            _, start = prune_layer("wanda", kernel, stats, pattern, ratios[path])
            mean0 = float(jnp.abs(expected_error(kernel, start, stats.mean)).sum())
            squared0 = float(squared_error(kernel, start, stats.hessian).sum())
            for name, config in VARIANTS.items():
                keep, cycles = dsnot(kernel, start, stats, pattern, config)
                layers[name].append({
                    "path": path, "cycles": int(cycles), "swapped": int((keep != start).sum()) // 2,
                    "expected": float(jnp.abs(expected_error(kernel, keep, stats.mean)).sum()) / mean0,
                    "squared": float(squared_error(kernel, keep, stats.hessian).sum()) / squared0,
                })
            return jnp.where(start, kernel, 0), start

        calibration = study.pipeline.calibration(study.config(spec))
        prune_blockwise(study.bundle.params, forward_stages(study.bundle.config), calibration, ratios, layer,
                        need_hessian=True)
        for name, found in layers.items():
            squared = np.array([r["squared"] for r in found])
            expected = np.array([r["expected"] for r in found])
            rows.append({
                "setting": setting, "variant": name, "layers": len(found),
                "changed": sum(r["swapped"] > 0 for r in found),
                "expected_ratio_min": float(expected.min()), "expected_ratio_max": float(expected.max()),
                "squared_ratio_min": float(squared.min()), "squared_ratio_median": float(np.median(squared)),
                "squared_ratio_max": float(squared.max()),
                "squared_worse": [r["path"] for r in found if r["squared"] > 1 + 1e-6],
                "per_layer": found,
            })
            print(f"{setting:<4} {name:<14} changed {rows[-1]['changed']:>2} of {len(found)}; squared error ratio "
                  f"min {squared.min():.4f} max {squared.max():.4f}", flush=True)
    return rows


def report(rows: list[dict[str, Any]]) -> tuple[str, object]:
    """Markdown table and a histogram of per-layer squared-error ratios."""
    table = markdown_table(
        ["setting", "variant", "layers changed", "expected error ratio (max)", "squared error ratio (min)",
         "squared error ratio (max)", "layers whose squared error rose"],
        [[r["setting"], r["variant"], f"{r['changed']} of {r['layers']}", r["expected_ratio_max"],
          r["squared_ratio_min"], r["squared_ratio_max"], ", ".join(r["squared_worse"]) or "none"] for r in rows],
    )
    header = ("DSnoT on Wanda's masks, both towers, per layer: errors after DSnoT over the starting mask's "
              "(1 = unchanged)\n\n")
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for r in rows:
        changed = [layer["squared"] for layer in r["per_layer"] if layer["swapped"]]
        axis.hist(changed, bins=20, histtype="step", label=f"{r['setting']} {r['variant']}")
    axis.axvline(1.0, color="black", linewidth=1)
    axis.set_xlabel("squared reconstruction error / Wanda's (changed layers)")
    axis.set_ylabel("layers")
    axis.legend(fontsize=6)
    return header + table, figure


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run the study, write the outputs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)  # --method is ignored: DSnoT always starts from Wanda's masks here
    args = parser.parse_args(argv)
    check_seeds(parser, args, most=1)
    study = load_study(args)
    rows = run(study)
    markdown, figure = report(rows)
    write_outputs(args.out, STEM, {"rows": rows}, markdown, figure)


if __name__ == "__main__":
    main()
