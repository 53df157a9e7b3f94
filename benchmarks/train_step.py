"""Train-step time and tokens/s of the default model (median of repeats); prints a table, writes JSON.

    python benchmarks/train_step.py [--batch-size 64] [--repeats 20] [--json results/train_step.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from common import machine, write_json
from sparsevlm.config import default_vlm_config
from sparsevlm.data import shapes
from sparsevlm.data.batch import encode_vqa, iterate_batches
from sparsevlm.data.tokenize import build_word_tokenizer
from sparsevlm.eval.evaluate import round_up
from sparsevlm.models import VLM
from sparsevlm.train import TrainState, batch_arrays, make_optimizer, make_train_step
from sparsevlm.tree import count_params


def measure(kind: str, batch_size: int, repeats: int, warmup: int) -> dict:
    """Median step time of the full-parameter train step on one batch kind (vqa or caption)."""
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
    optimizer = make_optimizer(1e-3, 1e-5, 10, 1000, 0.05, 1.0)
    state = TrainState(params, optimizer.init(params), np.zeros((), np.int32))
    step = make_train_step(model, optimizer)
    arrays = jax.device_put(batch_arrays(batch))
    compile_start = time.perf_counter()
    state, metrics = step(state, arrays)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - compile_start
    for _ in range(warmup):
        state, metrics = step(state, arrays)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = step(state, arrays)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    sequence = config.vision.num_features + length
    return {
        "batch": kind,
        "batch_size": batch_size,
        "sequence_length": sequence,
        "params": count_params(params),
        "compile_s": round(compile_seconds, 3),
        "step_ms_median": round(1000 * median, 2),
        "step_ms_min": round(1000 * min(times), 2),
        "step_ms_max": round(1000 * max(times), 2),
        "tokens_per_s": round(batch_size * sequence / median, 1),
        "examples_per_s": round(batch_size / median, 1),
    }


def main() -> None:
    """Run the benchmark and report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default="results/train_step.json")
    args = parser.parse_args()
    rows = [measure(kind, args.batch_size, args.repeats, args.warmup) for kind in ("vqa", "caption")]
    header = f"{'batch':<8}{'B':>4}{'seq':>5}{'step ms (median)':>18}{'min':>8}{'max':>8}{'tokens/s':>11}"
    print(header)
    for r in rows:
        print(f"{r['batch']:<8}{r['batch_size']:>4}{r['sequence_length']:>5}{r['step_ms_median']:>18}"
              f"{r['step_ms_min']:>8}{r['step_ms_max']:>8}{r['tokens_per_s']:>11}")
    out = {
        "benchmark": "train_step",
        "model": "default",
        **machine(),
        "results": rows,
    }
    write_json(args.json, out)


if __name__ == "__main__":
    main()
