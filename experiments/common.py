"""Shared pieces of the paper's studies: load, calibrate, prune, evaluate, and write json/md/png."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from sparsevlm import hub
from sparsevlm.config import ECOFLAP_BATCHES, DataSource, PruneConfig, SparsitySpec
from sparsevlm.cli import add_config_flags, config_from_args, data_flag
from sparsevlm.data.builtin import own_set
from sparsevlm.data.tasks import DATA_HELP
from sparsevlm.integrity import write_atomic
from sparsevlm.pipeline import Pipeline, Pruned
from sparsevlm.pruning.registry import METHODS

# The pruners the studies compare: a method and a per-layer allocation.
PRUNERS = {
    "dsnot": ("dsnot", "uniform"),
    "ecoflap": ("wanda", "ecoflap-zeroth"),
}


@dataclasses.dataclass
class Study:
    """What every study needs: the pipeline on the dense model, and the prune settings every run shares."""

    pipeline: Pipeline
    method: str
    settings: dict[str, Any]  # PruneConfig fields shared by every run: calibration data and samples, seed, ...

    @property
    def bundle(self) -> Any:
        """The dense model."""
        return self.pipeline.bundle

    def evaluate(self, params: Any) -> float:
        """Test accuracy of `params` (same architecture as the dense model)."""
        return self.pipeline.evaluate(params)["accuracy"]

    def config(self, spec: SparsitySpec, method: str | None = None, mode: str = "sequential",
               allocation: str = "uniform") -> PruneConfig:
        """The prune settings of one run: the study's method unless given."""
        return PruneConfig(method=method or self.method, sparsity=spec, calibration_mode=mode, allocation=allocation,
                           **self.settings)

    @functools.cached_property
    def dense_accuracy(self) -> float:
        """The dense model's accuracy on the study's own test set (what every pruned row is scored on)."""
        return self.evaluate(self.bundle.params)

    @property
    def seed(self) -> int:
        """The calibration sample (and random pruner) seed of every run."""
        return self.settings["seed"]

    def with_seed(self, seed: int) -> "Study":
        """The same study (same loaded model and pipeline) calibrating with `seed`."""
        return dataclasses.replace(self, settings=self.settings | {"seed": seed})

    def pruners(self) -> dict[str, tuple[str, str]]:
        """`{name: (method, allocation)}`: the study's method first, then the other pruners compared."""
        return {self.method: (self.method, "uniform")} | PRUNERS

    def prune(self, spec: SparsitySpec, method: str | None = None, mode: str = "sequential",
              allocation: str = "uniform") -> Pruned:
        """Prune the dense model to `spec` (with the study's method unless given) and evaluate it."""
        return self.pipeline.prune(self.config(spec, method, mode, allocation))

    def prune_row(self, spec: SparsitySpec, method: str | None = None, allocation: str = "uniform",
                  **labels: Any) -> dict[str, Any]:
        """Prune, evaluate and describe one setting as a table row."""
        report = self.prune(spec, method, allocation=allocation).report
        return labels | {k: report[k] for k in ("accuracy", "target", "measured", "pattern", "method", "allocation")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every study."""
    parser.add_argument("--model", default="default", help="'default' or a saved model directory")
    parser.add_argument("--method", default="wanda", choices=tuple(METHODS))
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-data", default=None, type=data_flag,
                        help=f"{DATA_HELP} (default: the model's own task's captions, e.g. scenes-captions)")
    add_config_flags(parser, DataSource)  # --dataset-config, --streaming, --images: how TASK=SOURCE data is read
    parser.add_argument("--eval-images", type=int, default=None, help="evaluate on the first N test images")
    add_seeds_flag(parser, [0])
    parser.add_argument("--out", default="results")
    parser.add_argument("--quick", action="store_true", help="small budgets, for CI")


def add_seeds_flag(parser: argparse.ArgumentParser, default: Sequence[int]) -> None:
    """`--seeds`: the calibration seeds a study runs (checked by `check_seeds`)."""
    parser.add_argument("--seeds", type=int, nargs="+", default=list(default), metavar="SEED",
                        help="calibration seeds (the random pruner's and restoration's too); with several, every "
                             "number is their mean ± sample standard deviation (default: %(default)s)")


def data_source(args: argparse.Namespace) -> DataSource:
    """How the study reads its `TASK=SOURCE` data flags (`--dataset-config`, `--streaming`, `--images`)."""
    return config_from_args(DataSource, args)


def load_study(args: argparse.Namespace) -> Study:
    """The dense model (trained on first use if it is the default), its pipeline and the shared prune settings."""
    bundle = hub.load_model(args.model)
    eval_images = args.eval_images if args.eval_images else (40 if args.quick else None)
    # --quick: 16 calibration samples, and ECoFLaP sums its importance over 4 batches instead of 32.
    settings = {"calib_data": args.calib_data or own_set(bundle.metadata, "captions"),
                "calib_samples": min(args.calib_samples, 16) if args.quick else args.calib_samples,
                "seed": args.seeds[0],
                "importance_batches": 4 if args.quick else ECOFLAP_BATCHES, "calib_source": data_source(args)}
    return Study(Pipeline(bundle, eval_images, progress=False), args.method, settings)


def check_seeds(parser: argparse.ArgumentParser, args: argparse.Namespace, most: int | None = None) -> None:
    """Refuse repeated or negative `--seeds`, or more than `most` of them (a study that runs one seed)."""
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error(f"--seeds {' '.join(map(str, args.seeds))}: seeds must be distinct and non-negative")
    if most is not None and len(args.seeds) > most:
        parser.error(f"--seeds {' '.join(map(str, args.seeds))}: this study runs {most} seed")


# Fields of a study's row that vary with the seed and are averaged; every other field must agree.
AVERAGED = ("accuracy", "measured", "train_seconds")


def over_seeds(study: Study, seeds: Sequence[int], run: Callable[[Study], list[dict[str, Any]]]
               ) -> list[dict[str, Any]]:
    """`run` once per seed on the same loaded model; its rows merged: `accuracy` is the mean over seeds,
    with `accuracy_std` (sample standard deviation, 0 for one seed), `accuracies` and `seeds`."""
    runs = [run(study.with_seed(seed)) for seed in seeds]
    return merge_seeds(runs, list(seeds))


def merge_seeds(runs: list[list[dict[str, Any]]], seeds: list[int]) -> list[dict[str, Any]]:
    """Rows of the same runs at several seeds, row by row, into one row each (see `over_seeds`)."""
    if len({len(rows) for rows in runs}) != 1:
        raise ValueError(f"the seeds {seeds} ran different numbers of rows: {[len(rows) for rows in runs]}")
    merged = []
    for rows in zip(*runs):
        first = rows[0]
        for row in rows[1:]:
            differ = [k for k in first if k not in AVERAGED and row.get(k) != first[k]]
            if differ or set(row) != set(first):
                raise ValueError(f"rows of one setting differ between seeds {seeds} in {differ or 'their fields'}")
        accuracies = [float(r["accuracy"]) for r in rows]
        out = dict(first) | {"accuracy": float(np.mean(accuracies)),
                             "accuracy_std": float(np.std(accuracies, ddof=1)) if len(rows) > 1 else 0.0,
                             "accuracies": accuracies, "seeds": seeds}
        if "measured" in first:
            out["measured"] = {k: float(np.mean([r["measured"][k] for r in rows])) for k in first["measured"]}
        if "train_seconds" in first:
            out["train_seconds"] = round(float(np.mean([r["train_seconds"] for r in rows])), 1)
        merged.append(out)
    return merged


def with_spread(row: dict[str, Any], key: str = "accuracy") -> Any:
    """`row[key]` as a table cell: the float for one seed, "mean ± sd" for several."""
    if len(row.get("seeds", ())) < 2:
        return row[key]
    return f"{row[key]:.4f} ± {row[key + '_std']:.4f}"


def seeds_note(rows: list[dict[str, Any]]) -> str:
    """What a table's numbers are over: "seed 0", or "mean ± sd over seeds 0, 1, 2"."""
    seeds = rows[0].get("seeds", []) if rows else []
    if len(seeds) < 2:
        return f"seed {seeds[0]}" if seeds else "one seed"
    return "mean ± sample sd over seeds " + ", ".join(map(str, seeds))


def machine() -> dict[str, Any]:
    """When and where a study ran."""
    return {
        "date": datetime.date.today().isoformat(),
        "host": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "platform": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats printed with 4 decimals."""
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_outputs(out: str | Path, stem: str, payload: dict[str, Any], markdown: str, figure: Any) -> None:
    """`<out>/<stem>.json`, `.md` and `.png`, and the table on stdout."""
    out = Path(out)
    # Each file is written whole or not at all: a killed study never leaves half a table behind.
    write_atomic(out / f"{stem}.json", json.dumps(payload | {"machine": machine()}, indent=2))
    write_atomic(out / f"{stem}.md", markdown)
    write_atomic(out / f"{stem}.png", lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    print(markdown)
    print(f"wrote {out / stem}.json, .md, .png")
