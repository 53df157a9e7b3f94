"""The jobs behind the command line: load → pipeline → save, with a JSON report and a short summary printed.

Every argument has been checked before a job starts (configs check themselves), and a job checks
where it will write before any work, so a bad input never leaves files behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from sparsevlm import hub
from sparsevlm.checkpoint import (
    export_safetensors, export_safetensors_compressed, is_model_dir, load_model_dir, save_model,
)
from sparsevlm.config import DataSource, PretrainConfig, PruneConfig, RestoreConfig
from sparsevlm.integrity import write_atomic
from sparsevlm.pipeline import Pipeline
from sparsevlm.pruning.verify import claimed_pruning, format_verify, verify_params
from sparsevlm.sharding import is_primary


EXPORT_FORMATS = ("dense", "compressed-tensors")


def checkpoint_dir(out: Path) -> Path:
    """Where a run writing `out` keeps its resumable checkpoints: the sibling OUT-checkpoints."""
    return out.with_name(out.name + "-checkpoints")


def check_out(out: Path, force: bool) -> None:
    """A clear error, before any work, if `out` holds something and `force` is not given."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"--out {out} already exists and is not empty (pass --force to replace it)")


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` as indented JSON, atomically (in a run of several processes: process 0 only)."""
    if is_primary():
        write_atomic(path, json.dumps(payload, indent=2))


def pretrain_job(config: PretrainConfig, out: Path | None, force: bool = False, mesh: Mesh | None = None,
                 eval_images: int | None = None) -> int:
    """Train (or keep) a built-in model at `out` (default: `$SPARSEVLM_HOME/default`, or `/scenes` for that
    task), on `mesh` if given."""
    from sparsevlm.pretrain import pretrain  # the training recipe, only when training

    out = out if out is not None else hub.default_model_dir("scenes" if config.task == "scenes" else hub.DEFAULT_MODEL)
    if is_model_dir(out) and not force:
        print(f"model already trained at {out} (pass --force to retrain)")
        return 0
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    pretrain(config, out, eval_images=eval_images, checkpoint_dir=checkpoint_dir(out) if config.checkpoint_every else None,
             mesh=mesh)
    return 0


def evaluate_job(model: str, task: str, data: str | None, split: str | None, limit: int | None, batch_size: int,
                 num_beams: int, max_new_tokens: int | None, json_path: str | None,
                 source: DataSource = DataSource()) -> int:
    """Evaluate a model on a built-in task or a benchmark; print the score and optionally write the result JSON."""
    from sparsevlm.data.builtin import task_module
    from sparsevlm.data.tasks import BUILTIN_TASKS
    from sparsevlm.eval.evaluate import evaluate_task

    builtin = task in BUILTIN_TASKS
    if builtin:
        if data is not None or source != DataSource():
            raise ValueError("--data is for benchmark tasks (so are --dataset-config, --streaming and --images); "
                             f"--task {task} uses the built-in dataset")
        split = split or "test"
        if split not in task_module(task).SPLITS:
            raise ValueError(f"--split {split!r} is not a split; allowed: {', '.join(task_module(task).SPLITS)}")
    elif data is None:
        raise ValueError(f"--task {task} needs --data (an HF dataset name or a local path)")
    bundle = hub.load_model(model)
    if builtin:
        dataset = task_module(task).build_split(split, limit, image_size=bundle.config.vision.image_size)
    else:
        from sparsevlm.data.hf import load_task

        dataset = load_task(task, data, split, limit, **source.load_kwargs())
    result = evaluate_task(bundle, task, dataset, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           num_beams=num_beams)
    if builtin:
        print(f"accuracy {result['accuracy']:.4f} on {result['n']} questions ({split})")
        for qtype, score in result["by_type"].items():
            print(f"  {qtype:<8} {score:.4f}")
    else:
        print(f"{task}: {result['metric']} {result['score']:.4f} on {result['n']} rows ({result['split']})")
    if json_path:
        if builtin:
            kept = ("accuracy", "n", "split", "by_type", "num_beams", "length_penalty")
            payload = {k: result[k] for k in kept} | {"max_new_tokens": max_new_tokens or 4}
        else:
            payload = dict(result)
        write_json(json_path, payload | {"model": model})
    return 0


def prune_job(model: str, config: PruneConfig, out: Path, eval_images: int | None = None, mesh: Mesh | None = None,
              force: bool = False) -> int:
    """Prune a model; save it with its masks and `report.json`."""
    check_out(out, force)
    source = hub.resolve_model_path(model)
    pipeline = Pipeline(hub.load_model(str(source)), eval_images, source=str(source), mesh=mesh)
    pruned = pipeline.prune(config)
    report = pruned.report | {"model": model}
    save_model(out, pruned.bundle, overwrite=True)
    write_json(out / "report.json", report)
    measured = ", ".join(f"{t} {v:.4f}" for t, v in report["measured"].items())
    print(f"{config.method} {config.sparsity.describe()}: measured sparsity {measured}; "
          f"accuracy {report['accuracy']:.4f}")
    if config.allocation != "uniform":
        print(f"{config.allocation} allocation, per-layer sparsity:")
        for path, ratio in report["ratios"].items():
            print(f"  {path:<40} {ratio:.4f}")
    print(f"saved to {out}")
    return 0


def restore_job(model: str, config: RestoreConfig, out: Path, teacher: str | None = None,
                eval_images: int | None = None, mesh: Mesh | None = None, plan_only: bool = False,
                force: bool = False) -> int:
    """Restore a pruned model from its dense teacher; save the merged model and `report.json`.

    With `plan_only` (needs a mesh) print the per-device memory of the sharded run and stop.
    """
    if plan_only and mesh is None:
        raise ValueError("--plan reports the memory of a sharded run: give --mesh too (e.g. --mesh data=-1)")
    if not plan_only:
        check_out(out, force)
    pruned = hub.load_model(model)
    teacher = teacher or pruned.metadata.get("pruning", {}).get("source_model")
    if not teacher:
        raise ValueError(f"{model} does not record the dense model it was pruned from; pass --teacher")
    pipeline = Pipeline(hub.load_model(teacher), eval_images, mesh=mesh)
    checkpoints = str(checkpoint_dir(out)) if config.checkpoint_every else None
    restored = pipeline.restore(pruned, config, checkpoints, plan_only)
    if plan_only:
        return 0
    report = restored.report | {"model": model, "teacher": teacher}
    save_model(out, restored.bundle, overwrite=True)
    write_json(out / "report.json", report)
    measured = ", ".join(f"{t} {v:.4f}" for t, v in report["measured"].items())
    print(f"{config.method}{' + remask' if config.remask else ''}: accuracy {report['accuracy']:.4f} "
          f"(pruned {report['pruned_accuracy']}); measured sparsity {measured}")
    print(f"saved to {out}")
    return 0


def export_job(model: str, out: Path, dtype: str | None = None, force: bool = False, fmt: str = "dense",
               json_path: str | None = None) -> int:
    """Export a model as safetensors (in Hugging Face's layout for a model loaded from an HF checkpoint).

    `fmt="compressed-tensors"` writes each pruned linear 2:4, bitmask or dense by its zeros and
    prints which layers are not 2:4; a model without masks is refused before anything is written.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--format {fmt!r} is not supported; allowed: {', '.join(EXPORT_FORMATS)}")
    check_out(out, force)
    bundle = hub.load_model(model)
    if not is_primary():  # one writer: process 0 of a run of several
        return 0
    compressed = fmt == "compressed-tensors"
    if "hf" in bundle.metadata:
        from sparsevlm.hf.load import export_hf, export_hf_compressed

        if compressed:
            report = export_hf_compressed(bundle, out, dtype)
        else:
            export_hf(bundle, out, dtype)
        where = f"in Hugging Face format ({bundle.metadata['hf']['config']['model_type']}) to {out}"
    else:
        report = export_safetensors_compressed(bundle, out) if compressed else None
        if not compressed:
            export_safetensors(bundle, out)
        where = f"to {out}"
    if not compressed:
        print(f"exported {where}")
        return 0
    counts = ", ".join(f"{n} {f}" for f, n in report["formats"].items())
    print(f"exported compressed ({counts}; {(out / 'model.safetensors').stat().st_size} bytes) {where}")
    for name in report["not_2_4"]:
        print(f"  not 2:4, written as a bitmask: {name}")
    if json_path:
        write_json(json_path, report | {"model": model, "out": str(out)})
    return 0


def verify_model(path: str | Path) -> dict[str, Any]:
    """Verify a saved model directory against its own masks and recorded pruning claim."""
    bundle = load_model_dir(path)
    claimed, note = claimed_pruning(bundle.metadata)
    return verify_params(bundle.params, bundle.masks, claimed) | {"model": str(path), "note": note}


def verify_compressed(path: str | Path) -> dict[str, Any]:
    """Verify a compressed export: sparsity and N:M from its decompressed weights, and its `sparsity_config`'s claims."""
    from sparsevlm.hf.compressed import check_declared
    from sparsevlm.hf.load import load_hf_model

    bundle = load_hf_model(path)  # masks: the stored bitmasks, so nonzeros outside them would be flagged
    report = verify_params(bundle.params, bundle.masks) | {"model": str(path), "note": "compressed export"}
    declared = check_declared(path)
    failures = [f"sparsity_config claims {c['claim']}: {'; '.join(c['problems'])}" for c in declared if not c["ok"]]
    return report | {"declared": declared, "failures": report["failures"] + failures,
                     "ok": report["ok"] and not failures}


def verify_job(model: str, json_path: str | None = None) -> int:
    """Verify a saved model's (or compressed export's) sparsity claims from its weights; 1 if one fails."""
    path = hub.resolve_model_path(model)
    if hub.is_hf_dir(path):
        from sparsevlm.hf.compressed import declared_sparsity

        if declared_sparsity(path) is None:
            raise ValueError(f"--model {model} is a Hugging Face checkpoint without a sparsity_config; verify reads "
                             "saved sparsevlm models (prune or restore output) and compressed exports")
        report = verify_compressed(path)
    else:
        report = verify_model(path)
    print(format_verify(report))
    if json_path:
        write_json(json_path, report)
    return 0 if report["ok"] else 1


def plan_job(model: str, config: RestoreConfig, seq_len: int, mesh: Any = None, param_dtype: str = "bfloat16",
             json_path: str | None = None) -> int:
    """Print (and optionally write) the restoration step's per-device memory and compile time; nothing allocated."""
    from sparsevlm.plan import format_plan, plan_config, plan_restoration

    report = plan_restoration(plan_config(model), config, config.batch_size, seq_len, mesh, param_dtype)
    print(format_plan(report))
    if json_path:
        write_json(json_path, report)
    return 0
