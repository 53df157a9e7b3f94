"""Peak host memory of loading an HF LLaVA checkpoint: `load_hf_model` against transformers' `from_pretrained`.

A random-weight float32 LLaVA (CLIP + Llama, 247 MiB; `--quick`: 7.5 MiB) is saved by transformers in
shards with `model.safetensors.index.json` (or `--dir` holds one already, e.g. a real checkpoint).
Each loader then runs in a fresh process that first imports jax, torch, transformers and sparsevlm
and runs a small jax op, so library start-up is not counted; the peak resident set is reset there
(Linux `/proc/self/clear_refs`) and the baseline taken. The figure is the growth of the peak
(`VmHWM`) over that baseline during the load, as a ratio to the checkpoint's tensor bytes (from the
safetensors headers): 1.0 means the loader never held more than the weights themselves. Prints a
table, writes JSON.

    python benchmarks/hf_load.py [--dir DIR] [--json results/hf_load.json]
    python benchmarks/hf_load.py --quick          # a 7.5 MiB checkpoint (smoke test)
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

LOADERS = ("sparsevlm", "transformers")
TARGET_RATIO = 1.3  # the acceptance bar for our loader: at most 30% above the weights themselves
MIB = 2**20
RESULT_PREFIX = "HF_LOAD_RESULT "


def _status_kib(field: str) -> int:
    """A `VmRSS`/`VmHWM`-style field of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def measure(loader: str, directory: str) -> dict[str, Any]:
    """In this (fresh) process: peak RSS growth of loading `directory` with `loader`, after the imports."""
    import resource

    import jax
    import jax.numpy as jnp
    importlib.import_module("torch")  # transformers' loader needs it: imported before the baseline for both
    from transformers import LlavaForConditionalGeneration

    from sparsevlm.hf.load import load_hf_model

    jnp.ones(8).sum().block_until_ready()  # JAX backend start-up happens here, not inside the load
    gc.collect()
    # Reset the kernel's peak-RSS mark to the current RSS, so VmHWM measures this load alone.
    try:
        Path("/proc/self/clear_refs").write_text("5")
        peak_reset = True
    except OSError:  # then VmHWM also covers the imports: the growth is an upper bound
        peak_reset = False
    baseline_kib = _status_kib("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if loader == "sparsevlm":
        loaded: Any = load_hf_model(directory)
        jax.block_until_ready(loaded.params)
    else:
        loaded = LlavaForConditionalGeneration.from_pretrained(directory)
    seconds = time.perf_counter() - start
    peak_kib = _status_kib("VmHWM")
    retained_kib = _status_kib("VmRSS")
    # transformers maps the safetensors files and reads a weight's pages only when it is first used;
    # reading every weight once shows what the loaded model really keeps resident.
    touch_start = time.perf_counter()
    if loader == "sparsevlm":
        leaves = jax.tree.leaves(loaded.params)
    else:
        leaves = [p.detach() for p in loaded.state_dict().values()]
    checksum = sum(float(leaf.sum()) for leaf in leaves)
    touch_seconds = time.perf_counter() - touch_start
    touched_kib = _status_kib("VmHWM")
    return {
        "loader": loader,
        "load_s": round(seconds, 3),
        "peak_reset": peak_reset,
        "baseline_mib": round(baseline_kib / 1024, 1),
        "peak_mib": round(peak_kib / 1024, 1),
        "peak_growth_mib": round((peak_kib - baseline_kib) / 1024, 1),
        "retained_growth_mib": round((retained_kib - baseline_kib) / 1024, 1),
        "touched_peak_growth_mib": round((touched_kib - baseline_kib) / 1024, 1),
        "touch_s": round(touch_seconds, 3),
        "checksum": checksum,
        # ru_maxrss cannot be reset; it agrees with VmHWM unless the process peaked before the baseline.
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "ru_maxrss_before_mib": round(maxrss_before / 1024, 1),
    }


def run_child(loader: str, directory: Path) -> dict[str, Any]:
    """`measure` in a fresh Python process (so nothing from this one, or the other loader, is counted)."""
    from common import run_child as run_script

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one real device, as users run it
    return run_script(__file__, ["--measure", loader, "--dir", str(directory)], RESULT_PREFIX, env, timeout=1800)


def describe(directory: Path) -> dict[str, Any]:
    """The checkpoint's tensor bytes (from the safetensors headers), files and model sizes."""
    from sparsevlm.hf.safetensors_io import Checkpoint

    checkpoint = Checkpoint(directory)
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    config = json.loads((directory / "config.json").read_text())
    text, vision = config.get("text_config", {}), config.get("vision_config", {})
    return {
        "dir": str(directory),
        "tensor_bytes": checkpoint.nbytes(),
        "tensor_mib": round(checkpoint.nbytes() / MIB, 1),
        "file_mib": round(sum((directory / f).stat().st_size for f in files) / MIB, 1),
        "shards": len(files),
        "tensors": len(checkpoint.keys()),
        "model_type": config.get("model_type"),
        "text": {k: text.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")},
        "vision": {k: vision.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "image_size")},
    }


def print_table(checkpoint: dict[str, Any], rows: Sequence[dict[str, Any]]) -> None:
    """One line per loader."""
    print(f"checkpoint: {checkpoint['tensor_mib']} MiB of tensors in {checkpoint['shards']} shard(s) "
          f"({checkpoint['tensors']} tensors) at {checkpoint['dir']}")
    print(f"{'loader':<14}{'load s':>8}{'baseline MiB':>14}{'peak +MiB':>11}{'kept +MiB':>11}{'peak / ckpt':>13}"
          f"{'touched +MiB':>14}{'touched / ckpt':>16}")
    for r in rows:
        print(f"{r['loader']:<14}{r['load_s']:>8}{r['baseline_mib']:>14}{r['peak_growth_mib']:>11}"
              f"{r['retained_growth_mib']:>11}{r['peak_ratio']:>13.3f}{r['touched_peak_growth_mib']:>14}"
              f"{r['touched_peak_ratio']:>16.3f}")


def main(argv: Sequence[str] | None = None) -> None:
    """Build (or reuse) the checkpoint, measure each loader in its own process, and report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where to build the checkpoint; an existing one (config.json present) is "
                                      "used as it is (default: a temporary directory)")
    parser.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS))
    parser.add_argument("--quick", action="store_true",
                        help="the 7.5 MiB `quick` preset of benchmarks/llava.py (smoke test)")
    parser.add_argument("--json", default="results/hf_load.json")
    parser.add_argument("--measure", choices=LOADERS, help=argparse.SUPPRESS)  # internal: the child process
    args = parser.parse_args(argv)
    if args.measure:
        print(RESULT_PREFIX + json.dumps(measure(args.measure, args.dir)), flush=True)
        return

    from common import write_results
    from llava import SIZES, build_checkpoint

    load_before = os.getloadavg()
    sizes = SIZES["quick" if args.quick else "small"]
    with tempfile.TemporaryDirectory(prefix="hf_load_") as tmp:
        directory = Path(args.dir) if args.dir else Path(tmp) / "llava"
        built = not (directory / "config.json").is_file()
        if built:
            build_checkpoint(directory, sizes)
        checkpoint = describe(directory)
        rows = [run_child(loader, directory) for loader in args.loaders]
    for r in rows:
        r["peak_ratio"] = round(r["peak_growth_mib"] * MIB / checkpoint["tensor_bytes"], 3)
        r["retained_ratio"] = round(r["retained_growth_mib"] * MIB / checkpoint["tensor_bytes"], 3)
        r["touched_peak_ratio"] = round(r["touched_peak_growth_mib"] * MIB / checkpoint["tensor_bytes"], 3)
    print_table(checkpoint, rows)
    ours = next((r for r in rows if r["loader"] == "sparsevlm"), None)
    out = {
        "benchmark": "hf_load",
        "quick": args.quick,
        "built": built,
        "sizes": sizes if built else None,
        "checkpoint": checkpoint,
        "target_ratio": TARGET_RATIO,
        "meets_target": None if ours is None else ours["peak_ratio"] < TARGET_RATIO,
        "results": rows,
    }
    write_results(args.json, out, load_before[0])


if __name__ == "__main__":
    main()
