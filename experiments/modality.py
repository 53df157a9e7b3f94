"""Which tower to prune: both towers vs language only vs vision only, at 50%, 70%, 2:4 and 4:8.

The paper found pruning only the language model keeps far more accuracy than pruning both.

    python experiments/modality.py [--method wanda] [--out results] [--quick]
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common import Study, add_arguments, load_study, markdown_table, write_outputs  # noqa: E402
from sparsevlm.pruning import SparsitySpec  # noqa: E402

STEM = "modality"
SETTINGS = {
    "both": SparsitySpec.same,
    "language only": SparsitySpec.language_only,
    "vision only": SparsitySpec.vision_only,
}
LEVELS = {"50%": (0.5, "unstructured"), "70%": (0.7, "unstructured"), "2:4": (0.5, "2:4"), "4:8": (0.5, "4:8")}


def run(study: Study, levels: dict[str, tuple[float, str]]) -> list[dict]:
    """Accuracy for every (tower setting, sparsity level)."""
    rows = []
    for level, (sparsity, pattern) in levels.items():
        for setting, make in SETTINGS.items():
            row = study.prune_row(make(sparsity, pattern), setting=setting, level=level)
            print(f"{setting:<14} {level:<4} accuracy {row['accuracy']:.4f}", flush=True)
            rows.append(row)
    return rows


def report(rows: list[dict], dense: float | None, method: str) -> tuple[str, object]:
    """Markdown table (settings × levels) and a grouped bar chart."""
    levels = list(dict.fromkeys(r["level"] for r in rows))
    by = {(r["setting"], r["level"]): r["accuracy"] for r in rows}
    table = markdown_table(["pruned towers", *levels], [[s, *[by[(s, lv)] for lv in levels]] for s in SETTINGS])
    header = f"Modality ({method}; dense accuracy {dense:.4f})\n\n" if dense is not None else ""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(SETTINGS)
    for i, setting in enumerate(SETTINGS):
        axis.bar(np.arange(len(levels)) + i * width, [by[(setting, lv)] for lv in levels], width, label=setting)
    axis.set_xticks(np.arange(len(levels)) + width, levels)
    axis.set_ylabel("test accuracy")
    axis.set_title(f"Which towers to prune ({method})")
    axis.legend()
    return header + table, figure


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run the study, write the outputs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    study = load_study(args)
    levels = {k: LEVELS[k] for k in ("50%", "2:4")} if args.quick else LEVELS
    rows = run(study, levels)
    dense = study.bundle.metadata.get("test_accuracy")
    markdown, figure = report(rows, dense, args.method)
    write_outputs(args.out, STEM, {"method": args.method, "dense_accuracy": dense, "rows": rows}, markdown, figure)


if __name__ == "__main__":
    main()
