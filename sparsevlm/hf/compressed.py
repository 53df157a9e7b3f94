"""Compressed sparse safetensors in the `compressed-tensors` layout: 2:4 and bitmask linears, read and written.

A pruned linear is written with the compressor that fits its measured zeros: `sparse-24-bitmask`
when every group of 4 consecutive inputs holds at least 2 zeros (the kept values `[out, in/2]` and
a 1-bit mask `[out, ceil(in/8)]`), `sparse-bitmask` for any other layer at least
`BITMASK_MIN_SPARSITY` sparse (the nonzeros, flat, the mask and each row's offset into them), and
dense otherwise. Weights are compressed in the layout of a torch `Linear` (`[out, in]`): an HF
checkpoint's own tensors, or a Flax `[in, out]` kernel's transpose.

The tensor names, shapes and bit order are those of `compressed-tensors` (its `BitmaskCompressor`
and `Sparse24BitMaskCompressor`, last shipped in 0.14; 0.15 and later keep only the config classes
and the bit packing used here, and vLLM 0.19.1 dropped the 2:4 kernels). The file's
`__metadata__` names every compressed weight's format, so the file alone decodes; `config.json`
carries the `sparsity_config` engines read, a claim that `sparsevlm verify` checks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from sparsevlm.hf.safetensors_io import Checkpoint

DENSE = "dense"
BITMASK = "sparse-bitmask"
SPARSE_24 = "sparse-24-bitmask"
FORMATS = (DENSE, BITMASK, SPARSE_24)
# A bitmask costs 1 bit per weight plus an offset per row: below ~6% (bf16) zeros it is larger than dense.
BITMASK_MIN_SPARSITY = 0.1
METADATA_KEY = "sparsevlm_compressed"  # the safetensors `__metadata__` entry: {dense name: format}
SPARSITY_CONFIG = "sparsity_config"
QUANTIZATION_CONFIG = "quantization_config"


def is_24(weight: np.ndarray) -> bool:
    """True if every 4 consecutive inputs (last axis of an `[out, in]` weight) hold at least 2 exact zeros."""
    if weight.ndim != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight == 0).reshape(weight.shape[0], -1, 4).sum(-1) >= 2).all())


def choose_format(weight: np.ndarray, min_sparsity: float = BITMASK_MIN_SPARSITY) -> str:
    """The compressor that fits a pruned `[out, in]` weight's zeros: 2:4, bitmask or dense."""
    if weight.ndim != 2 or weight.size == 0:
        return DENSE
    if is_24(weight):
        return SPARSE_24
    return BITMASK if float((weight == 0).mean()) >= min_sparsity else DENSE


def _pack(mask: np.ndarray) -> np.ndarray:
    import torch
    from compressed_tensors.utils import pack_bitmasks

    return pack_bitmasks(torch.from_numpy(np.ascontiguousarray(mask, bool))).numpy()


