"""End-to-end jobs behind the CLI: load → work → evaluate → save with a JSON report."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
from jax.sharding import Mesh

from sparsevlm import sharding
from sparsevlm.checkpoint import ModelBundle
from sparsevlm.config import RestoreConfig
from sparsevlm.data import shapes
from sparsevlm.data.calibration import calibration_set
from sparsevlm.data.prompts import bundle_format
from sparsevlm.eval.evaluate import evaluate_vqa
from sparsevlm.pruning import SparsitySpec, apply_masks, measure_sparsity, prune
from sparsevlm.pruning.calibrate import calibration_carry
from sparsevlm.pruning.dsnot import DSnoTConfig
from sparsevlm.pruning.importance import allocation_ratios
from sparsevlm.pruning.prune import NEEDS_CALIBRATION
from sparsevlm.restore import restore, teacher_base


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
    source: str | None = None,
    mesh: Mesh | None = None,
    allocation: str = "uniform",
    max_layer_sparsity: float = 0.8,
    dsnot_config: DSnoTConfig = DSnoTConfig(),
) -> tuple[ModelBundle, dict[str, Any]]:
    """Prune a model, measure its sparsity and test accuracy; returns the pruned bundle and the report.

    `source` (the dense model's directory) is recorded so restoration can find its dense teacher.
    With `mesh`, params and calibration examples are sharded over it during pruning. `allocation`
    picks the per-layer ratios (`uniform`, or ECoFLaP's global allocation across the pruned towers).
    """
    calibration = None
    if method in NEEDS_CALIBRATION or allocation != "uniform":
        data = calibration_set(calib_data, bundle.tokenizer, calib_samples, seed, bundle.config.vision.image_size,
                               bundle_format(bundle.metadata), bundle.instruction_tokenizer, bundle.image_processor)
        calibration = calibration_carry(data, calib_samples, bundle.tokenizer.pad_token_id, bundle.config.vision, seed)
    started = time.perf_counter()
    ratios = allocation_ratios(allocation, bundle.params, bundle.config, spec, calibration, max_layer_sparsity,
                               jax.random.key(seed))
    allocation_seconds = time.perf_counter() - started
    params = bundle.params
    if mesh is not None:
        params = sharding.shard(params, sharding.param_shardings(params, mesh))
        if calibration is not None:
            calibration = sharding.shard(calibration, sharding.batch_shardings(calibration, mesh))
    result = prune(
        params, bundle.config, spec, method, calibration, calibration_mode,
        key=jax.random.key(seed), progress=progress, ratios=ratios, dsnot_config=dsnot_config,
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
        "allocation": allocation,
        "ratios": dict(sorted(result.ratios.items())),
        "dsnot": dataclasses.asdict(dsnot_config) if method == "dsnot" else None,
        "layer_sparsity": measured["layers"],
        "row_sparsity_range": {p: list(r) for p, r in measured["rows"].items() if p in result.ratios},
        "calibration": None if calibration is None else {
            "data": calib_data, "samples": calib_samples, "mode": calibration_mode,
        },
        "seed": seed,
        "prune_seconds": round(result.seconds, 2),
        "allocation_seconds": round(allocation_seconds, 2),
        "mesh": dict(mesh.shape) if mesh is not None else None,
    }
    pruning = {k: report[k] for k in ("method", "pattern", "target", "measured", "calibration", "seed", "allocation")}
    if allocation != "uniform":
        pruning["ratios"] = report["ratios"]
    metadata = dict(bundle.metadata) | {"pruning": pruning | {"source_model": source},
                                         "test_accuracy": evaluation["accuracy"]}
    return dataclasses.replace(pruned, metadata=metadata), report


def restore_job(
    pruned: ModelBundle,
    teacher: ModelBundle,
    config: RestoreConfig,
    remask: bool = False,
    eval_images: int | None = None,
    checkpoint_dir: str | None = None,
    progress: bool = True,
    mesh: Mesh | None = None,
    plan_only: bool = False,
) -> tuple[ModelBundle | None, dict[str, Any]]:
    """Restore a pruned model with LoRA/SparseLoRA from its dense teacher; returns the merged bundle and report.

    With `mesh` training is sharded; `plan_only` returns `(None, {"memory": ...})` without training.
    """
    if pruned.masks is None:
        raise ValueError("the model to restore has no masks: prune it first with `sparsevlm prune`")
    if teacher.config != pruned.config:
        raise ValueError("the teacher's architecture differs from the pruned model's")
    base = teacher_base(pruned.params, pruned.masks, teacher.params)
    result = restore(base, pruned.masks, pruned.config, pruned.tokenizer, config, checkpoint_dir, progress,
                     bundle_format(pruned.metadata), pruned.instruction_tokenizer, pruned.image_processor,
                     mesh, plan_only)
    if plan_only:
        return None, {"memory": result.memory}
    params = apply_masks(result.params, pruned.masks) if remask else result.params
    params = jax.device_get(params)
    keeps_masks = config.method == "sparselora" or remask
    restored = dataclasses.replace(pruned, params=params, masks=pruned.masks if keeps_masks else None)
    test = shapes.build_split("test", eval_images, image_size=pruned.config.vision.image_size)
    evaluation = evaluate_vqa(restored, test, progress=progress)
    report: dict[str, Any] = {
        "method": config.method,
        "accuracy": evaluation["accuracy"],
        "measured": measure_sparsity(params)["towers"],
        "steps": config.steps,
        "kl_weight": config.kl_weight,
        "temperature": config.temperature,
        "remask": remask,
        "accuracy_by_type": evaluation["by_type"],
        "eval_questions": evaluation["n"],
        "target": pruned.metadata.get("pruning", {}).get("target"),
        "pruned_accuracy": pruned.metadata.get("test_accuracy"),
        "dense_accuracy": teacher.metadata.get("test_accuracy"),
        "config": dataclasses.asdict(config),
        "restore_seconds": round(result.seconds, 1),
        "loss_history": result.history,
        "skipped_steps": result.skipped,
        "mesh": dict(mesh.shape) if mesh is not None else None,
        "memory_per_device": result.memory,
    }
    metadata = dict(pruned.metadata) | {
        "restoration": {k: report[k] for k in ("method", "steps", "kl_weight", "temperature", "remask")},
        "test_accuracy": evaluation["accuracy"],
    }
    return dataclasses.replace(restored, metadata=metadata), report
