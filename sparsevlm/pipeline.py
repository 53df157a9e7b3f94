"""The pipeline from a dense model: calibrate → allocate → prune → evaluate → restore → evaluate.

The command line's jobs and the paper's studies both run it through `Pipeline`, so a pruning run
means the same thing in both; the pipeline keeps what settings share (the calibration examples,
ECoFLaP's importance scores, the test split) and computes each once.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh

from sparsevlm import sharding
from sparsevlm.bundle import ModelBundle
from sparsevlm.config import PruneConfig, RestoreConfig
from sparsevlm.data.builtin import model_task, own_set, task_module
from sparsevlm.data.examples import EncodedSet, load_examples
from sparsevlm.data.prompts import bundle_format
from sparsevlm.eval.evaluate import evaluate_vqa
from sparsevlm.masks import apply_masks, measure_sparsity, prunable_paths
from sparsevlm.models.stages import Carry
from sparsevlm.pruning.calibrate import calibration_carry
from sparsevlm.pruning.importance import ECOFLAP_ORDERS, allocation_ratios, importance_scores
from sparsevlm.pruning.pruner import PruneResult, prune
from sparsevlm.restoration import RestoreResult, dense_where_pruned, restore

PyTree = Any
_Config = TypeVar("_Config", PruneConfig, RestoreConfig)


@dataclasses.dataclass(frozen=True)
class Pruned:
    """A pruned model (zeros written in, masks, its pruning claim in the metadata) and its report."""

    bundle: ModelBundle
    report: dict[str, Any]
    result: PruneResult


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored model (LoRA merged per the mode) and its report; `result` holds the factors and history."""

    bundle: ModelBundle | None
    report: dict[str, Any]
    result: RestoreResult


