"""Where to put sparsity: constant total s_v + s_l, vision share swept from 10% to 90%.

The paper found the equal split best (its figure: 50:50 → 45.0, 10:90 → 0.0, 90:10 → 28.3).

    python experiments/split_sweep.py [--method wanda] [--totals 1.0 1.2] [--seeds 0 1 2] [--out results] [--quick]
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparsevlm.config import SparsitySpec  # noqa: E402

from common import (Study, add_arguments, check_seeds, load_study, markdown_table, over_seeds, seeds_note,  # noqa: E402
                    with_spread, write_outputs)

STEM = "split_sweep"


def run(study: Study, totals: list[float], vision_values: list[float]) -> list[dict]:
    """Accuracy for every valid (total, vision sparsity) split."""
    rows = []
    for total in totals:
        for vision in vision_values:
            language = round(total - vision, 10)
            if not 0.0 <= language < 1.0:
                continue
            row = study.prune_row(SparsitySpec(vision=vision, language=language), total=total,
                                  vision=vision, language=language)
            print(f"seed {study.seed}  total {total:.1f}  vision {vision:.1f}  language {language:.1f}  "
                  f"accuracy {row['accuracy']:.4f}", flush=True)
            rows.append(row)
    return rows


def report(rows: list[dict], dense: float | None, method: str) -> tuple[str, object]:
    """Markdown table and figure."""
    table = markdown_table(
        ["total", "vision", "language", "accuracy", "measured vision", "measured language"],
        [[r["total"], r["vision"], r["language"], with_spread(r), r["measured"]["vision"], r["measured"]["language"]]
         for r in rows],
    )
    dense_note = f"; dense accuracy {dense:.4f}" if dense is not None else ""
    header = f"Split sweep ({method}, unstructured, {seeds_note(rows)}{dense_note})\n\n"
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for total in sorted({r["total"] for r in rows}):
        points = [(r["vision"], r["accuracy"], r.get("accuracy_std", 0.0)) for r in rows if r["total"] == total]
        x, y, spread = zip(*points)
        axis.errorbar(x, y, yerr=spread, marker="o", capsize=3, label=f"s_v + s_l = {total:.0%}")
    axis.set_xlabel("vision sparsity s_v")
    axis.set_ylabel("test accuracy")
    axis.set_title(f"Constant-sum split sweep ({method})")
    axis.legend()
    return header + table, figure


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run the sweep, write the outputs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--totals", type=float, nargs="+", default=[1.0, 1.2])
    args = parser.parse_args(argv)
    check_seeds(parser, args)
    study = load_study(args)
    vision_values = [0.1, 0.5, 0.9] if args.quick else [round(0.1 * i, 1) for i in range(1, 10)]
    rows = over_seeds(study, args.seeds, lambda seeded: run(seeded, args.totals, vision_values))
    dense = study.dense_accuracy
    markdown, figure = report(rows, dense, args.method)
    write_outputs(args.out, STEM, {"method": args.method, "dense_accuracy": dense, "seeds": args.seeds, "rows": rows},
                  markdown, figure)


if __name__ == "__main__":
    main()
