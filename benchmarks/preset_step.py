"""The restoration step of a 7B preset (or any `sparsevlm plan` model) from random init: time, MFU, peak memory.

    PYTHONPATH=. python benchmarks/preset_step.py [--model llava-1.5-7b] [--batch-size 8] [--seq-len 624] \
        [--repeats 5] [--remat block] [--no-scan] [--json results/preset_step.json]

Params (bf16), half-kept packed masks, LoRA factors and AdamW state are built on the device by one
jitted random init (no checkpoint, no host copy); the step is `sparsevlm.plan.restoration_setup`'s,
SparseLoRA + KL (λ = 0.1) in bf16, compiled ahead of time. MFU = XLA's FLOP count of the compiled
step / (median step time × the device's dense bf16 peak, `PEAK_FLOPS`); on a CPU it is not reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from sparsevlm.config import PLAN_PRESETS, REMAT_MODES

# Dense bf16 peak FLOP/s by device kind (vendor figures, without sparsity).
PEAK_FLOPS = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12}


def main(argv: Sequence[str] | None = None) -> None:
    """Build, compile and time the preset's restoration step; print and write a JSON report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=PLAN_PRESETS[0], help="a preset or a directory with a config.json")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=624)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--remat", default="block", choices=REMAT_MODES)
    parser.add_argument("--no-scan", action="store_true", help="unrolled blocks instead of scanned stacks")
    parser.add_argument("--json", default="results/preset_step.json")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from sparsevlm import sharding
    from sparsevlm.config import RestoreConfig
    from sparsevlm.plan import plan_config, restoration_setup, _flops

    restore = RestoreConfig(method="sparselora", bf16=True, remat=args.remat, scan_layers=not args.no_scan)
    config = plan_config(args.model)
    setup = restoration_setup(config, restore, args.batch_size, args.seq_len)
    started = time.perf_counter()
    compiled = sharding.compile_step(setup.step, (setup.state, setup.batch, setup.params, setup.masks),
                                     (setup.shardings.state, *setup.shardings.inputs))
    compile_s = time.perf_counter() - started
    params, masks, state = jax.jit(setup.build, out_shardings=(setup.shardings.inputs[1], setup.shardings.inputs[2],
                                                               setup.shardings.state))()
    rng = np.random.default_rng(0)
    batch = {}
    for name, spec in setup.batch.items():
        if spec is None:
            batch[name] = None
        elif spec.dtype == jnp.bool_:
            batch[name] = np.ones(spec.shape, bool)
        elif jnp.issubdtype(spec.dtype, jnp.integer):
            batch[name] = rng.integers(1, 32000, spec.shape).astype(np.int32)
        else:
            batch[name] = rng.standard_normal(spec.shape).astype(np.float32)
    if config.image_token_id is not None and config.family == "llava":  # the image's placeholder tokens first
        batch["tokens"][:, 1:1 + config.num_image_tokens] = config.image_token_id
    batch["loss_mask"][:, : batch["loss_mask"].shape[1] - 16] = False  # the last 16 positions are the answer
    batch = jax.device_put(batch)
    times, loss = [], None
    for i in range(args.repeats + 1):  # the first call is a warm-up
        started = time.perf_counter()
        state, metrics = compiled(state, batch, params, masks)
        loss = float(jax.block_until_ready(metrics)["loss"])
        if i:
            times.append(time.perf_counter() - started)
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform == "gpu" else None
    flops = _flops(compiled)
    median = statistics.median(times)
    peak = PEAK_FLOPS.get(device.device_kind)
    report = {
        "benchmark": "preset_step", "model": args.model, "family": config.family,
        "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(setup.params))),
        "batch_size": args.batch_size, "seq_len": args.seq_len, "remat": args.remat, "scan_layers": not args.no_scan,
        "device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
        "compile_s": round(compile_s, 2), "step_ms_median": round(1e3 * median, 2),
        "step_ms_min": round(1e3 * min(times), 2), "loss": loss, "flops_per_step": flops,
        "mfu": None if peak is None or flops is None else round(flops / median / peak, 4),
        "device_peak_gib": None if not stats else round(stats["peak_bytes_in_use"] / 2**30, 2),
        "xla_memory_mib": {k: round(v / 2**20, 1) for k, v in sharding.compiled_memory(compiled).items()},
    }
    print(json.dumps(report, indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
