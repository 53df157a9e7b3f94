"""The SparseLoRA restoration step on 1, 2, 4 and 8 simulated CPU devices, data- and fsdp-sharded.

Correctness and per-device memory, not speed: simulated devices share the host's cores, so their
step times say nothing about real scaling (they are recorded, labelled as such). For each device
count a fresh process is started with `--xla_force_host_platform_device_count=N` (JAX reads it once,
at start-up); inside it the default model (random init, 50% magnitude masks, LoRA with random B so
every factor gets a gradient) takes one restoration step on one device — the reference — and one on
each mesh (`data=N`, `fsdp=N`). Reported per mesh: the loss and gradient-norm differences to the
reference, the largest difference of the updated LoRA factors, and the per-device bytes of params,
masks, LoRA, optimizer state and batch, and XLA's compiled-step temporaries and total
(`sparsevlm.sharding.restore_memory`), with the ratio to one device. Prints a table, writes JSON.

    python benchmarks/scaling.py [--devices 1 2 4 8] [--batch-size 32] [--json results/scaling.json]
    python benchmarks/scaling.py --quick          # 8 devices, fsdp only (against its one-device reference), batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

RESULT_PREFIX = "SCALING_RESULT "
MIB = 2**20
MESHES = ("data", "fsdp")


def measure(devices: int, batch_size: int, kinds: Sequence[str] = MESHES) -> list[dict[str, Any]]:
    """In this process (with `devices` simulated devices): reference step vs each mesh kind."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sparsevlm import sharding as sh
    from sparsevlm.config import LoraConfig, RestoreConfig
    from sparsevlm.lora import init_lora
    from sparsevlm.train import TrainState, make_optimizer, make_train_step, restoration_loss

    from train_step import KL_WEIGHT, build

    assert jax.device_count() == devices, (jax.device_count(), devices)
    setup = build("vqa", batch_size)
    params, masks, arrays = jax.device_get((setup.params, setup.masks, setup.arrays))
    restore = RestoreConfig()
    lora_config = LoraConfig()
    lora = init_lora(params, lora_config, jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), len(jax.tree.leaves(lora)))
    lora = jax.tree.unflatten(jax.tree.structure(lora), [
        np.asarray(x + 0.02 * jax.random.normal(k, x.shape)) for x, k in zip(jax.tree.leaves(lora), keys)])
    optimizer = make_optimizer(restore.learning_rate, restore.end_learning_rate, 0, restore.steps,
                               restore.weight_decay, restore.grad_clip)
    state = TrainState(lora, optimizer.init(lora), jnp.zeros((), jnp.int32))

    def run(mesh: Any) -> tuple[Any, dict[str, float], dict[str, int], float]:
        shardings = sh.restore_shardings(mesh, optimizer, state, params, masks, arrays)
        step = make_train_step(restoration_loss(setup.model, lora_config.alpha, "sparselora", KL_WEIGHT,
                                                restore.temperature), optimizer, shardings)
        compiled = sh.compile_step(step, (state, arrays, params, masks), (shardings.state, *shardings.inputs))
        memory = sh.restore_memory(compiled, shardings, state, params, masks, arrays)
        inputs = (sh.shard(state, shardings.state), sh.shard(arrays, shardings.inputs[0]),
                  sh.shard(params, shardings.inputs[1]), sh.shard(masks, shardings.inputs[2]))
        step = compiled
        new, metrics = jax.block_until_ready(step(*inputs))
        start = time.perf_counter()
        jax.block_until_ready(step(*inputs))
        seconds = time.perf_counter() - start
        return jax.device_get(new.params), {k: float(v) for k, v in metrics.items()}, memory, seconds

    reference_lora, reference, one_memory, one_seconds = run(sh.make_mesh("data=1", jax.devices()[:1]))
    rows = []
    for kind in kinds if devices > 1 else ("data",):
        mesh = sh.make_mesh(f"{kind}={devices}")
        lora_new, metrics, memory, seconds = run(mesh)
        lora_diff = max(float(np.max(np.abs(a - b))) for a, b in
                        zip(jax.tree.leaves(lora_new), jax.tree.leaves(reference_lora)))
        update = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(reference_lora), jax.tree.leaves(lora)))
        rows.append({
            "devices": devices, "mesh": dict(mesh.shape), "kind": kind, "batch_size": batch_size,
            "loss": metrics["loss"], "loss_diff": abs(metrics["loss"] - reference["loss"]),
            "grad_norm_rel_diff": abs(metrics["grad_norm"] - reference["grad_norm"]) / reference["grad_norm"],
            "lora_max_diff": lora_diff, "lora_max_update": update,
            "memory_bytes": memory,
            "memory_vs_one_device": {k: round(memory[k] / one_memory[k], 4) for k in memory if one_memory[k]},
            "step_s_simulated": round(seconds, 4), "one_device_step_s": round(one_seconds, 4),
        })
    return rows


def run_child(devices: int, batch_size: int, kinds: Sequence[str]) -> list[dict[str, Any]]:
    """`measure` in a fresh process with `devices` simulated CPU devices."""
    from common import run_child as run_script

    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return run_script(__file__, ["--measure", str(devices), "--batch-size", str(batch_size), "--meshes", *kinds],
                      RESULT_PREFIX, env)


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """One line per (device count, mesh)."""
    print(f"{'devices':>7} {'mesh':<6}{'loss diff':>11}{'grad rel':>10}{'LoRA diff':>11}{'params MiB':>12}"
          f"{'masks':>8}{'LoRA':>8}{'opt':>8}{'temp MiB':>10}{'step MiB':>10}{'x 1 dev':>9}")
    for r in rows:
        m = r["memory_bytes"]
        print(f"{r['devices']:>7} {r['kind']:<6}{r['loss_diff']:>11.2e}{r['grad_norm_rel_diff']:>10.1e}"
              f"{r['lora_max_diff']:>11.1e}{m['params'] / MIB:>12.3f}{m['masks'] / MIB:>8.3f}{m['lora'] / MIB:>8.3f}"
              f"{m['optimizer'] / MIB:>8.3f}{m['temporaries'] / MIB:>10.2f}{m['step_total'] / MIB:>10.2f}"
              f"{r['memory_vs_one_device']['step_total']:>9.3f}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run every device count in its own process and report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (divisible by every device count)")
    parser.add_argument("--meshes", nargs="+", choices=MESHES, default=list(MESHES), help="mesh kinds to run")
    parser.add_argument("--quick", action="store_true", help="8 devices, fsdp only, batch 8 (smoke test)")
    parser.add_argument("--json", default="results/scaling.json")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # internal: the child process
    args = parser.parse_args(argv)
    if args.measure:
        print(RESULT_PREFIX + json.dumps(measure(args.measure, args.batch_size, args.meshes)), flush=True)
        return
    if args.quick:
        args.devices, args.batch_size, args.meshes = [8], 8, ["fsdp"]
    bad = [d for d in args.devices if d < 1 or args.batch_size % d]
    if bad:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by every --devices value; not by {bad}")

    from common import write_results

    load_before = os.getloadavg()[0]
    rows = [row for devices in args.devices for row in run_child(devices, args.batch_size, args.meshes)]
    print_table(rows)
    write_results(args.json, {
        "benchmark": "scaling", "quick": args.quick, "model": "default (random init)", "step": "sparselora",
        "note": "simulated CPU devices share the host's cores: step times are not scaling figures",
        "results": rows,
    }, load_before)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
