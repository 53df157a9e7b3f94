"""End-to-end jobs behind the CLI: load → work → evaluate → save with a JSON report."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from sparsevlm.checkpoint import ModelBundle
from sparsevlm.data import shapes
from sparsevlm.data.calibration import calibration_set
from sparsevlm.eval.evaluate import evaluate_vqa
from sparsevlm.pruning import SparsitySpec, measure_sparsity, prune
from sparsevlm.pruning.calibrate import calibration_carry


def prune_job(
    bundle: ModelBundle,
    spec: SparsitySpec,
    method: str,
    calib_samples: int = 128,
    calib_data: str = "shapes-captions",
    calibration_mode: str = "sequential",
    seed: int = 0,
    eval_images: int | None = None,
    progress: bool = True,
) -> tuple[ModelBundle, dict[str, Any]]:
    """Prune a model, measure its sparsity and test accuracy; returns the pruned bundle and the report."""
    calibration = None
    if method in ("wanda", "sparsegpt"):
        data = calibration_set(calib_data, bundle.tokenizer, calib_samples, seed, bundle.config.vision.image_size)
        calibration = calibration_carry(data, calib_samples, bundle.tokenizer.pad_token_id, bundle.config.vision, seed)
    result = prune(
        bundle.params, bundle.config, spec, method, calibration, calibration_mode,
        key=jax.random.key(seed), progress=progress,
    )
    measured = measure_sparsity(result.params)
    pruned = dataclasses.replace(bundle, params=result.params, masks=result.masks)
    test = shapes.build_split("test", eval_images, image_size=bundle.config.vision.image_size)
    evaluation = evaluate_vqa(pruned, test, progress=progress)
    report: dict[str, Any] = {
        "method": method,
        "pattern": spec.pattern,
        "target": spec.targets,
        "measured": measured["towers"],
        "accuracy": evaluation["accuracy"],
        "accuracy_by_type": evaluation["by_type"],
        "eval_questions": evaluation["n"],
        "base_accuracy": bundle.metadata.get("test_accuracy"),
        "pruned_params": sorted(result.ratios),
        "layer_sparsity": measured["layers"],
        "row_sparsity_range": {p: list(r) for p, r in measured["rows"].items() if p in result.ratios},
        "calibration": None if calibration is None else {
            "data": calib_data, "samples": calib_samples, "mode": calibration_mode,
        },
        "seed": seed,
        "prune_seconds": round(result.seconds, 2),
    }
    metadata = dict(bundle.metadata) | {"pruning": {k: report[k] for k in ("method", "pattern", "target", "measured",
                                                                             "calibration", "seed")},
                                         "test_accuracy": evaluation["accuracy"]}
    return dataclasses.replace(pruned, metadata=metadata), report
