"""Command line: argument parsing only; every command calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from sparsevlm.config import PretrainConfig


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="train the default model on built-in shapes VQA")
    defaults = PretrainConfig()
    p.add_argument("--out", default=None, help="output model directory (default: $SPARSEVLM_HOME/default)")
    p.add_argument("--steps", type=_positive_int, default=defaults.steps)
    p.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size)
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--warmup-steps", type=_non_negative_int, default=defaults.warmup_steps)
    p.add_argument("--train-images", type=_positive_int, default=defaults.train_images)
    p.add_argument("--seed", type=_non_negative_int, default=defaults.seed)
    p.add_argument("--eval-every", type=_non_negative_int, default=0, help="validation accuracy every N steps (0: off)")
    p.add_argument("--checkpoint-every", type=_non_negative_int, default=0,
                   help="save the train state every N steps to OUT-checkpoints; rerunning resumes from it (0: off)")
    p.add_argument("--skip-nonfinite", type=_non_negative_int, default=0,
                   help="skip up to N steps whose loss or gradient is NaN/inf (0: stop at the first)")
    p.add_argument("--force", action="store_true", help="retrain even if the output model exists")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from sparsevlm.eval.evaluate import EVAL_TASKS

    p = sub.add_parser("evaluate", help="score a model on shapes VQA or a benchmark (VQAv2, OK-VQA, GQA, captions)")
    p.add_argument("--model", required=True, help="'default', a saved model directory, or an HF checkpoint")
    p.add_argument("--task", default="shapes", choices=EVAL_TASKS,
                   help="shapes: built-in exact match; vqav2/okvqa: official VQA accuracy; gqa; nocaps/coco_caption: CIDEr-D")
    p.add_argument("--data", default=None, help="the task's data: an HF dataset name or a local imagefolder/parquet/jsonl")
    p.add_argument("--split", default=None, help="shapes: train, validation or test (default test); else the data's split")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="shapes: the first N images; other tasks: the first N rows")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--num-beams", type=_positive_int, default=1, help="beam search width (1: greedy; paper: 5)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="longest answer in tokens (default: shapes 4, VQA 10, captions 30)")
    p.add_argument("--json", default=None, help="write the result JSON here (benchmarks: with every prediction)")


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is outside [0, 1)")
    return value


def _add_prune(sub: argparse._SubParsersAction) -> None:
    from sparsevlm.data.calibration import CALIBRATION_SETS, DATA_HELP, data_flag
    from sparsevlm.pruning import METHODS
    from sparsevlm.pruning.calibrate import CALIBRATION_MODES
    from sparsevlm.pruning.dsnot import INITIAL_METHODS
    from sparsevlm.pruning.importance import ALLOCATIONS
    from sparsevlm.pruning.patterns import PATTERN_HELP

    p = sub.add_parser("prune", help="prune a model and save it with its masks and a report")
    p.add_argument("--model", required=True, help="'default', a saved model directory, or an HF checkpoint (dir or hub name)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--pattern", default="unstructured", help=PATTERN_HELP)
    p.add_argument("--vision-sparsity", type=_sparsity, default=0.0, help="fraction of vision weights pruned")
    p.add_argument("--language-sparsity", type=_sparsity, default=0.0, help="fraction of language weights pruned")
    p.add_argument("--connector-sparsity", type=_sparsity, default=0.0, help="fraction of connector weights pruned")
    p.add_argument("--calib-samples", type=_positive_int, default=128, help="calibration examples (paper: 128)")
    p.add_argument("--calib-data", default=CALIBRATION_SETS[0], type=data_flag, help=DATA_HELP)
    p.add_argument("--calibration-mode", default="sequential", choices=CALIBRATION_MODES,
                   help="sequential: each block sees the pruned blocks before it; dense: statistics of the dense model")
    p.add_argument("--allocation", default="uniform", choices=ALLOCATIONS,
                   help="per-layer ratios: uniform (each tower's target), or ECoFLaP's global budget over the pruned "
                        "towers by zeroth-order (no backward pass) or first-order block importance")
    p.add_argument("--max-layer-sparsity", type=_sparsity, default=0.8,
                   help="ECoFLaP: no block is pruned beyond this (paper: 0.8)")
    p.add_argument("--dsnot-init", default="wanda", choices=INITIAL_METHODS,
                   help="dsnot: the method whose mask DSnoT refines")
    p.add_argument("--dsnot-guard", action="store_true",
                   help="dsnot: also reject swaps that raise a row's squared reconstruction error (needs XᵀX; "
                        "not in the published algorithm)")
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--mesh", type=_mesh_flag, default=None,
                   help="shard params and calibration examples over a device mesh, e.g. 'fsdp=-1' (see restore)")
    p.add_argument("--eval-images", type=_positive_int, default=None, help="evaluate on the first N test images")
    p.add_argument("--out", required=True, help="output model directory (report.json is written inside)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def _add_restore(sub: argparse._SubParsersAction) -> None:
    from sparsevlm.config import RestoreConfig
    from sparsevlm.data.calibration import DATA_HELP, data_flag

    defaults = RestoreConfig()
    p = sub.add_parser("restore", help="restore a pruned model with LoRA or SparseLoRA (+ dense-teacher KL)")
    p.add_argument("--model", required=True, help="a pruned model directory (from `sparsevlm prune`)")
    p.add_argument("--method", required=True, choices=("lora", "sparselora"))
    p.add_argument("--teacher", default=None, help="the dense model (default: the one the model was pruned from)")
    p.add_argument("--kl-weight", type=float, default=defaults.kl_weight, help="λ of (1 − λ)·CE + λ·KL (paper: 0.1)")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="KL temperature (paper: 1)")
    p.add_argument("--steps", type=_positive_int, default=defaults.steps)
    p.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size)
    p.add_argument("--grad-accum", type=_positive_int, default=defaults.grad_accum)
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--warmup-steps", type=_non_negative_int, default=defaults.warmup_steps)
    p.add_argument("--vision-rank", type=_positive_int, default=defaults.vision_rank, help="LoRA rank (paper: 4)")
    p.add_argument("--connector-rank", type=_positive_int, default=defaults.connector_rank, help="(paper: 2)")
    p.add_argument("--language-rank", type=_positive_int, default=defaults.language_rank, help="(paper: 8)")
    p.add_argument("--alpha", type=float, default=defaults.alpha, help="LoRA scale numerator (scale = alpha / r)")
    p.add_argument("--train-data", default=defaults.train_data, type=data_flag, help=DATA_HELP)
    p.add_argument("--train-images", type=_positive_int, default=defaults.train_images)
    p.add_argument("--bf16", action="store_true", help="compute in bfloat16 (params and LoRA stay float32)")
    p.add_argument("--checkpoint-every", type=_non_negative_int, default=0,
                   help="save LoRA, optimizer and data state every N steps to OUT-checkpoints; rerunning the same "
                        "command resumes from the newest (0: only at the end)")
    p.add_argument("--skip-nonfinite", type=_non_negative_int, default=0,
                   help="skip up to N steps whose loss or gradient is NaN/inf (0: stop at the first)")
    p.add_argument("--remask", action="store_true", help="re-apply the mask after merging (gets sparsity back for lora)")
    p.add_argument("--mesh", type=_mesh_flag, default=None,
                   help="shard over a device mesh, e.g. 'data=2,fsdp=4' or 'fsdp=-1' (axes data, fsdp, tensor; "
                        "-1 takes the remaining devices); multi-host: see README 'Sharding'")
    p.add_argument("--plan", action="store_true",
                   help="with --mesh: print the per-device memory of params, masks, LoRA, optimizer state and the "
                        "compiled step, then exit without training")
    p.add_argument("--seed", type=_non_negative_int, default=defaults.seed)
    p.add_argument("--eval-images", type=_positive_int, default=None, help="evaluate on the first N test images")
    p.add_argument("--out", required=True, help="output model directory (report.json is written inside)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def _mesh_flag(text: str) -> Any:
    from sparsevlm.sharding import MeshConfig, ShardingError

    try:
        return MeshConfig.parse(text)
    except ShardingError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write model.safetensors + config.json (HF format for HF-loaded models)")
    p.add_argument("--model", required=True, help="'default' or a saved model directory")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="HF export dtype (default: as stored)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="write into an existing non-empty directory")


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="recompute a saved model's sparsity and N:M validity from its weights alone")
    p.add_argument("--model", required=True, help="a saved model directory (from prune or restore)")
    p.add_argument("--json", default=None, help="write the full report (per layer) here")


def build_parser() -> argparse.ArgumentParser:
    """The `sparsevlm` argument parser."""
    parser = argparse.ArgumentParser(prog="sparsevlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pretrain(sub)
    _add_evaluate(sub)
    _add_prune(sub)
    _add_restore(sub)
    _add_export(sub)
    _add_verify(sub)
    return parser


def _write_json(path: str, payload: dict[str, Any]) -> None:
    from sparsevlm.integrity import write_atomic

    write_atomic(path, json.dumps(payload, indent=2))


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Train (or keep) the default model."""
    from sparsevlm import hub
    from sparsevlm.checkpoint import is_model_dir
    from sparsevlm.pretrain import pretrain

    config = PretrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        train_images=args.train_images,
        seed=args.seed,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        skip_nonfinite=args.skip_nonfinite,
    )
    out = Path(args.out) if args.out else hub.default_model_dir()
    if is_model_dir(out) and not args.force:
        print(f"model already trained at {out} (pass --force to retrain)")
        return 0
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    pretrain(config, out, checkpoint_dir=_checkpoint_dir(out) if args.checkpoint_every else None)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a model on shapes VQA or a benchmark task."""
    from sparsevlm import hub
    from sparsevlm.data import shapes
    from sparsevlm.eval.evaluate import evaluate_task

    if args.task == "shapes":
        if args.data is not None:
            raise ValueError("--data is for benchmark tasks; --task shapes uses the built-in dataset")
        split = args.split or "test"
        if split not in shapes.SPLITS:
            raise ValueError(f"--split {split!r} is not a split; allowed: {', '.join(shapes.SPLITS)}")
    elif args.data is None:
        raise ValueError(f"--task {args.task} needs --data (an HF dataset name or a local path)")
    bundle = hub.load_model(args.model)
    if args.task == "shapes":
        dataset = shapes.build_split(split, args.limit, image_size=bundle.config.vision.image_size)
    else:
        from sparsevlm.data.hf import load_task

        dataset = load_task(args.task, args.data, args.split, args.limit)
    result = evaluate_task(bundle, args.task, dataset, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    if args.task == "shapes":
        print(f"accuracy {result['accuracy']:.4f} on {result['n']} questions ({split})")
        for qtype, score in result["by_type"].items():
            print(f"  {qtype:<6} {score:.4f}")
    else:
        print(f"{args.task}: {result['metric']} {result['score']:.4f} on {result['n']} rows ({result['split']})")
    if args.json:
        if args.task == "shapes":
            kept = ("accuracy", "n", "split", "by_type", "num_beams", "length_penalty")
            payload = {k: result[k] for k in kept} | {"max_new_tokens": args.max_new_tokens or 4}
        else:
            payload = dict(result)
        _write_json(args.json, payload | {"model": args.model})
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune a model; save it with masks and `report.json`."""
    from sparsevlm import hub
    from sparsevlm.checkpoint import save_model
    from sparsevlm.jobs import prune_job
    from sparsevlm.pruning import SparsitySpec
    from sparsevlm.pruning.allocation import check_global_allocation
    from sparsevlm.pruning.dsnot import DSnoTConfig

    # Everything the user passed is checked before any work, so a bad flag never leaves files behind.
    spec = SparsitySpec(
        vision=args.vision_sparsity,
        connector=args.connector_sparsity,
        language=args.language_sparsity,
        pattern=args.pattern,
    )
    if not any(spec.targets.values()):
        raise ValueError("nothing to prune: --vision-sparsity, --language-sparsity and --connector-sparsity are all 0")
    if args.allocation != "uniform":
        check_global_allocation(spec, args.max_layer_sparsity, f"--allocation {args.allocation}", "--max-layer-sparsity")
    dsnot_config = DSnoTConfig(init=args.dsnot_init, guard=args.dsnot_guard)
    out = Path(args.out)
    _check_out(out, args.force)
    mesh = _mesh(args.mesh)
    source = hub.resolve_model_path(args.model)
    bundle = hub.load_model(str(source))
    pruned, report = prune_job(
        bundle, spec, args.method, args.calib_samples, args.calib_data, args.calibration_mode,
        args.seed, args.eval_images, source=str(source), mesh=mesh, allocation=args.allocation,
        max_layer_sparsity=args.max_layer_sparsity, dsnot_config=dsnot_config,
    )
    report["model"] = args.model
    save_model(out, pruned, overwrite=True)
    _write_json(str(out / "report.json"), report)
    measured = ", ".join(f"{t} {v:.4f}" for t, v in report["measured"].items())
    print(f"{args.method} {spec.describe()}: measured sparsity {measured}; accuracy {report['accuracy']:.4f}")
    if args.allocation != "uniform":
        print(f"{args.allocation} allocation, per-layer sparsity:")
        for path, ratio in report["ratios"].items():
            print(f"  {path:<40} {ratio:.4f}")
    print(f"saved to {out}")
    return 0


