"""2:4 linears as semi-structured sparse matmuls (cuSPARSELt/CUTLASS via `torch.sparse.to_sparse_semi_structured`)
against dense ones, at a Llama's real shapes: prefill (624 tokens × batch 8) and decode (batch 1–32), and the
language model's whole prefill with every linear swapped. Same process, same weights, median of repeats.

    python benchmarks/sparse_speedup.py [--config 1b|7b|quick] [--export DIR] [--json PATH]

The 2:4 weights go through our compressed format first (`sparsevlm.hf.compressed`: compressed, then
decompressed): from a compressed export's 2:4 language-model linears with `--export`, else magnitude-pruned
random weights of the config's shapes. Every run checks correctness — the sparse result equals the dense
one on the same weights (on CPU against a reference that multiplies only the stored values, since
PyTorch's semi-structured kernels are CUDA-only) — and without a GPU reports that no timing was possible.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsevlm.hf.compressed import SPARSE_24, CompressedCheckpoint, compress, decompress

# Llama shapes `[out, in]` per linear kind: LLaVA-1.5-7B's Vicuna and benchmarks/llava.py's `1b`.
CONFIGS: dict[str, dict[str, Any]] = {
    "7b": {"width": 4096, "mlp": 11008, "kv_width": 4096, "heads": 32, "kv_heads": 32, "layers": 32, "vocab": 32064},
    "1b": {"width": 2048, "mlp": 5632, "kv_width": 256, "heads": 32, "kv_heads": 4, "layers": 22, "vocab": 32000},
    "quick": {"width": 128, "mlp": 352, "kv_width": 128, "heads": 8, "kv_heads": 8, "layers": 2, "vocab": 4000},
}


def linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """One `[out, in]` shape per linear kind of a Llama block."""
    w, m, kv = config["width"], config["mlp"], config["kv_width"]
    return {"q_proj": (w, w), "k_proj": (kv, w), "v_proj": (kv, w), "o_proj": (w, w),
            "gate_proj": (m, w), "up_proj": (m, w), "down_proj": (w, m)}


def magnitude_24(weight: np.ndarray) -> np.ndarray:
    """`weight` with the 2 smallest-magnitude of every 4 consecutive inputs zeroed."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    order = np.argsort(np.abs(groups), axis=-1)
    pruned = groups.copy()
    np.put_along_axis(pruned, order[..., :2], 0, axis=-1)
    return pruned.reshape(weight.shape)


def through_format(name: str, weight: np.ndarray) -> np.ndarray:
    """A 2:4 weight written in our compressed format and read back (what a served export holds)."""
    parts = compress(name, weight, SPARSE_24)
    return decompress(name, SPARSE_24, parts.__getitem__)


def exported_linears(directory: Path) -> dict[str, np.ndarray]:
    """The 2:4 language-model linears of a compressed export, decompressed, by HF name."""
    checkpoint = CompressedCheckpoint(directory)
    return {name: checkpoint.read(name) for name, fmt in checkpoint.formats.items()
            if fmt == SPARSE_24 and "language_model" in name}


def stored_values_matmul(x: np.ndarray, name: str, weight: np.ndarray) -> np.ndarray:
    """`x @ weight.T` from the compressed values and their bitmask positions only (never the dense weight)."""
    parts = compress(name, weight, SPARSE_24)
    prefix = name.removesuffix(".weight")
    values = parts[f"{prefix}.compressed"].astype(np.float64)  # [out, in/2]
    kept = np.unpackbits(parts[f"{prefix}.bitmask"], axis=-1, count=weight.shape[1], bitorder="little").astype(bool)
    columns = np.nonzero(kept)[1].reshape(weight.shape[0], -1)  # [out, in/2]: each stored value's input
    return np.einsum("toi,oi->to", x.astype(np.float64)[:, columns], values)


def median_ms(fn: Any, repeats: int) -> float:
    """Median wall time of `fn()` in milliseconds, CUDA-synchronised, after two warm-up calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cpu_check(weights: dict[str, np.ndarray], tokens: int, seed: int) -> dict[str, Any]:
    """Dense matmul of the round-tripped weights against the stored-values reference, per linear (float64)."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for name, weight in weights.items():
        x = rng.standard_normal((tokens, weight.shape[1])).astype(np.float32)
        dense = x.astype(np.float64) @ through_format(name, weight).astype(np.float64).T
        worst = max(worst, float(np.abs(dense - stored_values_matmul(x, name, weight)).max()))
    return {"linears": len(weights), "tokens": tokens, "max_abs_diff": worst, "ok": worst <= 1e-9}


