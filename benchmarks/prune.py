"""Pruning time per method (magnitude, random, Wanda, SparseGPT, DSnoT), on a whole model and on one large layer.

Whole model: `prune` on `--model` at 50% unstructured and 2:4 (vision and language towers), with
`--calib-samples` calibration captions; the time includes the block-by-block calibration passes.
One layer: a Flax `[in, out]` kernel of `--layer-size` with `--layer-tokens` correlated Gaussian
activations; building the statistics (‖X‖², XᵀX) is timed apart from each method's pruning. DSnoT's
layer row is its worst case (threshold 0: all 100 swap cycles on every row) and includes Wanda's mask.
Each time is the median of `--repeats` calls after one warm-up call; prints a table, writes JSON.

    python benchmarks/prune.py [--model default] [--repeats 3] [--json results/bench_prune.json]
    python benchmarks/prune.py --quick --model PATH     # small sizes, one repeat (smoke test)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm.bundle import ModelBundle
from sparsevlm.config import DSnoTConfig, Pattern, SparsitySpec
from sparsevlm.data.examples import load_examples
from sparsevlm.hub import load_model
from sparsevlm.masks import measure_sparsity
from sparsevlm.pruning import prune, prune_layer
from sparsevlm.pruning.calibrate import calibration_carry
from sparsevlm.pruning.criteria import LayerStats
from sparsevlm.pruning.registry import METHODS

from common import positive_int, write_results

SPARSITY = 0.5
PATTERNS = ("unstructured", "2:4")
SCOPES = ("model", "layer")
FULL = {"layer_size": "4096", "layer_tokens": 2048, "repeats": 3, "calib_samples": 128}
QUICK = {"layer_size": "512", "layer_tokens": 256, "repeats": 1, "calib_samples": 16}
# JAX's own monitoring events for tracing, lowering and XLA compilation (jax/_src/dispatch.py).
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


class CompileMeter:
    """Running total of the seconds JAX spends tracing and compiling (read before and after a call)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, **kwargs: Any) -> None:
        if event in COMPILE_EVENTS:
            self.seconds += duration


def time_calls(fn: Callable[[], Any], repeats: int, meter: CompileMeter) -> tuple[dict[str, float], Any]:
    """Wall time of one warm-up call and the median/min/max of `repeats` more; `fn` must block on its result.

    Also returns the last call's result. `compile_s` is the median tracing+compile time inside a
    timed call: nonzero means the call recompiles every time, not only on warm-up.
    """
    def once() -> tuple[float, float, Any]:
        compile_before = meter.seconds
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, meter.seconds - compile_before, result

    first, first_compile, result = once()
    walls, compiles = [], []
    for _ in range(repeats):
        wall, compile_seconds, result = once()
        walls.append(wall)
        compiles.append(compile_seconds)
    timing = {
        "median_s": round(statistics.median(walls), 4),
        "min_s": round(min(walls), 4),
        "max_s": round(max(walls), 4),
        "first_s": round(first, 4),
        "first_compile_s": round(first_compile, 4),
        "compile_s": round(statistics.median(compiles), 4),
    }
    return timing, result


