"""Train-step time, tokens/s and memory of the default model: full finetuning vs LoRA vs SparseLoRA restoration.

Step kinds, all on the same model, batch and data in one run:

- `full`: the full-parameter step (`make_train_step`), AdamW over every param;
- `lora`: the restoration step (`make_train_step(restoration_loss(...))`, mode lora) on 50%-magnitude masks, KL weight 0.1;
- `sparselora`: the same step in mode sparselora;
- `sparselora-nokl`: sparselora with KL weight 0 (no dense-teacher forward pass).

Each kind is compiled ahead of time and run `--warmup` untimed steps; then `--repeats` steps of every
kind are timed round-robin (so a change in the host's load hits all kinds alike) and the median is
reported. Memory is XLA's buffer assignment for the compiled step (arguments, outputs, temporaries)
and the growth of the process's peak RSS over the warm-up steps (compilation excluded). Prints a
table, writes JSON.

    python benchmarks/train_step.py [--batch-size 64] [--repeats 20] [--json results/train_step.json]
    python benchmarks/train_step.py --quick       # batch 8, 2 repeats, 1 warm-up (smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from sparsevlm.config import LoraConfig, RestoreConfig, SparsitySpec, default_vlm_config
from sparsevlm.data import shapes
from sparsevlm.data.batch import encode_vqa, iterate_batches, round_up
from sparsevlm.data.tokenize import build_word_tokenizer
from sparsevlm.lora import init_lora, lora_param_count
from sparsevlm.models.vlm import VLM
from sparsevlm.pruning import prune
from sparsevlm.sharding import compiled_memory
from sparsevlm.train import TrainState, batch_arrays, lm_loss, make_optimizer, make_train_step, restoration_loss
from sparsevlm.tree import count_params

from common import positive_int, write_results

BATCHES = ("vqa", "caption")
STEPS = ("full", "lora", "sparselora", "sparselora-nokl")
RESTORE_STEPS = STEPS[1:]
# Smallest expected footprint first: where the peak RSS cannot be reset, a kind that needs less
# than one run before it would show no growth at all.
RUN_ORDER = ("sparselora-nokl", "lora", "sparselora", "full")
SPARSITY = 0.5
KL_WEIGHT = 0.1
FULL = {"batch_size": 64, "repeats": 20, "warmup": 3}
QUICK = {"batch_size": 8, "repeats": 2, "warmup": 1}
MIB = 2**20


class Setup(NamedTuple):
    """One batch kind's model, dense params, 50%-magnitude masks and device arrays."""

    model: VLM
    params: Any
    masks: Any
    arrays: dict[str, Any]
    sequence_length: int


