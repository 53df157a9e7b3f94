"""How to restore: pruned vs LoRA vs LoRA + remask vs SparseLoRA vs SparseLoRA + KL (dense teacher).

At 2:4 and at 70% unstructured (both towers, Wanda by default). LoRA merges back to dense weights
(its lost sparsity is reported); remasking after the merge gets the sparsity back but throws away
part of what LoRA learned; SparseLoRA trains (W + s·BA)⊙M, so its merge keeps the pattern exactly.
The paper's headline: +11.3% under 2:4 and +47.6% under 70% unstructured. The other pruners
(DSnoT; ECoFLaP's allocation, unstructured only) add their pruned and SparseLoRA + KL rows.

    python experiments/restoration.py [--steps 300] [--seeds 0 1 2] [--out results] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sparsevlm.config import RestoreConfig, SparsitySpec  # noqa: E402
from sparsevlm.data.builtin import own_set  # noqa: E402
from sparsevlm.data.tasks import DATA_HELP  # noqa: E402
from sparsevlm.masks import apply_masks, measure_sparsity  # noqa: E402

from common import (Study, add_arguments, check_seeds, data_flag, data_source, load_study, markdown_table,  # noqa: E402
                    over_seeds, seeds_note, with_spread, write_outputs)

STEM = "restoration"
SETTINGS = {"2:4": SparsitySpec.same(0.5, "2:4"), "70%": SparsitySpec.same(0.7)}


def run(study: Study, config: RestoreConfig, extra_settings: tuple[str, ...] = tuple(SETTINGS)) -> list[dict]:
    """Accuracy and measured sparsity of every (pruner, variant) at every setting.

    The study's method runs every setting; the other pruners only `extra_settings`.
    """
    rows = []
    pruners = study.pruners()
    for setting, spec in SETTINGS.items():
        for pruner, (method, allocation) in pruners.items():
            if pruner != study.method and setting not in extra_settings:
                continue
            if allocation != "uniform" and spec.parsed_pattern.fixed_sparsity is not None:
                continue
            pruned = study.prune(spec, method, allocation=allocation)

            def add(variant: str, accuracy: float, measured: dict[str, float], seconds: float = 0.0) -> None:
                rows.append({"setting": setting, "pruner": pruner, "variant": variant, "accuracy": accuracy,
                             "measured": measured, "target": spec.targets, "train_seconds": round(seconds, 1)})
                print(f"seed {study.seed}  {setting:<4} {pruner:<8} {variant:<16} accuracy {accuracy:.4f}  measured "
                      f"vision {measured['vision']:.3f} language {measured['language']:.3f}", flush=True)

            def train(variant: str, method: str, kl_weight: float) -> Any:
                restored = study.pipeline.restore(pruned.bundle, dataclasses.replace(config, method=method,
                                                                                     kl_weight=kl_weight))
                add(variant, restored.report["accuracy"], restored.report["measured"], restored.result.seconds)
                return restored

            add("pruned", pruned.report["accuracy"], pruned.report["measured"])
            if pruner != study.method:  # the other pruners: their best restoration only
                train("SparseLoRA + KL", "sparselora", config.kl_weight)
                continue
            lora = train("LoRA", "lora", 0.0)
            # The same LoRA run, masked again after the merge: the sparsity comes back, part of the gain goes.
            remasked = apply_masks(lora.bundle.params, pruned.bundle.masks)
            add("LoRA + remask", study.evaluate(remasked), measure_sparsity(remasked)["towers"], lora.result.seconds)
            train("SparseLoRA", "sparselora", 0.0)
            train("SparseLoRA + KL", "sparselora", config.kl_weight)
    return rows


def report(rows: list[dict], dense: float | None, method: str, config: RestoreConfig) -> tuple[str, object]:
    """Markdown table and a grouped bar chart; "vs pruned" is the gain over the same seed's pruned model."""
    pruned = {(r["setting"], r["pruner"]): r for r in rows if r["variant"] == "pruned"}
    table = markdown_table(
        ["setting", "pruner", "variant", "accuracy", "vs pruned", "measured vision", "measured language"],
        [[r["setting"], r["pruner"], r["variant"], with_spread(r), gain(r, pruned[(r["setting"], r["pruner"])]),
          r["measured"]["vision"], r["measured"]["language"]] for r in rows],
    )
    header = (f"Restoration ({method} pruning of both towers unless named; {seeds_note(rows)}; {config.steps} steps of "
              f"{config.batch_size}, lr {config.learning_rate:g}, λ = {config.kl_weight}, T = {config.temperature}, "
              f"data {config.train_data}" + (f"; dense accuracy {dense:.4f}" if dense is not None else "") + ")\n\n")
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    bars = list(dict.fromkeys((r["pruner"], r["variant"]) for r in rows))
    by = {(r["setting"], r["pruner"], r["variant"]): r for r in rows}
    figure, axis = plt.subplots(figsize=(9, 3.5))
    width = 0.85 / len(bars)
    for i, (pruner, variant) in enumerate(bars):
        label = variant if pruner == method else f"{pruner}: {variant}"
        found = [by.get((s, pruner, variant)) for s in settings]
        axis.bar(np.arange(len(settings)) + i * width, [r["accuracy"] if r else np.nan for r in found], width,
                 yerr=[r.get("accuracy_std", 0.0) if r else 0.0 for r in found], capsize=2, label=label)
    if dense is not None:
        axis.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
    axis.set_xticks(np.arange(len(settings)) + 0.425 - width / 2, settings)
    axis.set_ylabel("test accuracy")
    axis.set_title("Restoring a pruned VLM")
    axis.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return header + table, figure


def gain(row: dict[str, Any], pruned: dict[str, Any]) -> str:
    """`row`'s accuracy minus its pruned model's, seed by seed: "+0.0123", or "+0.0123 ± 0.0040" over seeds."""
    gains = np.subtract(row.get("accuracies", [row["accuracy"]]), pruned.get("accuracies", [pruned["accuracy"]]))
    if len(gains) < 2:
        return f"{gains[0]:+.4f}"
    return f"{gains.mean():+.4f} ± {gains.std(ddof=1):.4f}"


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run the study, write the outputs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    defaults = RestoreConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--kl-weight", type=float, default=defaults.kl_weight)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--train-data", default=None, type=data_flag,
                        help=f"{DATA_HELP} (default: the model's own task's questions and captions, e.g. scenes-mix)")
    args = parser.parse_args(argv)
    check_seeds(parser, args)
    study = load_study(args)
    config = RestoreConfig(
        steps=4 if args.quick else args.steps, warmup_steps=1 if args.quick else defaults.warmup_steps,
        batch_size=8 if args.quick else defaults.batch_size, train_images=40 if args.quick else defaults.train_images,
        learning_rate=args.learning_rate, kl_weight=args.kl_weight, temperature=args.temperature,
        train_data=args.train_data or own_set(study.bundle.metadata, "mix"), train_source=data_source(args),
    )
    # --quick: the other pruners at 70% only.
    extra = ("70%",) if args.quick else tuple(SETTINGS)
    rows = over_seeds(study, args.seeds,
                      lambda seeded: run(seeded, dataclasses.replace(config, seed=seeded.seed), extra))
    dense = study.dense_accuracy
    markdown, figure = report(rows, dense, args.method, config)
    payload = {"method": args.method, "dense_accuracy": dense, "seeds": args.seeds,
               "restore": dataclasses.asdict(config) | {"seed": args.seeds}, "rows": rows}
    write_outputs(args.out, STEM, payload, markdown, figure)


if __name__ == "__main__":
    main()
