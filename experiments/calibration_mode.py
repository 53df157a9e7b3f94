"""Sequential vs dense calibration: does feeding each block the *pruned* blocks' outputs matter?

Wanda and SparseGPT calibrate sequentially (block i sees the outputs of the already-pruned blocks
before it); the paper's restoration code computed masks from the dense model's activations. This
runs both on the default model for Wanda and SparseGPT at several sparsities and reports accuracy.

    python experiments/calibration_mode.py [--model default] [--calib-samples 128] [--out results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sparsevlm.config import CALIBRATION_MODES, SparsitySpec
from sparsevlm.integrity import write_atomic
from sparsevlm.masks import measure_sparsity

from common import Study, add_arguments, check_seeds, load_study, machine

SPECS = {
    "both 50%": SparsitySpec.same(0.5),
    "both 70%": SparsitySpec.same(0.7),
    "both 2:4": SparsitySpec.same(0.5, "2:4"),
    "language 70%": SparsitySpec.language_only(0.7),
}


def run(study: Study) -> list[dict]:
    """Accuracy of every (method, spec, calibration mode) on the test split."""
    rows = []
    for method in ("wanda", "sparsegpt"):
        for name, spec in SPECS.items():
            for mode in CALIBRATION_MODES:
                pruned = study.prune(spec, method, mode)  # evaluated on the test split as it is pruned
                rows.append({
                    "method": method, "setting": name, "mode": mode, "accuracy": pruned.report["accuracy"],
                    "measured": measure_sparsity(pruned.result.params)["towers"],
                    "prune_seconds": round(pruned.result.seconds, 2),
                })
                print(f"{method:<9} {name:<13} {mode:<10} accuracy {rows[-1]['accuracy']:.4f}", flush=True)
    return rows


def to_markdown(rows: list[dict], dense_accuracy: float | None) -> str:
    """One row per (method, setting): accuracy under each mode and the difference."""
    lines = [
        f"Dense model accuracy: {dense_accuracy:.4f}" if dense_accuracy is not None else "",
        "",
        "| method | setting | sequential | dense | sequential − dense |",
        "|---|---|---|---|---|",
    ]
    keyed = {(r["method"], r["setting"], r["mode"]): r["accuracy"] for r in rows}
    for method, setting in dict.fromkeys((r["method"], r["setting"]) for r in rows):
        seq, dense = keyed[(method, setting, "sequential")], keyed[(method, setting, "dense")]
        lines.append(f"| {method} | {setting} | {seq:.4f} | {dense:.4f} | {seq - dense:+.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run, write `calibration_mode.json` and `.md`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)  # --method is ignored: both calibrated methods are compared
    args = parser.parse_args(argv)
    check_seeds(parser, args, most=1)
    started = time.perf_counter()
    study = load_study(args)
    rows = run(study)
    dense_accuracy = study.dense_accuracy
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model": args.model, "calib_samples": args.calib_samples, "calib_data": study.settings["calib_data"],
               "seed": args.seeds[0], "dense_accuracy": dense_accuracy, "rows": rows,
               "seconds": round(time.perf_counter() - started, 1), "machine": machine()}
    write_atomic(out / "calibration_mode.json", json.dumps(payload, indent=2))
    markdown = to_markdown(rows, dense_accuracy)
    write_atomic(out / "calibration_mode.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