def gpu_linears(weights: dict[str, np.ndarray], config: dict[str, Any], batch: int, prefill: int,
                decode: list[int], repeats: int) -> list[dict[str, Any]]:
    """Dense vs semi-structured matmul times per linear shape: prefill and each decode batch."""
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for name, weight in weights.items():
        dense = torch.from_numpy(through_format(name, weight)).to("cuda", torch.bfloat16)
        sparse = to_sparse_semi_structured(dense)
        for phase, tokens in [("prefill", batch * prefill)] + [(f"decode_b{b}", b) for b in decode]:
            x = torch.randn(tokens, dense.shape[1], device="cuda", dtype=torch.bfloat16)
            want, got = torch.nn.functional.linear(x, dense), torch.nn.functional.linear(x, sparse)
            error = float((want.float() - got.float()).abs().max() / want.float().abs().max())
            dense_ms = median_ms(lambda: torch.nn.functional.linear(x, dense), repeats)
            sparse_ms = median_ms(lambda: torch.nn.functional.linear(x, sparse), repeats)
            rows.append({"linear": name, "shape_out_in": list(dense.shape), "phase": phase, "tokens": tokens,
                         "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
                         "relative_error": error})
    return rows


def gpu_prefill(config: dict[str, Any], layers: int, batch: int, prefill: int, repeats: int, seed: int) -> dict:
    """The Llama's prefill forward, dense and with every block linear 2:4 semi-structured (same pruned weights)."""
    from torch.sparse import to_sparse_semi_structured
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    hf = LlamaConfig(hidden_size=config["width"], intermediate_size=config["mlp"], num_hidden_layers=layers,
                     num_attention_heads=config["heads"], num_key_value_heads=config["kv_heads"],
                     vocab_size=config["vocab"])
    with torch.device("cuda"):
        model = LlamaModel(hf).to(torch.bfloat16).eval()
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for linear in linears:  # pruned on the GPU: the 2 smallest of every 4 inputs
            groups = linear.weight.view(linear.weight.shape[0], -1, 4)
            drop = groups.abs().argsort(dim=-1)[..., :2]
            linear.weight.copy_(groups.scatter(-1, drop, 0).view_as(linear.weight))
    tokens = torch.randint(0, config["vocab"], (batch, prefill), device="cuda")
    with torch.no_grad():
        want = model(tokens).last_hidden_state
        dense_ms = median_ms(lambda: model(tokens), repeats)
        for linear in linears:
            linear.weight = torch.nn.Parameter(to_sparse_semi_structured(linear.weight), requires_grad=False)
        got = model(tokens).last_hidden_state
        sparse_ms = median_ms(lambda: model(tokens), repeats)
    error = float((want.float() - got.float()).abs().max() / want.float().abs().max())
    return {"layers": layers, "batch": batch, "tokens": prefill, "linears_swapped": len(linears),
            "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms, "relative_error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="1b", choices=sorted(CONFIGS))
    parser.add_argument("--export", type=Path, default=None, help="a compressed export whose 2:4 LM linears to time")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prefill-tokens", type=int, default=624)
    parser.add_argument("--decode-batches", default="1,2,4,8,16,32")
    parser.add_argument("--e2e-layers", type=int, default=None, help="blocks in the end-to-end prefill (default: all)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    config = CONFIGS[args.config]
    if args.export is not None:
        found = exported_linears(args.export)
        kinds = {}
        for name, weight in found.items():  # one linear per kind: shapes repeat across blocks
            kinds.setdefault(name.rsplit(".", 2)[-2], (name, weight))
        weights = dict(kinds.values())
        if not weights:
            raise SystemExit(f"{args.export} holds no 2:4 language-model linears")
    else:
        rng = np.random.default_rng(args.seed)
        weights = {f"layers.0.{kind}.weight": magnitude_24(rng.standard_normal(shape).astype(np.float32))
                   for kind, shape in linear_shapes(config).items()}
    result: dict[str, Any] = {
        "config": args.config if args.export is None else str(args.export), "torch": torch.__version__,
        "host": platform.processor() or platform.machine(),
        "correctness_cpu": cpu_check({n: w[:64] for n, w in weights.items()}, 8, args.seed),
    }
    if not torch.cuda.is_available():
        result |= {"gpu": None, "note": "no GPU present: correctness checked on CPU only, no timing measured"}
    else:
        decode = [int(b) for b in args.decode_batches.split(",")]
        started = time.perf_counter()
        result |= {"gpu": torch.cuda.get_device_name(),
                   "linears": gpu_linears(weights, config, args.batch, args.prefill_tokens, decode, args.repeats),
                   "prefill": gpu_prefill(config, args.e2e_layers or config["layers"], args.batch,
                                          args.prefill_tokens, max(3, args.repeats // 4), args.seed),
                   "seconds": time.perf_counter() - started}
    print(json.dumps({k: v for k, v in result.items() if k != "linears"}, indent=2))
    for row in result.get("linears", []):
        print(f"{row['linear']:<24} {row['phase']:<10} {row['tokens']:>6} tok  dense {row['dense_ms']:.3f} ms  "
              f"2:4 {row['sparse_ms']:.3f} ms  ×{row['speedup']:.2f}")
    if not result["correctness_cpu"]["ok"]:
        raise SystemExit("the 2:4 result differs from the dense one")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
