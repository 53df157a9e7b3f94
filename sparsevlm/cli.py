"""Command line: argument parsing only; every command builds its config and calls a job (`sparsevlm.jobs`).

The flags of `pretrain`, `prune` and `restore` are made from `PretrainConfig`, `PruneConfig` and
`RestoreConfig` (one flag per field, nested configs included), so a flag and the field it sets
cannot drift apart. Nothing heavy is imported until a command runs: `--help` loads no JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from sparsevlm.config import PLAN_PRESETS, DataSource, PretrainConfig, PruneConfig, RestoreConfig, pretrain_preset
from sparsevlm.data.tasks import EVAL_TASKS, parse_data_spec


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


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is outside [0, 1)")
    return value


def data_flag(text: str) -> str:
    """argparse `type=` for a data flag: the value, or a usage error saying what is allowed."""
    try:
        parse_data_spec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _mesh(text: str) -> Any:
    from sparsevlm.sharding import MeshConfig, ShardingError  # JAX: only when the flag is given

    try:
        return MeshConfig.parse(text)
    except ShardingError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


KINDS: dict[str, Callable[[str], Any]] = {
    "positive_int": _positive_int, "non_negative_int": _non_negative_int, "fraction": _fraction, "data": data_flag,
}


def _flags(cls: type, prefix: str = "", path: tuple[str, ...] = ()) -> list[tuple[str, tuple[str, ...], Any]]:
    """`(flag, field path, field)` for every field of a config with command-line metadata, nested ones included."""
    found = []
    for field in dataclasses.fields(cls):
        spec = field.metadata.get("cli")
        if spec is None:
            continue
        if spec["prefix"] is not None:  # a nested config: its own fields are the flags
            found += _flags(field.type if isinstance(field.type, type) else field.default_factory().__class__,
                            prefix + spec["prefix"], (*path, field.name))
            continue
        found.append((spec["name"] or f"--{prefix}{field.name.replace('_', '-')}", (*path, field.name), field))
    return found


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of config `cls` (recursively), with the field's help, type and default."""
    for flag, path, field in _flags(cls):
        spec = field.metadata["cli"]
        default = _default(cls, path)
        dest = "config." + ".".join(path)
        choices = spec["choices"]() if callable(spec["choices"]) else spec["choices"]
        if field.type in (bool, "bool"):
            # --flag / --no-flag; neither given: None, so the field keeps the base's (or its own) default.
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                                help=spec["help"])
            continue
        kind = KINDS[spec["kind"]] if spec["kind"] else {"int": int, "float": float}.get(str(field.type), str)
        required = spec["required"]
        shown = "" if required or default is None else f" (default: {default})"
        parser.add_argument(flag, dest=dest, type=kind, choices=choices, required=required, metavar=None if choices
                            else path[-1].upper(), default=None if required else default, help=spec["help"] + shown)


def _default(cls: type, path: tuple[str, ...]) -> Any:
    """The default of the field at `path` (nested configs' defaults included)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == path[0])
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    for name in path[1:]:
        value = getattr(value, name)
    return value


def config_from_args(cls: type, args: argparse.Namespace, base: Any = None) -> Any:
    """The config `cls` the parsed flags describe (its checks run here); a flag left at None takes `base`'s value."""
    values = {tuple(k.split(".")[1:]): v for k, v in vars(args).items() if k.startswith("config.")}

    def build(cls: type, path: tuple[str, ...], base: Any) -> Any:
        kwargs = {}
        for field in dataclasses.fields(cls):
            spec = field.metadata.get("cli")
            if spec is None:
                continue
            inner = None if base is None else getattr(base, field.name)
            if spec["prefix"] is not None:
                kwargs[field.name] = build(type(_default(cls, (field.name,))), (*path, field.name), inner)
            else:
                value = values[(*path, field.name)]
                if value is not None:
                    kwargs[field.name] = value
                elif base is not None:
                    kwargs[field.name] = inner
        return cls(**kwargs)

    return build(cls, (), base)