@dataclasses.dataclass
class Pipeline:
    """Pruning and restoration runs from one dense model, evaluated on the test split of its built-in task.

    `eval_images` limits the test split (None: all of it); `source` is where the dense model lives,
    recorded in the pruned models so restoration can find its teacher; with `mesh`, params,
    calibration examples and training are sharded over it (`sparsevlm.sharding`).
    """

    bundle: ModelBundle
    eval_images: int | None = None
    progress: bool = True
    source: str | None = None
    mesh: Mesh | None = None
    _calibration: dict[tuple, Carry] = dataclasses.field(default_factory=dict, repr=False)
    _train_examples: dict[tuple, EncodedSet] = dataclasses.field(default_factory=dict, repr=False)
    _scores: dict[tuple, dict[str, float]] = dataclasses.field(default_factory=dict, repr=False)
    _test: Any = dataclasses.field(default=None, repr=False)

    @property
    def test(self) -> Any:
        """The evaluation split (built on first use)."""
        if self._test is None:
            data = task_module(model_task(self.bundle.metadata))
            self._test = data.build_split("test", self.eval_images, image_size=self.bundle.config.vision.image_size)
        return self._test

    def evaluate(self, model: ModelBundle | PyTree) -> dict[str, Any]:
        """Accuracy (overall and by question type) of a bundle, or of params for the dense model's architecture."""
        bundle = model if isinstance(model, ModelBundle) else dataclasses.replace(self.bundle, params=model)
        return evaluate_vqa(bundle, self.test, progress=self.progress)

    def calibration(self, config: PruneConfig) -> Carry:
        """The calibration carry `config` asks for: its data, number of samples and seed."""
        config = self._own_data(config)
        key = (config.calib_data, config.calib_source, config.calib_samples, config.seed)
        if key not in self._calibration:
            bundle = self.bundle
            data = load_examples(config.calib_data, bundle.tokenizer, config.calib_samples, config.seed,
                                 bundle.config.vision.image_size, bundle_format(bundle.metadata),
                                 bundle.instruction_tokenizer, bundle.image_processor, config.calib_source)
            self._calibration[key] = calibration_carry(data, config.calib_samples, bundle.tokenizer.pad_token_id,
                                                       bundle.config.vision, config.seed)
        return self._calibration[key]

    def ratios(self, config: PruneConfig) -> dict[str, float]:
        """Per-layer sparsity: the spec's uniform ratios, or ECoFLaP's global allocation.

        ECoFLaP's importance of every prunable matrix is computed once per order, seed and number of
        batches, and serves every spec.
        """
        scores = None
        config = self._own_data(config)
        if config.allocation != "uniform":
            order = ECOFLAP_ORDERS[config.allocation]
            key = (order, config.importance_batches, config.seed, config.calib_data, config.calib_source,
                   config.calib_samples)
            if key not in self._scores:
                self._scores[key] = importance_scores(
                    self.bundle.params, self.bundle.config, self.calibration(config), prunable_paths(self.bundle.params),
                    order, jax.random.key(config.seed), config.importance_batches)
            scores = self._scores[key]
        return allocation_ratios(config.allocation, self.bundle.params, self.bundle.config, config.sparsity, None,
                                 config.max_layer_sparsity, scores=scores)

    def prune(self, config: PruneConfig) -> Pruned:
        """Prune the dense model per `config`, evaluate it, and describe both in a report."""
        bundle = self.bundle
        config = self._own_data(config)
        calibration = self.calibration(config) if config.needs_calibration else None
        started = time.perf_counter()
        ratios = self.ratios(config)
        allocation_seconds = time.perf_counter() - started
        params = bundle.params
        if self.mesh is not None:
            params = sharding.shard(params, sharding.param_shardings(params, self.mesh))
            if calibration is not None:  # each process places only its rows of the calibration examples
                count = len(next(v for v in calibration.values() if v is not None))
                rows = sharding.host_rows(self.mesh, count)
                calibration = sharding.global_batch(
                    {k: None if v is None else np.asarray(v)[rows] for k, v in calibration.items()}, self.mesh, count)
        result = prune(params, bundle.config, config.sparsity, config.method, calibration, config.calibration_mode,
                       key=jax.random.key(config.seed), ratios=ratios, progress=self.progress,
                       options=config.method_options)
        measured = measure_sparsity(result.params)
        pruned = dataclasses.replace(bundle, params=result.params, masks=result.masks)
        evaluation = self.evaluate(pruned)
        spec = config.sparsity
        report: dict[str, Any] = {
            "method": config.method,
            "pattern": spec.pattern,
            "target": spec.targets,
            "measured": measured["towers"],
            "accuracy": evaluation["accuracy"],
            "accuracy_by_type": evaluation["by_type"],
            "eval_questions": evaluation["n"],
            "base_accuracy": bundle.metadata.get("test_accuracy"),
            "allocation": config.allocation,
            "ratios": dict(sorted(result.ratios.items())),
            "dsnot": dataclasses.asdict(config.dsnot) if config.method == "dsnot" else None,
            "layer_sparsity": measured["layers"],
            "row_sparsity_range": {p: list(r) for p, r in measured["rows"].items() if p in result.ratios},
            "calibration": None if calibration is None else {
                "data": config.calib_data, "samples": config.calib_samples, "mode": config.calibration_mode,
            },
            "seed": config.seed,
            "prune_seconds": round(result.seconds, 2),
            "prune_phase_seconds": result.phases,
            "allocation_seconds": round(allocation_seconds, 2),
            "mesh": dict(self.mesh.shape) if self.mesh is not None else None,
        }
        claim = {k: report[k] for k in ("method", "pattern", "target", "measured", "calibration", "seed", "allocation")}
        if config.allocation != "uniform":
            claim["ratios"] = report["ratios"]
        metadata = dict(bundle.metadata) | {"pruning": claim | {"source_model": self.source},
                                             "test_accuracy": evaluation["accuracy"]}
        return Pruned(dataclasses.replace(pruned, metadata=metadata), report, result)

    def _own_data(self, config: _Config) -> _Config:
        """`config` with its calibration or training data, where not given, set to the dense model's own task's
        built-in set (`scenes-captions` / `scenes-mix` for the scenes model, `shapes-…` otherwise)."""
        if isinstance(config, PruneConfig):
            if config.calib_data is None:
                config = dataclasses.replace(config, calib_data=own_set(self.bundle.metadata, "captions"))
        elif config.train_data is None:
            config = dataclasses.replace(config, train_data=own_set(self.bundle.metadata, "mix"))
        return config

    def restore(self, pruned: ModelBundle, config: RestoreConfig, checkpoint_dir: str | None = None,
                plan_only: bool = False) -> Restored:
        """Restore a pruned model of this dense one (its teacher) per `config`; evaluate it and report.

        With `plan_only` (and a mesh) only the per-device memory is reported: no training, no bundle.
        """
        if pruned.masks is None:
            raise ValueError("the model to restore has no masks: prune it first with `sparsevlm prune`")
        config = self._own_data(config)
        teacher = self.bundle
        if teacher.config != pruned.config:
            raise ValueError("the teacher's architecture differs from the pruned model's")
        base = dense_where_pruned(pruned.params, pruned.masks, teacher.params)
        fmt = bundle_format(pruned.metadata)
        key = (config.train_data, config.train_source, config.train_images, config.seed)
        if key not in self._train_examples:  # a study's restorations at one seed train on the same examples
            self._train_examples[key] = load_examples(
                config.train_data, pruned.tokenizer, config.train_images, config.seed, pruned.config.vision.image_size,
                fmt, pruned.instruction_tokenizer, pruned.image_processor, config.train_source)
        result = restore(base, pruned.masks, pruned.config, pruned.tokenizer, config, checkpoint_dir, self.progress,
                         fmt, pruned.instruction_tokenizer, pruned.image_processor, self.mesh, plan_only,
                         self._train_examples[key])
        if plan_only:
            return Restored(None, {"memory": result.memory}, result)
        params = jax.device_get(apply_masks(result.params, pruned.masks) if config.remask else result.params)
        keeps_masks = config.method == "sparselora" or config.remask
        restored = dataclasses.replace(pruned, params=params, masks=pruned.masks if keeps_masks else None)
        evaluation = self.evaluate(restored)
        report: dict[str, Any] = {
            "method": config.method,
            "accuracy": evaluation["accuracy"],
            "measured": measure_sparsity(params)["towers"],
            "steps": config.steps,
            "kl_weight": config.kl_weight,
            "temperature": config.temperature,
            "remask": config.remask,
            "accuracy_by_type": evaluation["by_type"],
            "eval_questions": evaluation["n"],
            "target": pruned.metadata.get("pruning", {}).get("target"),
            "pruned_accuracy": pruned.metadata.get("test_accuracy"),
            "dense_accuracy": teacher.metadata.get("test_accuracy"),
            "config": dataclasses.asdict(config),
            "restore_seconds": round(result.seconds, 1),
            "loss_history": result.history,
            "skipped_steps": result.skipped,
            "mesh": dict(self.mesh.shape) if self.mesh is not None else None,
            "memory_per_device": result.memory,
        }
        metadata = dict(pruned.metadata) | {
            "restoration": {k: report[k] for k in ("method", "steps", "kl_weight", "temperature", "remask")},
            "test_accuracy": evaluation["accuracy"],
        }
        return Restored(dataclasses.replace(restored, metadata=metadata), report, result)