def measure_model(bundle: ModelBundle, methods: Sequence[str], patterns: Sequence[str], calib_samples: int,
                  repeats: int, meter: CompileMeter, seed: int = 0) -> list[dict[str, Any]]:
    """Time `prune` on the whole model for each method and pattern (both towers at 50%)."""
    start = time.perf_counter()
    data = load_examples("shapes-captions", bundle.tokenizer, calib_samples, seed, bundle.config.vision.image_size)
    carry = calibration_carry(data, calib_samples, bundle.tokenizer.pad_token_id, bundle.config.vision, seed)
    calib_data_seconds = time.perf_counter() - start
    rows = []
    for pattern in patterns:
        spec = SparsitySpec.same(SPARSITY, pattern)
        for method in methods:
            calibration = carry if METHODS[method].needs_calibration else None

            def run(method: str = method, calibration: Any = calibration) -> Any:
                # `prune` returns host (NumPy) arrays, so the result is materialised when it returns.
                return prune(bundle.params, bundle.config, spec, method, calibration, key=jax.random.key(seed))

            timing, result = time_calls(run, repeats, meter)
            measured = measure_sparsity(result.params)["towers"]
            rows.append({
                "scope": "model", "method": method, "pattern": pattern, **timing,
                "layers": len(result.ratios),
                "calib_samples": calib_samples if calibration is not None else 0,
                "calib_text_tokens": int(carry["text_mask"].sum()) if calibration is not None else 0,
                "calib_data_s": round(calib_data_seconds, 4) if calibration is not None else 0.0,
                "measured_sparsity": {tower: round(measured[tower], 4) for tower in ("vision", "language")},
                "phase_s": result.phases,  # the last timed call's seconds per phase (`calibrate.PHASES`)
            })
    return rows


def layer_inputs(tokens: int, fan_in: int, seed: int = 0, rank: int = 64) -> np.ndarray:
    """Correlated Gaussian activations `[tokens, fan_in]`: noise + a shared low-rank part, uneven feature scales."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((tokens, rank), np.float32) @ rng.standard_normal((rank, fan_in), np.float32)
    x = rng.standard_normal((tokens, fan_in), np.float32) + shared / np.sqrt(rank)
    # Log-normal per-feature scales give a few large-magnitude inputs, as LLM activations have.
    return (x * rng.lognormal(0.0, 1.0, fan_in).astype(np.float32)).astype(np.float32)


@partial(jax.jit, static_argnames="need_hessian")
def layer_stats(x: jax.Array, need_hessian: bool) -> LayerStats:
    """Calibration statistics of one linear's inputs: ‖X_j‖², optionally XᵀX, the token count and Σ_t x_t."""
    hessian = x.T @ x if need_hessian else None
    return LayerStats(jnp.sum(x * x, axis=0), hessian, jnp.asarray(x.shape[0], jnp.float32), jnp.sum(x, axis=0))


def measure_layer(fan_in: int, fan_out: int, tokens: int, methods: Sequence[str], patterns: Sequence[str],
                  repeats: int, meter: CompileMeter, seed: int = 0) -> list[dict[str, Any]]:
    """Time the statistics and each method's `prune_layer` on one `[fan_in, fan_out]` kernel."""
    rng = np.random.default_rng(seed + 1)
    kernel = jax.device_put(rng.standard_normal((fan_in, fan_out), np.float32) / np.sqrt(fan_in))
    x = jax.device_put(layer_inputs(tokens, fan_in, seed))
    shape = {"scope": "layer", "shape": [fan_in, fan_out], "tokens": tokens}
    rows = []
    stats = {}
    for name, need_hessian in (("sq_norm", False), ("hessian", True)):
        build = partial(lambda h: jax.block_until_ready(layer_stats(x, h)), need_hessian)
        timing, stats[name] = time_calls(build, repeats, meter)
        rows.append({**shape, "method": f"stats:{name}", "pattern": "-", **timing})
    # The statistics each method gets inside `prune`: none, ‖X‖² only, or XᵀX as well.
    method_stats = {"magnitude": None, "random": None, "wanda": stats["sq_norm"], "sparsegpt": stats["hessian"],
                    "dsnot": stats["sq_norm"]}
    # DSnoT at threshold 0 runs its full 100 swap cycles on every row: its worst case.
    worst_case = DSnoTConfig(threshold=0.0)
    key = jax.random.key(seed)
    for pattern_name in patterns:
        pattern = Pattern.parse(pattern_name)
        for method in methods:
            def run(method: str = method) -> tuple[jax.Array, jax.Array]:
                return jax.block_until_ready(
                    prune_layer(method, kernel, method_stats[method], pattern, SPARSITY, key, worst_case))

            timing, (_, keep) = time_calls(run, repeats, meter)
            rows.append({**shape, "method": method, "pattern": pattern_name, **timing,
                         "kept_fraction": round(float(jnp.mean(keep)), 4)})
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """`vs_magnitude`: each method's median over magnitude's, same scope and pattern, this run."""
    base = {(r["scope"], r["pattern"]): r["median_s"] for r in rows if r["method"] == "magnitude"}
    for r in rows:
        reference = base.get((r["scope"], r["pattern"]))
        r["vs_magnitude"] = round(r["median_s"] / reference, 2) if reference else None


