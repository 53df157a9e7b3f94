"""Pruning a 7B language tower block by block: time per phase and device memory, from random weights.

The model is a `sparsevlm plan` preset (default `llava-1.5-7b`: CLIP ViT-L/14-336 + Vicuna-7B) or a
directory's `config.json`; its weights are drawn in NumPy on the host, leaf by leaf, with no checkpoint
file. `prune` then prunes the language tower at 50% on random calibration images and token ids, as
`sparsevlm prune` does with a loaded model: the params stay on the host and visit the device one stage
at a time. Each (method, pattern) runs in a fresh process, so the device allocator's peak is its own.

Reported per run: the first call's seconds and the compile time inside it, seconds per phase
(`calibrate.PHASES`), a second (warm) call's seconds with `--repeats 1`, the device allocator's peak
bytes in use (GPU/TPU; a CPU has no device allocator, so null there), the peak of the live JAX arrays'
bytes (sampled every 20 ms, any backend), and the sizes that should bound the peak: the largest
language block's weights, its linears' input Hessians (SparseGPT), the calibration hidden states, and
its keep-masks (a byte per weight, on the device until the block is done) and the whole tower's weights
for contrast.

    python benchmarks/prune_scale.py [--model llava-1.5-7b] [--methods wanda sparsegpt] [--json results/prune_scale.json]
    python benchmarks/prune_scale.py --quick   # 2 language blocks, 2 vision blocks (1 runs), 2 samples: a CPU try-out
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from common import calibration_inputs, positive_int, run_child, write_results

METHODS = ("wanda", "sparsegpt")
PATTERNS = ("unstructured", "2:4")
HESSIAN_METHODS = ("sparsegpt",)
SPARSITY = 0.5
RESULT = "PRUNE_SCALE_RESULT "
FULL = {"language_depth": None, "vision_depth": None, "samples": 32, "text_tokens": 47, "batch_size": 8,
        "repeats": 0}
QUICK = {"language_depth": 2, "vision_depth": 2, "samples": 2, "text_tokens": 15, "batch_size": 2, "repeats": 1}
BOS_ID, FIRST_TEXT_ID = 1, 3  # Llama's tokenizer: unk 0, bos 1, eos 2


def model_config(model: str, language_depth: int | None, vision_depth: int | None) -> Any:
    """The preset's (or directory's) `VLMConfig`, its towers cut to the given depths."""
    from sparsevlm.plan import plan_config

    config = plan_config(model)
    if language_depth is not None:
        config = dataclasses.replace(config, language=dataclasses.replace(config.language, depth=language_depth))
    if vision_depth is not None:
        # The feature layer keeps its offset from the top (LLaVA's -2: the blocks below the last one run).
        config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, depth=vision_depth))
    return config


def random_params(config: Any, seed: int) -> Any:
    """Host (NumPy) float32 params of `config`'s shapes: N(0, 1/fan_in) kernels, unit norm scales, zero biases.

    Leaves are drawn in parallel threads (NumPy's generators release the GIL), each from its own seed.
    """
    import jax

    from sparsevlm.models.vlm import VLM

    size = config.vision.image_size
    shapes = jax.eval_shape(VLM(config).init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), np.float32),
                            jax.ShapeDtypeStruct((1, 4), np.int32), jax.ShapeDtypeStruct((1, 4), bool))["params"]
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    seeds = np.random.SeedSequence(seed).spawn(len(leaves))

    def draw(index: int) -> np.ndarray:
        path, leaf = leaves[index]
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        scale = 1 / np.sqrt(leaf.shape[0]) if len(leaf.shape) >= 2 else 0.02
        values = np.random.default_rng(seeds[index]).standard_normal(leaf.shape, np.float32)
        values *= np.float32(scale)
        return values

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        values = list(pool.map(draw, range(len(leaves))))
    return jax.tree.unflatten(treedef, values)


class LiveBytes:
    """The peak total bytes of live JAX arrays, sampled every `interval` seconds in a background thread."""

    def __init__(self, interval: float = 0.02) -> None:
        import jax

        self._live = lambda: sum(x.nbytes for x in jax.live_arrays())
        self.base = self._live()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, self._live() - self.base)

    def __enter__(self) -> "LiveBytes":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def bound_sizes(config: Any, params: Any, method: str, samples: int, sequence: int) -> dict[str, int]:
    """Bytes of what the device must hold for one block, and of the whole language tower."""
    from sparsevlm.masks import prunable_paths
    from sparsevlm.tree import flatten

    flat = dict(flatten(params))
    blocks = {}
    for path, value in flat.items():
        parts = path.split("/")
        if parts[0] == "language" and parts[1].startswith("blocks_"):
            blocks.setdefault(parts[1], []).append(path)
    largest = max(blocks.values(), key=lambda paths: sum(flat[p].nbytes for p in paths))
    linears = [p for p in prunable_paths(params) if p in largest]
    hessians = sum(4 * flat[p].shape[0] ** 2 for p in linears) if method in HESSIAN_METHODS else 0
    return {
        "block_weight_bytes": int(sum(flat[p].nbytes for p in largest)),
        "block_hessian_bytes": int(hessians),
        "block_mask_bytes": int(sum(flat[p].size for p in linears)),  # one byte per weight until they go to the host
        "hidden_state_bytes": int(samples * sequence * config.language.width * 4),
        "tower_weight_bytes": int(sum(v.nbytes for p, v in flat.items() if p.startswith("language/"))),
    }


def child(args: argparse.Namespace) -> None:
    """One (method, pattern) run in this process; prints its JSON after `RESULT`."""
    import jax

    from prune import CompileMeter
    from sparsevlm.config import SparsitySpec
    from sparsevlm.pruning import prune

    config = model_config(args.model, args.language_depth, args.vision_depth)
    started = time.perf_counter()
    params = random_params(config, args.seed)
    weights_seconds = time.perf_counter() - started
    images, tokens = calibration_inputs(config, args.samples, args.text_tokens, args.seed, BOS_ID, FIRST_TEXT_ID)
    carry = {"images": images, "tokens": tokens, "text_mask": np.ones(tokens.shape, bool)}
    spec = SparsitySpec.language_only(SPARSITY, args.pattern)
    meter = CompileMeter()
    device = jax.local_devices()[0]
    calls = []
    for _ in range(1 + args.repeats):
        compile_before = meter.seconds
        with LiveBytes() as live:
            started = time.perf_counter()
            result = prune(params, config, spec, args.method, carry, batch_size=args.batch_size)
            seconds = time.perf_counter() - started
        calls.append({"seconds": round(seconds, 3), "compile_s": round(meter.seconds - compile_before, 3),
                      "phase_s": result.phases, "live_array_peak_bytes": int(live.peak)})
        del result
    stats = device.memory_stats() or {}
    report = {
        "method": args.method, "pattern": args.pattern, "calls": calls,
        "device_peak_bytes": stats.get("peak_bytes_in_use"),  # the allocator's, since this process started
        "random_weights_s": round(weights_seconds, 2),
        **bound_sizes(config, params, args.method, args.samples, tokens.shape[1]),
    }
    print(RESULT + json.dumps(report))


def gib(value: int | None) -> str:
    """Bytes as GiB with two decimals, or '-'."""
    return "-" if value is None else f"{value / 2**30:.2f}"


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """One line per run: times, peaks and the bound's parts, in GiB."""
    print(f"{'method':>10}{'pattern':>14}{'first s':>9}{'compile':>9}{'warm s':>8}{'peak GiB':>10}{'live GiB':>10}"
          f"{'block':>8}{'masks':>7}{'hessians':>10}{'hidden':>8}{'tower':>8}")
    for r in rows:
        first, warm = r["calls"][0], (r["calls"][1]["seconds"] if len(r["calls"]) > 1 else None)
        live = max(call["live_array_peak_bytes"] for call in r["calls"])
        print(f"{r['method']:>10}{r['pattern']:>14}{first['seconds']:>9.1f}{first['compile_s']:>9.1f}"
              f"{'-' if warm is None else f'{warm:.1f}':>8}{gib(r['device_peak_bytes']):>10}{gib(live):>10}"
              f"{gib(r['block_weight_bytes']):>8}{gib(r['block_mask_bytes']):>7}{gib(r['block_hessian_bytes']):>10}{gib(r['hidden_state_bytes']):>8}"
              f"{gib(r['tower_weight_bytes']):>8}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run each (method, pattern) in a child process and report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llava-1.5-7b", help="a `sparsevlm plan` preset or a directory with a "
                                                                "config.json (default llava-1.5-7b)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--patterns", nargs="+", choices=PATTERNS, default=list(PATTERNS))
    parser.add_argument("--language-depth", type=positive_int, help="keep the first N language blocks (default all)")
    parser.add_argument("--vision-depth", type=positive_int, help="keep the first N vision blocks (default all)")
    parser.add_argument("--samples", type=positive_int, help=f"calibration samples (default {FULL['samples']})")
    parser.add_argument("--text-tokens", type=positive_int,
                        help=f"text tokens per sample after BOS and the image tokens (default {FULL['text_tokens']})")
    parser.add_argument("--batch-size", type=positive_int,
                        help=f"calibration samples per forward call (default {FULL['batch_size']})")
    parser.add_argument("--repeats", type=int, choices=(0, 1), help="warm calls after the first (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help=f"a CPU try-out: {', '.join(f'{k}={v}' for k, v in QUICK.items())}")
    parser.add_argument("--json", default="results/prune_scale.json")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PATTERN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.child:
        args.method, args.pattern = args.child
        child(args)
        return
    model_config(args.model, args.language_depth, args.vision_depth)  # a bad --model fails here, in one line
    load_before = os.getloadavg()
    passed = ["--model", args.model, "--samples", str(args.samples), "--text-tokens", str(args.text_tokens),
              "--batch-size", str(args.batch_size), "--repeats", str(args.repeats), "--seed", str(args.seed)]
    for name in ("language_depth", "vision_depth"):
        if getattr(args, name) is not None:
            passed += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    rows = [run_child(__file__, [*passed, "--child", method, pattern], RESULT)
            for pattern in args.patterns for method in args.methods]
    print_table(rows)
    config = model_config(args.model, args.language_depth, args.vision_depth)
    write_results(args.json, {
        "benchmark": "prune_scale", "quick": args.quick, "model": args.model,
        "language": {"width": config.language.width, "depth": config.language.depth,
                     "mlp_dim": config.language.mlp_dim},
        "vision_depth": config.vision.depth, "sparsity": SPARSITY, "towers": ["language"],
        "calibration": {"samples": args.samples, "sequence_length": 1 + config.num_image_tokens + args.text_tokens,
                        "batch_size": args.batch_size, "mode": "sequential", "data": "random images and token ids"},
        "params": "random float32 on the host, drawn per leaf (no checkpoint)",
        "results": rows,
    }, load_before[0])


if __name__ == "__main__":
    main()