def _mesh(config: Any) -> Any:
    """The device mesh a `--mesh` flag asks for (joining a multi-host run first), or None."""
    if config is None:
        return None
    from sparsevlm.sharding import initialize_distributed, make_mesh

    initialize_distributed()
    return make_mesh(config)  # checked against the device count before anything loads


def _checkpoint_dir(out: Path) -> Path:
    """Where a run writing `out` keeps its resumable checkpoints: the sibling OUT-checkpoints."""
    return out.with_name(out.name + "-checkpoints")


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"--out {out} already exists and is not empty (pass --force to replace it)")


def cmd_restore(args: argparse.Namespace) -> int:
    """Restore a pruned model; save the merged model and `report.json`."""
    from sparsevlm import hub
    from sparsevlm.checkpoint import save_model
    from sparsevlm.config import RestoreConfig
    from sparsevlm.jobs import restore_job

    config = RestoreConfig(
        method=args.method, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, kl_weight=args.kl_weight,
        temperature=args.temperature, train_data=args.train_data, train_images=args.train_images,
        bf16=args.bf16, checkpoint_every=args.checkpoint_every, skip_nonfinite=args.skip_nonfinite, seed=args.seed,
        vision_rank=args.vision_rank,
        connector_rank=args.connector_rank, language_rank=args.language_rank, alpha=args.alpha,
    )
    out = Path(args.out)
    if args.plan and args.mesh is None:
        raise ValueError("--plan reports the memory of a sharded run: give --mesh too (e.g. --mesh data=-1)")
    if not args.plan:
        _check_out(out, args.force)
    mesh = _mesh(args.mesh)
    pruned = hub.load_model(args.model)
    teacher_name = args.teacher or pruned.metadata.get("pruning", {}).get("source_model")
    if not teacher_name:
        raise ValueError(f"{args.model} does not record the dense model it was pruned from; pass --teacher")
    teacher = hub.load_model(teacher_name)
    checkpoints = str(_checkpoint_dir(out)) if args.checkpoint_every else None
    restored, report = restore_job(pruned, teacher, config, args.remask, args.eval_images, checkpoints,
                                   mesh=mesh, plan_only=args.plan)
    if args.plan:
        return 0
    report["model"], report["teacher"] = args.model, teacher_name
    save_model(out, restored, overwrite=True)
    _write_json(str(out / "report.json"), report)
    measured = ", ".join(f"{t} {v:.4f}" for t, v in report["measured"].items())
    print(f"{args.method}{' + remask' if args.remask else ''}: accuracy {report['accuracy']:.4f} "
          f"(pruned {report['pruned_accuracy']}); measured sparsity {measured}")
    print(f"saved to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a model as safetensors."""
    from sparsevlm import hub
    from sparsevlm.checkpoint import export_safetensors

    _check_out(Path(args.out), args.force)
    bundle = hub.load_model(args.model)
    if "hf" in bundle.metadata:
        from sparsevlm.hf.load import export_hf

        out = export_hf(bundle, args.out, args.dtype)
        print(f"exported in Hugging Face format ({bundle.metadata['hf']['config']['model_type']}) to {out}")
    else:
        out = export_safetensors(bundle, args.out)
        print(f"exported to {out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify a saved model's sparsity claims from its weights; exit 1 if one fails."""
    from sparsevlm import hub
    from sparsevlm.pruning.verify import format_verify, verify_model

    path = hub.resolve_model_path(args.model)
    if hub.is_hf_dir(path):
        raise ValueError(f"--model {args.model} is a Hugging Face checkpoint; verify reads saved sparsevlm models "
                         "(prune or restore output)")
    report = verify_model(path)
    print(format_verify(report))
    if args.json:
        _write_json(args.json, report)
    return 0 if report["ok"] else 1


COMMANDS = {
    "pretrain": cmd_pretrain,
    "evaluate": cmd_evaluate,
    "prune": cmd_prune,
    "restore": cmd_restore,
    "export": cmd_export,
    "verify": cmd_verify,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sparsevlm` console script."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as error:
        print(f"sparsevlm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