def parse_layer_size(text: str) -> tuple[int, int]:
    """`N` (an N×N kernel) or `INxOUT`."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) not in (1, 2) or min(dims) <= 0:
        raise argparse.ArgumentTypeError(f"--layer-size {text!r} must be N or INxOUT with positive integers")
    return (dims[0], dims[-1])


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """One line per (scope, method, pattern)."""
    print(f"{'scope':<6}{'size':>11}{'method':>15}{'pattern':>14}{'median s':>10}{'min':>9}{'max':>9}"
          f"{'first s':>9}{'compile s':>11}{'x magnitude':>13}")
    for r in rows:
        size = "x".join(map(str, r["shape"])) if r["scope"] == "layer" else f"{r['layers']} lin"
        ratio = "-" if r["vs_magnitude"] is None else f"{r['vs_magnitude']:.2f}"
        print(f"{r['scope']:<6}{size:>11}{r['method']:>15}{r['pattern']:>14}{r['median_s']:>10.3f}{r['min_s']:>9.3f}"
              f"{r['max_s']:>9.3f}{r['first_s']:>9.3f}{r['compile_s']:>11.3f}{ratio:>13}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="default (trained on first use) or a saved model directory")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--patterns", nargs="+", choices=PATTERNS, default=list(PATTERNS))
    parser.add_argument("--scopes", nargs="+", choices=SCOPES, default=list(SCOPES))
    parser.add_argument("--layer-size", type=parse_layer_size, help=f"N or INxOUT (default {FULL['layer_size']})")
    parser.add_argument("--layer-tokens", type=positive_int, help=f"default {FULL['layer_tokens']}")
    parser.add_argument("--calib-samples", type=positive_int, help=f"default {FULL['calib_samples']}")
    parser.add_argument("--repeats", type=positive_int,
                        help=f"timed calls after one warm-up (default {FULL['repeats']})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help=f"small sizes for a smoke test: {', '.join(f'{k}={v}' for k, v in QUICK.items())}")
    parser.add_argument("--json", default="results/bench_prune.json")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    fan_in, fan_out = args.layer_size or parse_layer_size(defaults["layer_size"])
    tokens = args.layer_tokens or defaults["layer_tokens"]
    calib_samples = args.calib_samples or defaults["calib_samples"]
    repeats = args.repeats or defaults["repeats"]
    for pattern in args.patterns:
        Pattern.parse(pattern).check_shape((fan_in, fan_out), what="--layer-size")

    meter = CompileMeter()
    load_before = os.getloadavg()
    rows = []
    if "model" in args.scopes:
        bundle = load_model(args.model)
        rows += measure_model(bundle, args.methods, args.patterns, calib_samples, repeats, meter, args.seed)
    if "layer" in args.scopes:
        rows += measure_layer(fan_in, fan_out, tokens, args.methods, args.patterns, repeats, meter, args.seed)
    add_ratios(rows)
    print_table(rows)
    out = {
        "benchmark": "prune",
        "model": args.model,
        "sparsity": SPARSITY,
        "towers": ["vision", "language"],
        "calibration": {"data": "shapes-captions", "samples": calib_samples, "mode": "sequential"},
        "layer": {"shape": [fan_in, fan_out], "tokens": tokens},
        "repeats": repeats,
        "warmup": 1,
        "quick": args.quick,
        "results": rows,
    }
    write_results(args.json, out, load_before[0])


if __name__ == "__main__":
    main()