def _pretrain_config(args: argparse.Namespace) -> PretrainConfig:
    """`pretrain`'s config: the flags given, over the recipe of the task's built-in model (`pretrain_preset`)."""
    task = getattr(args, "config.task")
    return config_from_args(PretrainConfig, args, pretrain_preset(task))


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="train a built-in model on built-in shapes (or scenes) VQA",
                       description="Flags not given take the task's recipe: the defaults shown are the shapes "
                                   "model's; --task scenes starts from config.pretrain_preset('scenes').")
    p.add_argument("--out", default=None, help="output model directory (default: $SPARSEVLM_HOME/default; "
                                               "--task scenes: $SPARSEVLM_HOME/scenes)")
    add_config_flags(p, PretrainConfig)
    p.set_defaults(**{"config." + ".".join(path): None for _, path, _ in _flags(PretrainConfig) if path != ("task",)})
    p.add_argument("--mesh", type=_mesh, default=None,
                   help="train sharded over a device mesh, e.g. 'fsdp=-1' (see restore); needed as several processes")
    p.add_argument("--eval-images", type=_positive_int, default=None, help="evaluate on the first N test images")
    p.add_argument("--force", action="store_true", help="retrain even if the output model exists")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a model on shapes VQA or a benchmark (VQAv2, OK-VQA, GQA, captions)")
    p.add_argument("--model", required=True, help="'default', 'scenes', a saved model directory, or an HF checkpoint")
    p.add_argument("--task", default="shapes", choices=EVAL_TASKS,
                   help="shapes, scenes: built-in exact match; vqav2/okvqa: official VQA accuracy; gqa; nocaps/coco_caption: CIDEr-D")
    p.add_argument("--data", default=None, help="the task's data: an HF dataset name or a local imagefolder/parquet/jsonl")
    p.add_argument("--split", default=None, help="shapes: train, validation or test (default test); else the data's split")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="shapes: the first N images; other tasks: the first N rows (caption tasks: images), streamed")
    add_config_flags(p, DataSource)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--num-beams", type=_positive_int, default=1, help="beam search width (1: greedy; paper: 5)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="longest answer in tokens (default: shapes 4, VQA 10, captions 30)")
    p.add_argument("--json", default=None, help="write the result JSON here (benchmarks: with every prediction)")


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model and save it with its masks and a report")
    p.add_argument("--model", required=True, help="'default', a saved model directory, or an HF checkpoint (dir or hub name)")
    add_config_flags(p, PruneConfig)
    p.add_argument("--mesh", type=_mesh, default=None,
                   help="shard params and calibration examples over a device mesh, e.g. 'fsdp=-1' (see restore)")
    p.add_argument("--eval-images", type=_positive_int, default=None, help="evaluate on the first N test images")
    p.add_argument("--out", required=True, help="output model directory (report.json is written inside)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def _add_restore(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("restore", help="restore a pruned model with LoRA or SparseLoRA (+ dense-teacher KL)")
    p.add_argument("--model", required=True, help="a pruned model directory (from `sparsevlm prune`)")
    p.add_argument("--teacher", default=None, help="the dense model (default: the one the model was pruned from)")
    add_config_flags(p, RestoreConfig)
    p.add_argument("--mesh", type=_mesh, default=None,
                   help="shard over a device mesh, e.g. 'data=2,fsdp=4' or 'fsdp=-1' (axes data, fsdp, tensor; "
                        "-1 takes the remaining devices); multi-host: see README 'Sharding'")
    p.add_argument("--plan", action="store_true",
                   help="with --mesh: print the per-device memory of params, masks, LoRA, optimizer state and the "
                        "compiled step, then exit without training")
    p.add_argument("--eval-images", type=_positive_int, default=None, help="evaluate on the first N test images")
    p.add_argument("--out", required=True, help="output model directory (report.json is written inside)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write model.safetensors + config.json (HF format for HF-loaded models)")
    p.add_argument("--model", required=True, help="'default' or a saved model directory")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="HF export dtype (default: as stored)")
    p.add_argument("--format", default="dense", choices=("dense", "compressed-tensors"),
                   help="dense: zeros stored as zeros; compressed-tensors: each pruned linear as sparse-24-bitmask, "
                        "sparse-bitmask or dense by its zeros, with a sparsity_config in config.json (needs masks)")
    p.add_argument("--json", default=None, help="with --format compressed-tensors: write each layer's format here")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="write into an existing non-empty directory")


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="recompute a saved model's sparsity and N:M validity from its weights alone")
    p.add_argument("--model", required=True, help="a saved model directory (from prune or restore) or a compressed "
                                                  "export (its sparsity_config is checked too)")
    p.add_argument("--json", default=None, help="write the full report (per layer) here")


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-device memory and compile time of a restoration step, from a config alone")
    p.add_argument("--model", required=True,
                   help=f"a preset ({', '.join(PLAN_PRESETS)}), an HF checkpoint directory (config.json is enough) "
                        "or an exported model directory")
    add_config_flags(p, RestoreConfig)
    p.add_argument("--seq-len", type=_positive_int, default=624,
                   help="positions the language model sees per example, image tokens included")
    p.add_argument("--mesh", type=_mesh, default=None, help="plan for this device mesh over all devices (default: one "
                                                             "device), e.g. 'fsdp=8'")
    p.add_argument("--param-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="dtype the base params are held in")
    p.add_argument("--json", default=None, help="write the plan JSON here")


def build_parser() -> argparse.ArgumentParser:
    """The `sparsevlm` argument parser."""
    parser = argparse.ArgumentParser(prog="sparsevlm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_pretrain, _add_evaluate, _add_prune, _add_restore, _add_plan, _add_export, _add_verify):
        add(sub)
    return parser


# Commands that run as every process of a multi-process run (the others run on each process alone).
DISTRIBUTED = ("pretrain", "prune", "restore", "export")


def _join(argv: Sequence[str]) -> None:
    """Join a multi-process run when the environment describes one, and check every process runs `argv`."""
    from sparsevlm.sharding import check_same_command, initialize_distributed

    if initialize_distributed():
        check_same_command(argv)


def _mesh_for(config: Any) -> Any:
    """The device mesh a `--mesh` flag asks for (over every process's devices), or None."""
    if config is None:
        return None
    from sparsevlm.sharding import make_mesh

    return make_mesh(config)  # checked against the device count before anything loads


def _run(args: argparse.Namespace) -> int:
    from sparsevlm import jobs

    if args.command == "pretrain":
        return jobs.pretrain_job(_pretrain_config(args), Path(args.out) if args.out else None,
                                 args.force, _mesh_for(args.mesh), args.eval_images)
    if args.command == "evaluate":
        return jobs.evaluate_job(args.model, args.task, args.data, args.split, args.limit, args.batch_size,
                                 args.num_beams, args.max_new_tokens, args.json, config_from_args(DataSource, args))
    if args.command == "prune":
        config = config_from_args(PruneConfig, args)
        jobs.check_out(Path(args.out), args.force)
        return jobs.prune_job(args.model, config, Path(args.out), args.eval_images, _mesh_for(args.mesh), args.force)
    if args.command == "restore":
        config = config_from_args(RestoreConfig, args)
        return jobs.restore_job(args.model, config, Path(args.out), args.teacher, args.eval_images,
                                _mesh_for(args.mesh), args.plan, args.force)
    if args.command == "plan":
        return jobs.plan_job(args.model, config_from_args(RestoreConfig, args), args.seq_len, args.mesh,
                             args.param_dtype, args.json)
    if args.command == "export":
        return jobs.export_job(args.model, Path(args.out), args.dtype, args.force, args.format, args.json)
    return jobs.verify_job(args.model, args.json)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sparsevlm` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command in DISTRIBUTED:
            _join(list(sys.argv[1:] if argv is None else argv))
        return _run(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as error:
        print(f"sparsevlm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
