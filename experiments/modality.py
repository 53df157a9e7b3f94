"""Which tower to prune: both towers vs language only vs vision only, at 50%, 70%, 2:4 and 4:8.

The paper found pruning only the language model keeps far more accuracy than pruning both. Each
setting is pruned with the study's method (Wanda), with every other pruner of the registry
(magnitude, random, SparseGPT, DSnoT: Wanda's mask refined), and with ECoFLaP (Wanda at per-block
ratios from zeroth-order importance, one budget across the pruned towers; unstructured levels only,
since N:M fixes every layer's sparsity).

    python experiments/modality.py [--method wanda] [--seeds 0 1 2] [--out results] [--quick]
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sparsevlm.config import SparsitySpec  # noqa: E402
from sparsevlm.pruning.registry import METHODS  # noqa: E402

from common import (PRUNERS, Study, add_arguments, check_seeds, load_study, markdown_table, over_seeds,  # noqa: E402
                    seeds_note, with_spread, write_outputs)

STEM = "modality"
SETTINGS = {
    "both": SparsitySpec.same,
    "language only": SparsitySpec.language_only,
    "vision only": SparsitySpec.vision_only,
}
LEVELS = {"50%": (0.5, "unstructured"), "70%": (0.7, "unstructured"), "2:4": (0.5, "2:4"), "4:8": (0.5, "4:8")}


def run(study: Study, levels: dict[str, tuple[float, str]], extra_settings: tuple[str, ...] = tuple(SETTINGS)
        ) -> list[dict]:
    """Accuracy for every (pruner, tower setting, sparsity level) the pruner supports.

    The study's method runs every setting; the other pruners only `extra_settings`.
    """
    pruners = every_pruner(study.method)
    rows = []
    for pruner, (method, allocation) in pruners.items():
        for level, (sparsity, pattern) in levels.items():
            if allocation != "uniform" and pattern != "unstructured":
                continue
            for setting, make in SETTINGS.items():
                if pruner != study.method and setting not in extra_settings:
                    continue
                row = study.prune_row(make(sparsity, pattern), method, allocation, setting=setting, level=level,
                                      pruner=pruner)
                print(f"seed {study.seed}  {pruner:<8} {setting:<14} {level:<4} accuracy {row['accuracy']:.4f}",
                      flush=True)
                rows.append(row)
    return rows


def every_pruner(method: str) -> dict[str, tuple[str, str]]:
    """`{name: (method, allocation)}`: `method` first, then every registered pruner, then ECoFLaP."""
    return {method: (method, "uniform")} | {m: (m, "uniform") for m in METHODS} | PRUNERS


def report(rows: list[dict], dense: float | None, method: str) -> tuple[str, object]:
    """Markdown table (pruner × settings × levels) and a grouped bar chart per pruner."""
    levels = list(dict.fromkeys(r["level"] for r in rows))
    pruners = list(dict.fromkeys(r["pruner"] for r in rows))
    keyed = {(r["pruner"], r["setting"], r["level"]): r for r in rows}
    by = {key: r["accuracy"] for key, r in keyed.items()}
    spread = {key: r.get("accuracy_std", 0.0) for key, r in keyed.items()}
    table = markdown_table(
        ["pruner", "pruned towers", *levels],
        [[p, s, *[with_spread(keyed[(p, s, lv)]) if (p, s, lv) in keyed else "–" for lv in levels]]
         for p in pruners for s in SETTINGS],
    )
    dense_note = f"; dense accuracy {dense:.4f}" if dense is not None else ""
    header = f"Modality ({method} is the base pruner; {seeds_note(rows)}{dense_note})\n\n"
    figure, axes = plt.subplots(1, len(pruners), figsize=(4.5 * len(pruners), 3.5), sharey=True, squeeze=False)
    width = 0.8 / len(SETTINGS)
    for axis, pruner in zip(axes[0], pruners):
        for i, setting in enumerate(SETTINGS):
            values = [by.get((pruner, setting, lv), np.nan) for lv in levels]
            errors = [spread.get((pruner, setting, lv), 0.0) for lv in levels]
            axis.bar(np.arange(len(levels)) + i * width, values, width, yerr=errors, capsize=2, label=setting)
        axis.set_xticks(np.arange(len(levels)) + width, levels)
        axis.set_title(pruner)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7)
    figure.suptitle("Which towers to prune")
    return header + table, figure


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run the study, write the outputs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    check_seeds(parser, args)
    study = load_study(args)
    levels = {k: LEVELS[k] for k in ("50%", "2:4")} if args.quick else LEVELS
    # --quick: the other pruners on both towers only.
    extra = ("both",) if args.quick else tuple(SETTINGS)
    rows = over_seeds(study, args.seeds, lambda seeded: run(seeded, levels, extra))
    dense = study.dense_accuracy
    markdown, figure = report(rows, dense, args.method)
    write_outputs(args.out, STEM, {"method": args.method, "dense_accuracy": dense, "seeds": args.seeds, "rows": rows},
                  markdown, figure)


if __name__ == "__main__":
    main()
