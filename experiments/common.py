"""Shared pieces of the paper's studies: load, calibrate, prune, evaluate, and write json/md/png."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any, Sequence

import jax

from sparsevlm import hub
from sparsevlm.checkpoint import ModelBundle
from sparsevlm.data import shapes
from sparsevlm.data.calibration import CALIBRATION_SETS, DATA_HELP, calibration_set, data_flag
from sparsevlm.data.prompts import bundle_format
from sparsevlm.eval.evaluate import evaluate_vqa
from sparsevlm.integrity import write_atomic
from sparsevlm.models.stages import Carry
from sparsevlm.pruning import METHODS, SparsitySpec, measure_sparsity, prunable_paths, prune
from sparsevlm.pruning.allocation import global_ratios
from sparsevlm.pruning.calibrate import calibration_carry
from sparsevlm.pruning.importance import CALIBRATION_BATCHES, ECOFLAP_ORDERS, importance_scores


# The pruners the studies compare: a method and a per-layer allocation.
PRUNERS = {
    "dsnot": ("dsnot", "uniform"),
    "ecoflap": ("wanda", "ecoflap-zeroth"),
}


@dataclasses.dataclass
class Study:
    """What every study needs: the dense model, its calibration carry and the evaluation split."""

    bundle: ModelBundle
    calibration: Carry
    test: Any
    method: str
    seed: int
    importance_batches: int = CALIBRATION_BATCHES
    _scores: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict, repr=False)

    def evaluate(self, params: Any) -> float:
        """Test accuracy of `params` (same architecture as the dense model)."""
        return evaluate_vqa(dataclasses.replace(self.bundle, params=params), self.test, progress=False)["accuracy"]

    def ratios(self, spec: SparsitySpec, allocation: str) -> dict[str, float] | None:
        """Per-layer ratios for `allocation` (None: uniform); ECoFLaP scores are computed once per study."""
        if allocation == "uniform":
            return None
        order = ECOFLAP_ORDERS[allocation]
        if order not in self._scores:
            paths = prunable_paths(self.bundle.params)
            self._scores[order] = importance_scores(self.bundle.params, self.bundle.config, self.calibration, paths,
                                                    order, jax.random.key(self.seed), self.importance_batches)
        return global_ratios(self.bundle.params, spec, self._scores[order])

    def pruners(self) -> dict[str, tuple[str, str]]:
        """`{name: (method, allocation)}`: the study's method first, then the other pruners compared."""
        return {self.method: (self.method, "uniform")} | PRUNERS

    def prune(self, spec: SparsitySpec, method: str | None = None, mode: str = "sequential",
              allocation: str = "uniform") -> Any:
        """Prune the dense model to `spec` (with the study's method unless given)."""
        return prune(self.bundle.params, self.bundle.config, spec, method or self.method, self.calibration,
                     mode, key=jax.random.key(self.seed), ratios=self.ratios(spec, allocation))

    def prune_row(self, spec: SparsitySpec, method: str | None = None, allocation: str = "uniform",
                  **labels: Any) -> dict[str, Any]:
        """Prune, evaluate and describe one setting as a table row."""
        result = self.prune(spec, method, allocation=allocation)
        return labels | {
            "accuracy": self.evaluate(result.params),
            "target": spec.targets,
            "measured": measure_sparsity(result.params)["towers"],
            "pattern": spec.pattern,
            "method": method or self.method,
            "allocation": allocation,
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every study."""
    parser.add_argument("--model", default="default", help="'default' or a saved model directory")
    parser.add_argument("--method", default="wanda", choices=METHODS)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-data", default=CALIBRATION_SETS[0], type=data_flag, help=DATA_HELP)
    parser.add_argument("--eval-images", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results")
    parser.add_argument("--quick", action="store_true", help="small budgets, for CI")


def load_study(args: argparse.Namespace) -> Study:
    """The dense model (trained on first use if it is the default), calibration data and test split."""
    bundle = hub.load_model(args.model)
    samples = min(args.calib_samples, 16) if args.quick else args.calib_samples
    data = calibration_set(args.calib_data, bundle.tokenizer, samples, args.seed, bundle.config.vision.image_size,
                           bundle_format(bundle.metadata), bundle.instruction_tokenizer, bundle.image_processor)
    calibration = calibration_carry(data, samples, bundle.tokenizer.pad_token_id, bundle.config.vision, args.seed)
    eval_images = args.eval_images if args.eval_images else (40 if args.quick else None)
    test = shapes.build_split("test", eval_images, image_size=bundle.config.vision.image_size)
    # ECoFLaP sums its importance over 32 calibration batches; --quick uses 4.
    return Study(bundle, calibration, test, args.method, args.seed, 4 if args.quick else CALIBRATION_BATCHES)


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
