"""File bytes of dense vs compressed sparse exports: 2:4 (sparse-24-bitmask) and 50% / 70% unstructured (sparse-bitmask).

    python benchmarks/export_bytes.py [--models default small] [--json PATH]

Each model is magnitude-pruned in every prunable linear (vision, connector, language) and exported both
ways, in float32 and bfloat16; the table gives `model.safetensors` bytes, and the bytes of the pruned
linears alone (from the files' headers), against the dense export. Bytes depend only on the shapes and
on how many weights are zero, so random weights serve: `default` is the default model's config at
random init (exported in our own layout, float32 as stored; bfloat16 by casting), `small` the
benchmarks/llava.py LLaVA checkpoint (HF layout). Targets (issue 22): 2:4 bf16 ≤ 0.57× and 70% bitmask
≤ 0.45× the dense bytes of the pruned linears.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402
from llava import build_checkpoint, sizes  # noqa: E402

from sparsevlm.checkpoint import export_safetensors, export_safetensors_compressed  # noqa: E402
from sparsevlm.config import Pattern  # noqa: E402
from sparsevlm.masks import apply_masks, masks_from_flat, prunable_paths  # noqa: E402
from sparsevlm.pruning.patterns import select  # noqa: E402
from sparsevlm.tree import flatten, unflatten  # noqa: E402

PATTERNS = {"2:4": ("2:4", 0.5), "bitmask 50%": ("unstructured", 0.5), "bitmask 70%": ("unstructured", 0.7)}
TARGETS = {("2:4", "bfloat16"): 0.57, ("bitmask 70%", "bfloat16"): 0.45}


def header(path: Path) -> dict[str, Any]:
    """A safetensors file's header: {name: {dtype, shape, data_offsets}}."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(length))
    entries.pop("__metadata__", None)
    return entries


def tensor_bytes(entries: dict[str, Any], names: Any) -> int:
    """Bytes of these tensors' data."""
    return sum(entries[n]["data_offsets"][1] - entries[n]["data_offsets"][0] for n in names)


def pruned(bundle: Any, pattern: str, sparsity: float) -> Any:
    """`bundle` magnitude-pruned in every prunable linear."""
    flat = flatten(bundle.params)
    masks = {p: np.asarray(select(jnp.abs(jnp.asarray(flat[p], jnp.float32)), Pattern.parse(pattern), sparsity))
             for p in prunable_paths(bundle.params)}
    masks = masks_from_flat(bundle.params, masks)
    return dataclasses.replace(bundle, params=apply_masks(bundle.params, masks), masks=masks)


def load(model: str, work: Path, dtype: str) -> Any:
    """The model to export, in `dtype`."""
    if model == "default":
        from sparsevlm.bundle import ModelBundle
        from sparsevlm.config import VLMConfig
        from sparsevlm.data import shapes
        from sparsevlm.data.tokenize import build_word_tokenizer
        from sparsevlm.models.vlm import VLM

        tokenizer = build_word_tokenizer(shapes.vocabulary())
        config = VLMConfig()
        size = config.vision.image_size
        params = VLM(config).init(jax.random.key(0), jnp.zeros((1, size, size, config.vision.num_channels)),
                                  jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool))["params"]
        cast = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
        params = unflatten({p: np.asarray(v).astype(cast) for p, v in flatten(params).items()})
        return ModelBundle(config, params, tokenizer)
    from sparsevlm.hf.load import load_hf_model

    directory = work / model
    if not directory.exists():
        build_checkpoint(directory, sizes(model))
    return load_hf_model(directory, dtype)


def export(bundle: Any, out: Path, compressed: bool) -> dict[str, Any] | None:
    """Write `bundle` dense or compressed (HF layout for an HF-loaded model); the compression report."""
    if "hf" in bundle.metadata:
        from sparsevlm.hf.load import export_hf, export_hf_compressed

        return export_hf_compressed(bundle, out) if compressed else export_hf(bundle, out) and None
    return export_safetensors_compressed(bundle, out) if compressed else export_safetensors(bundle, out) and None


def measure(model: str, work: Path) -> list[dict[str, Any]]:
    """One row per dtype and pattern: file and pruned-linear bytes, dense and compressed."""
    rows = []
    for dtype in ("float32", "bfloat16"):
        bundle = load(model, work, dtype)
        for label, (pattern, sparsity) in PATTERNS.items():
            sparse = pruned(bundle, pattern, sparsity)
            dense_dir, compressed_dir = work / f"{model}-{dtype}-dense", work / f"{model}-{dtype}-compressed"
            export(sparse, dense_dir, False)
            report = export(sparse, compressed_dir, True)
            dense_entries = header(dense_dir / "model.safetensors")
            compressed_entries = header(compressed_dir / "model.safetensors")
            weights = list(report["layers"])  # the pruned linears, by stored name
            parts = set(compressed_entries) - set(dense_entries)
            kept_dense = [w for w in weights if w in compressed_entries]  # pruned but written dense
            linears_dense = tensor_bytes(dense_entries, weights)
            linears_compressed = tensor_bytes(compressed_entries, parts) + tensor_bytes(compressed_entries, kept_dense)
            file_dense = (dense_dir / "model.safetensors").stat().st_size
            file_compressed = (compressed_dir / "model.safetensors").stat().st_size
            ratio = linears_compressed / linears_dense
            target = TARGETS.get((label, dtype))
            rows.append({"model": model, "dtype": dtype, "pattern": label, "formats": report["formats"],
                         "file_bytes_dense": file_dense, "file_bytes_compressed": file_compressed,
                         "file_ratio": file_compressed / file_dense, "pruned_linear_bytes_dense": linears_dense,
                         "pruned_linear_bytes_compressed": linears_compressed, "pruned_linear_ratio": ratio,
                         "target_ratio": target, "meets_target": None if target is None else ratio <= target})
            print(f"{model:<8} {dtype:<9} {label:<12} file {file_compressed / 2**20:8.2f} / {file_dense / 2**20:8.2f} MiB"
                  f" ({file_compressed / file_dense:.3f}x)  pruned linears {ratio:.3f}x"
                  + ("" if target is None else f"  target <= {target}: {'met' if ratio <= target else 'MISSED'}"))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["default", "small"], choices=["default", "quick", "small"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for model in args.models for row in measure(model, Path(tmp))]
    import compressed_tensors

    result = {"rows": rows, "compressed_tensors": compressed_tensors.__version__} | machine()
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