def build(kind: str, batch_size: int) -> Setup:
    """The default model (random init, seed 0), one batch of `kind`, and magnitude masks at 50% per tower."""
    tokenizer = build_word_tokenizer(shapes.vocabulary())
    config = default_vlm_config(len(tokenizer))
    split = shapes.build_split("validation", max(batch_size // 4 + 1, 8))
    source = split if kind == "vqa" else shapes.captioning_view(shapes.build_split("validation", batch_size))
    data = encode_vqa(source, tokenizer, with_targets=True)
    length = round_up(data.max_length, 8)
    rng = np.random.default_rng(0)
    batch, _ = next(iterate_batches(data, batch_size, length, tokenizer.pad_token_id, config.vision, rng))
    model = VLM(config)
    params = model.init(jax.random.key(0), batch.images[:1], batch.tokens[:1], batch.text_mask[:1])["params"]
    # Magnitude pruning writes zeros into its params; the restoration base is the dense model
    # (what `restore.dense_where_pruned` gives for magnitude masks), so the teacher pass is the dense model.
    masks = prune(params, config, SparsitySpec.same(SPARSITY), "magnitude").masks
    arrays = jax.device_put(batch_arrays(batch))
    return Setup(model, jax.device_put(params), jax.device_put(masks), arrays, config.vision.num_features + length)


def step_and_inputs(name: str, setup: Setup) -> tuple[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]]:
    """The jitted step of kind `name`, its initial state, the other arguments, and what it trains."""
    if name == "full":
        optimizer = make_optimizer(1e-3, 1e-5, 10, 1000, 0.05, 1.0)
        state = TrainState(setup.params, optimizer.init(setup.params), np.zeros((), np.int32))
        return make_train_step(lm_loss(setup.model), optimizer), state, (setup.arrays,), {
            "trainable_params": count_params(setup.params)}
    restore = RestoreConfig()
    mode, kl_weight = {"lora": ("lora", KL_WEIGHT), "sparselora": ("sparselora", KL_WEIGHT),
                       "sparselora-nokl": ("sparselora", 0.0)}[name]
    lora_config = LoraConfig()
    lora = init_lora(setup.params, lora_config, jax.random.key(0))
    optimizer = make_optimizer(restore.learning_rate, restore.end_learning_rate, restore.warmup_steps, restore.steps,
                               restore.weight_decay, restore.grad_clip)
    state = TrainState(lora, optimizer.init(lora), np.zeros((), np.int32))
    step = make_train_step(restoration_loss(setup.model, lora_config.alpha, mode, kl_weight, restore.temperature),
                           optimizer)
    return step, state, (setup.arrays, setup.params, setup.masks), {
        "mode": mode, "kl_weight": kl_weight, "sparsity": SPARSITY, "trainable_params": lora_param_count(lora)}


def xla_memory(compiled: jax.stages.Compiled) -> dict[str, float | None]:
    """XLA's buffer assignment for a compiled step, in MiB; None where the backend does not report it.

    `step_total_mib` = arguments + outputs − aliased + temporaries: what the step needs live at once,
    at most. XLA's own `peak_memory_in_bytes` is kept as `xla_peak_mib`; on CPU it is only
    arguments + outputs (no temporaries), so it understates the peak.
    """
    try:
        sizes: dict[str, Any] = compiled_memory(compiled)
        peak = compiled.memory_analysis().peak_memory_in_bytes
    except NotImplementedError:
        sizes, peak = {}, None
    named = {"argument": "arguments", "output": "outputs", "alias": "aliased", "temp": "temporaries",
             "step_total": "step_total"}
    mib = {f"{name}_mib": sizes.get(field) for name, field in named.items()} | {"xla_peak_mib": peak}
    return {name: None if size is None else round(size / MIB, 2) for name, size in mib.items()}


def reset_peak_rss() -> bool:
    """Set the process's peak RSS back to its current RSS (Linux `clear_refs`); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """The process's peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


@dataclasses.dataclass
class Prepared:
    """One step kind, compiled and warmed up: its state advances with every call; `row` collects the results."""

    step: jax.stages.Compiled
    state: Any
    rest: tuple[Any, ...]
    row: dict[str, Any]
    times: list[float] = dataclasses.field(default_factory=list)
    loss: float = float("nan")

    def run(self) -> float:
        """One step, waited for; its wall time in seconds."""
        start = time.perf_counter()
        self.state, metrics = self.step(self.state, *self.rest)
        jax.block_until_ready(metrics)
        seconds = time.perf_counter() - start
        self.loss = float(metrics["loss"])
        return seconds


def prepare(name: str, setup: Setup, kind: str, batch_size: int, warmup: int) -> Prepared:
    """Compile step kind `name` for one batch, read its memory figures and run its `warmup` untimed steps."""
    step, state, rest, details = step_and_inputs(name, setup)
    # Compile ahead of time with the real arguments: the executable the jitted step would build on
    # its first call, whose buffer assignment the memory figures come from; the timed calls run it.
    compile_start = time.perf_counter()
    compiled = step.lower(state, *rest).compile()
    compile_seconds = time.perf_counter() - compile_start
    row = {
        "step": name,
        "batch": kind,
        "batch_size": batch_size,
        "sequence_length": setup.sequence_length,
        "params": count_params(setup.params),
        **details,
        "compile_s": round(compile_seconds, 3),
        "xla_memory": xla_memory(compiled),
    }
    prepared = Prepared(compiled, state, rest, row)
    # RSS growth over the warm-up steps, compilation excluded. Without the reset it is growth beyond
    # the process's earlier peak, and 0 when this kind needs less than one run before it.
    gc.collect()
    row["rss_peak_reset"] = reset_peak_rss()
    rss_before = peak_rss_mib()
    for _ in range(warmup):
        prepared.run()
    row["rss_peak_growth_mib"] = round(peak_rss_mib() - rss_before, 1)
    return prepared


def time_interleaved(prepared: Sequence[Prepared], repeats: int) -> list[dict[str, Any]]:
    """Time `repeats` steps of each kind round-robin, so a change in the host's load hits every kind alike."""
    for _ in range(repeats):
        for p in prepared:
            p.times.append(p.run())
    rows = []
    for p in prepared:
        row = p.row
        if not np.isfinite(p.loss):
            raise FloatingPointError(f"{row['step']} step on {row['batch']} gave a non-finite loss {p.loss}")
        median = statistics.median(p.times)
        tokens = row["batch_size"] * row["sequence_length"]
        rows.append(row | {
            "step_ms_median": round(1000 * median, 2),
            "step_ms_min": round(1000 * min(p.times), 2),
            "step_ms_max": round(1000 * max(p.times), 2),
            "tokens_per_s": round(tokens / median, 1),
            "examples_per_s": round(row["batch_size"] / median, 1),
        })
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """`vs_full`, `vs_lora`: each row's median step time over full's / lora's on the same batch kind, this run."""
    for reference in ("full", "lora"):
        base = {r["batch"]: r["step_ms_median"] for r in rows if r["step"] == reference}
        for r in rows:
            r[f"vs_{reference}"] = round(r["step_ms_median"] / base[r["batch"]], 3) if r["batch"] in base else None


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """One line per (batch kind, step kind)."""
    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    def mib(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    print(f"{'batch':<8}{'step':<16}{'B':>4}{'seq':>5}{'ms (median)':>13}{'min':>8}{'max':>8}{'tokens/s':>10}"
          f"{'x full':>8}{'x lora':>8}{'step MiB':>10}{'args':>7}{'out':>7}{'temp':>7}{'RSS +MiB':>10}")
    for r in rows:
        memory = r["xla_memory"]
        print(f"{r['batch']:<8}{r['step']:<16}{r['batch_size']:>4}{r['sequence_length']:>5}{r['step_ms_median']:>13}"
              f"{r['step_ms_min']:>8}{r['step_ms_max']:>8}{r['tokens_per_s']:>10}{ratio(r['vs_full']):>8}"
              f"{ratio(r['vs_lora']):>8}{mib(memory['step_total_mib']):>10}{mib(memory['argument_mib']):>7}"
              f"{mib(memory['output_mib']):>7}{mib(memory['temp_mib']):>7}{r['rss_peak_growth_mib']:>10}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=positive_int, help=f"default {FULL['batch_size']}")
    parser.add_argument("--repeats", type=positive_int, help=f"timed steps (default {FULL['repeats']})")
    parser.add_argument("--warmup", type=positive_int,
                        help=f"untimed steps per kind before the timed ones; RSS is measured over them "
                             f"(default {FULL['warmup']})")
    parser.add_argument("--batches", nargs="+", choices=BATCHES, default=list(BATCHES),
                        help="batch kinds the full step runs on (default: both)")
    parser.add_argument("--restore-batches", nargs="+", choices=BATCHES, default=["vqa"],
                        help=f"batch kinds the restoration steps ({', '.join(RESTORE_STEPS)}) run on, "
                             "next to full (default: vqa)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="step kinds (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help=f"small sizes for a smoke test: {', '.join(f'{k}={v}' for k, v in QUICK.items())}")
    parser.add_argument("--json", default="results/train_step.json")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    batch_size = args.batch_size or defaults["batch_size"]
    repeats = args.repeats or defaults["repeats"]
    warmup = defaults["warmup"] if args.warmup is None else args.warmup

    load_before = os.getloadavg()
    rows = []
    for kind in BATCHES:
        wanted = set(RESTORE_STEPS) if kind in args.restore_batches else set()
        if kind in args.batches or wanted:
            wanted.add("full")
        steps = [s for s in RUN_ORDER if s in wanted and s in args.steps]
        if steps:
            setup = build(kind, batch_size)
            rows += time_interleaved([prepare(name, setup, kind, batch_size, warmup) for name in steps], repeats)
    rows.sort(key=lambda r: (BATCHES.index(r["batch"]), STEPS.index(r["step"])))
    add_ratios(rows)
    print_table(rows)
    out = {
        "benchmark": "train_step",
        "model": "default",
        "repeats": repeats,
        "warmup": warmup,
        "quick": args.quick,
        "results": rows,
    }
    write_results(args.json, out, load_before[0])


if __name__ == "__main__":
    main()