def _unpack(packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import torch
    from compressed_tensors.utils import unpack_bitmasks

    return unpack_bitmasks(torch.from_numpy(np.ascontiguousarray(packed, np.uint8)), list(shape)).numpy()


def _prefix(name: str, fmt: str) -> str:
    # compressed-tensors names a 2:4 weight's parts after its module (`x.weight` → `x.compressed`) and a
    # bitmask weight's after the weight itself (`x.weight.compressed`).
    return name.removesuffix(".weight") if fmt == SPARSE_24 else name


def _keep_24(weight: np.ndarray) -> np.ndarray:
    """Exactly 2 of every 4: the nonzeros, topped up with a group's first zeros (all of a group's nonzeros fit)."""
    nonzero = (weight != 0).reshape(weight.shape[0], -1, 4)
    missing = 2 - nonzero.sum(-1, keepdims=True)
    zeros = ~nonzero
    keep = nonzero | (zeros & (np.cumsum(zeros, axis=-1) <= missing))
    return keep.reshape(weight.shape)


def compressed_specs(name: str, weight: np.ndarray, fmt: str) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """The tensors (dtype, shape) `compress(name, weight, fmt)` writes, without building them."""
    if fmt == DENSE:
        return {name: (weight.dtype, tuple(weight.shape))}
    rows, cols = weight.shape
    prefix = _prefix(name, fmt)
    packed = (rows, -(-cols // 8))
    if fmt == SPARSE_24:
        return {f"{prefix}.shape": (np.dtype(np.int64), (2, 1)), f"{prefix}.compressed": (weight.dtype, (rows, cols // 2)),
                f"{prefix}.bitmask": (np.dtype(np.uint8), packed)}
    return {f"{prefix}.shape": (np.dtype(np.int64), (2,)),
            f"{prefix}.compressed": (weight.dtype, (int(np.count_nonzero(weight)),)),
            f"{prefix}.bitmask": (np.dtype(np.uint8), packed), f"{prefix}.row_offsets": (np.dtype(np.int64), (rows,))}


def compress(name: str, weight: np.ndarray, fmt: str) -> dict[str, np.ndarray]:
    """An `[out, in]` weight as the tensors of format `fmt`, named as compressed-tensors names them."""
    if fmt == DENSE:
        return {name: weight}
    if fmt not in FORMATS:
        raise ValueError(f"compression format {fmt!r} is not one of {', '.join(FORMATS)}")
    if weight.ndim != 2:
        raise ValueError(f"{name}: only 2-D weights are compressed, got shape {tuple(weight.shape)}")
    prefix = _prefix(name, fmt)
    rows, cols = weight.shape
    if fmt == SPARSE_24:
        if not is_24(weight):
            raise ValueError(f"{name} is not 2:4 sparse along its inputs; write it as {BITMASK}")
        keep = _keep_24(weight)
        return {f"{prefix}.shape": np.array([[rows], [cols]], np.int64),
                f"{prefix}.compressed": weight[keep].reshape(rows, cols // 2), f"{prefix}.bitmask": _pack(keep)}
    keep = weight != 0
    counts = keep.sum(-1)
    return {f"{prefix}.shape": np.array([rows, cols], np.int64), f"{prefix}.compressed": weight[keep],
            f"{prefix}.bitmask": _pack(keep), f"{prefix}.row_offsets": (np.cumsum(counts) - counts).astype(np.int64)}


def decompress(name: str, fmt: str, read: Any) -> np.ndarray:
    """The dense `[out, in]` weight `name` from its compressed tensors (`read(tensor name)` gives each)."""
    prefix = _prefix(name, fmt)
    shape = tuple(int(d) for d in np.asarray(read(f"{prefix}.shape")).reshape(-1))
    values, packed = read(f"{prefix}.compressed"), read(f"{prefix}.bitmask")
    if len(shape) != 2 or packed.shape != (shape[0], -(-shape[1] // 8)):
        raise ValueError(f"{prefix}.bitmask has shape {tuple(packed.shape)}, but {prefix}.shape says {shape}")
    keep = _unpack(packed, shape)
    if int(keep.sum()) != values.size:
        raise ValueError(f"{prefix}.bitmask marks {int(keep.sum())} weights, but {prefix}.compressed holds {values.size}")
    if fmt == BITMASK:
        counts = keep.sum(-1)
        if not np.array_equal(read(f"{prefix}.row_offsets"), np.cumsum(counts) - counts):
            raise ValueError(f"{prefix}.row_offsets disagrees with {prefix}.bitmask")
    out = np.zeros(shape, values.dtype)
    out[keep] = values.reshape(-1)
    return out


def sparsity_config(formats: Mapping[str, str], zeros: int, total: int) -> dict[str, Any]:
    """The `sparsity_config` of a model whose pruned weights have these formats (the library's config classes).

    Its `format` is the one most compressed weights use (2:4 on a tie); `targets` are their modules,
    `ignore` the pruned modules written otherwise (dense, or the other format: the file's metadata
    names it), and `global_sparsity` the zeros over every pruned weight.
    """
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

    counts = {fmt: sum(f == fmt for f in formats.values()) for fmt in (SPARSE_24, BITMASK)}
    main = SPARSE_24 if counts[SPARSE_24] >= counts[BITMASK] else BITMASK
    module = {name: name.removesuffix(".weight") for name in formats}
    config = (Sparse24BitMaskConfig if main == SPARSE_24 else BitmaskConfig)(
        targets=sorted(module[n] for n, f in formats.items() if f == main),
        ignore=sorted(module[n] for n, f in formats.items() if f != main),
        global_sparsity=zeros / total if total else 0.0,
        sparsity_structure="2:4" if main == SPARSE_24 else "unstructured",
    )
    return config.model_dump()


def quantization_config(sparsity: Mapping[str, Any]) -> dict[str, Any]:
    """The `quantization_config` entry of `config.json` that carries a `sparsity_config` (as compressed-tensors wrote it)."""
    import compressed_tensors
    from compressed_tensors.base import COMPRESSION_VERSION_NAME, QUANTIZATION_METHOD, QUANTIZATION_METHOD_NAME

    return {COMPRESSION_VERSION_NAME: compressed_tensors.__version__, QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD,
            SPARSITY_CONFIG: dict(sparsity)}


class CompressedWriter:
    """Plans and streams the compressed tensors of a model: which format each pruned weight takes, and the bytes."""

    def __init__(self, pruned: Iterable[str], min_sparsity: float = BITMASK_MIN_SPARSITY) -> None:
        self.pruned = set(pruned)
        self.min_sparsity = min_sparsity
        self.formats: dict[str, str] = {}  # every pruned weight's format, dense ones included
        self.zeros = self.total = 0
        self.not_24: list[str] = []  # pruned weights that are sparse but not 2:4 (written as bitmasks)

    def plan(self, tensors: Iterable[tuple[str, np.ndarray]]) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Choose each weight's format and return the specs of every tensor to write, in order."""
        specs: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        for name, value in tensors:
            fmt = DENSE
            if name in self.pruned:
                fmt = choose_format(value, self.min_sparsity)
                self.formats[name] = fmt
                self.zeros += int(value.size - np.count_nonzero(value))
                self.total += int(value.size)
                if fmt == BITMASK:
                    self.not_24.append(name)
            specs.update(compressed_specs(name, value, fmt))
        return specs

    def tensors(self, tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
        """Every tensor as written: each planned pruned weight in its format, the rest unchanged."""
        for name, value in tensors:
            yield from compress(name, value, self.formats.get(name, DENSE)).items()

    def metadata(self) -> dict[str, str]:
        """The safetensors `__metadata__` entry naming each compressed weight's format."""
        return {METADATA_KEY: json.dumps({n: f for n, f in self.formats.items() if f != DENSE}, sort_keys=True)}

    def sparsity_config(self) -> dict[str, Any]:
        """This model's `sparsity_config`."""
        return sparsity_config(self.formats, self.zeros, self.total)

    def report(self) -> dict[str, Any]:
        """Per-format counts, the pruned weights that fell back to a bitmask, and the sparsity config."""
        return {"formats": {f: sum(v == f for v in self.formats.values()) for f in FORMATS},
                "not_2_4": list(self.not_24), "layers": dict(self.formats), "sparsity_config": self.sparsity_config()}


def is_compressed_file(metadata: Mapping[str, str]) -> bool:
    """True for a safetensors file whose `__metadata__` comes from `CompressedWriter`."""
    return METADATA_KEY in metadata


class CompressedCheckpoint:
    """A compressed checkpoint directory read as its dense tensors (the same interface as `Checkpoint`)."""

    def __init__(self, directory: str | os.PathLike, checkpoint: Checkpoint | None = None) -> None:
        self.checkpoint = checkpoint or Checkpoint(directory)
        self.directory = Path(directory)
        self.formats: dict[str, str] = {}
        stored = self.checkpoint.keys()
        for file, metadata in self.checkpoint.file_metadata().items():
            raw = metadata.get(METADATA_KEY)
            if raw is None:
                continue
            try:
                formats = json.loads(raw)
                if not isinstance(formats, dict) or not all(f in (BITMASK, SPARSE_24) for f in formats.values()):
                    raise ValueError("not a map of weight names to sparse-bitmask or sparse-24-bitmask")
            except ValueError as err:
                raise ValueError(f"{self.directory / file} has a corrupted {METADATA_KEY} metadata entry: {err}") from None
            self.formats.update(formats)
        parts = {part: name for name, fmt in self.formats.items() for part in compressed_parts(name, fmt)}
        absent = sorted(set(parts) - set(stored))
        if absent:
            raise ValueError(f"{self.directory}: tensor {absent[0]!r} of compressed weight {parts[absent[0]]!r} is "
                             "missing from the checkpoint")
        self._keys = [n for n in stored if n not in parts] + list(self.formats)

    def keys(self) -> list[str]:
        """Dense tensor names."""
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self.formats or (name in self.checkpoint and name in self._keys)

    def where(self, name: str) -> str:
        """The file holding a tensor (for a compressed one, its values)."""
        fmt = self.formats.get(name)
        return self.checkpoint.where(name if fmt is None else f"{_prefix(name, fmt)}.compressed")

    def format(self, name: str) -> str:
        """How a tensor is stored."""
        return self.formats.get(name, DENSE)

    def kept(self, name: str) -> np.ndarray:
        """A compressed weight's stored positions (its `bitmask`, unpacked): the mask it was pruned with, 2:4 kept exactly."""
        fmt = self.formats[name]
        prefix = _prefix(name, fmt)
        shape = tuple(int(d) for d in np.asarray(self.checkpoint.read(f"{prefix}.shape")).reshape(-1))
        return _unpack(self.checkpoint.read(f"{prefix}.bitmask"), shape)

    def read(self, name: str, order: str = "C") -> np.ndarray:
        """One dense tensor, decompressed if stored compressed; a damaged one is an error naming its file."""
        fmt = self.formats.get(name)
        if fmt is None:
            return self.checkpoint.read(name, order)
        try:
            dense = decompress(name, fmt, self.checkpoint.read)
        except ValueError as err:
            raise ValueError(f"{self.where(name)}: compressed weight {name!r} is corrupted: {err}") from None
        return np.asfortranarray(dense) if order == "F" else dense


def declared_sparsity(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The `sparsity_config` a checkpoint's `config.json` declares, or None; malformed is an error naming the file."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable: {err}") from None
    declared = (config.get(QUANTIZATION_CONFIG) or {}).get(SPARSITY_CONFIG) if isinstance(config, dict) else None
    if not declared:
        return None
    from compressed_tensors.config import SparsityCompressionConfig

    try:  # the library's own validation: the format must be a registered one, the fields typed
        SparsityCompressionConfig.load_from_registry(declared["format"], **declared)
    except Exception as err:  # KeyError, pydantic's ValidationError, the registry's ValueError
        raise ValueError(f"{path}: {SPARSITY_CONFIG} is not a valid compressed-tensors sparsity config: "
                         f"{' '.join(str(err).split())[:200]}") from None
    return declared


def check_declared(directory: str | os.PathLike, tolerance: float = 1e-4) -> list[dict[str, Any]]:
    """Each claim of a checkpoint's declared `sparsity_config`, checked against its stored and decompressed weights.

    The claims: every target is stored in the declared format, with `sparsity_structure` 2:4 every
    target's weight is 2:4 along its inputs, and `global_sparsity` is the zeros over targets and
    ignored modules (within `tolerance`).
    """
    declared = declared_sparsity(directory)
    if declared is None:
        return []
    checkpoint = open_checkpoint(directory)
    formats = getattr(checkpoint, "formats", {})
    targets, ignore = list(declared.get("targets") or []), list(declared.get("ignore") or [])
    claims = []

    def claim(what: str, problems: list[str]) -> None:
        claims.append({"claim": what, "ok": not problems, "problems": problems})

    absent = [m for m in targets + ignore if f"{m}.weight" not in checkpoint]
    claim(f"{len(targets) + len(ignore)} modules named in {SPARSITY_CONFIG} exist",
          [f"{len(absent)} named modules have no weight (first: {absent[0]})"] if absent else [])
    present = [m for m in targets if f"{m}.weight" in checkpoint]
    wrong = [m for m in present if formats.get(f"{m}.weight", DENSE) != declared["format"]]
    claim(f"{len(targets)} targets are stored {declared['format']}",
          [f"{len(wrong)} are not (first: {wrong[0]}, stored {formats.get(f'{wrong[0]}.weight', DENSE)})"] if wrong else [])
    zeros = total = 0
    broken = []
    for module in present + [m for m in ignore if f"{m}.weight" in checkpoint]:
        weight = checkpoint.read(f"{module}.weight")
        zeros, total = zeros + int(weight.size - np.count_nonzero(weight)), total + int(weight.size)
        if module in targets and declared.get("sparsity_structure") == "2:4" and not is_24(weight):
            broken.append(module)
    if declared.get("sparsity_structure") == "2:4":
        claim(f"{len(present)} targets are 2:4",
              [f"{len(broken)} targets break 2:4 (first: {broken[0]})"] if broken else [])
    measured, claimed = (zeros / total if total else 0.0), float(declared.get("global_sparsity") or 0.0)
    claim(f"global sparsity {claimed:.4f}",
          [f"measured {measured:.4f}"] if abs(measured - claimed) > tolerance else [])
    return claims


def compressed_parts(name: str, fmt: str) -> list[str]:
    """The stored tensor names of a weight compressed in format `fmt`."""
    return list(compressed_specs(name, np.zeros((1, 1)), fmt))


def open_checkpoint(directory: str | os.PathLike) -> Checkpoint | CompressedCheckpoint:
    """A directory's weights: a `CompressedCheckpoint` when its files were written compressed, else a `Checkpoint`."""
    checkpoint = Checkpoint(directory)
    if any(is_compressed_file(metadata) for metadata in checkpoint.file_metadata().values()):
        return CompressedCheckpoint(directory, checkpoint)
    return checkpoint


__all__ = ["BITMASK", "DENSE", "FORMATS", "SPARSE_24", "CompressedCheckpoint", "CompressedWriter", "check_declared",
           "choose_format", "declared_sparsity",
           "compress", "decompress", "is_24", "open_checkpoint", "quantization_config", "sparsity_config"]
