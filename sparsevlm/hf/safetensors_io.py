"""Safetensors checkpoints read and written one tensor at a time (single file or sharded with an index).

The format is a little-endian u64 header length, a JSON header `{name: {dtype, shape,
data_offsets}}` and raw bytes. Reading it directly (rather than through `safetensors.numpy`)
gives bfloat16 support via `ml_dtypes`, memory-mapped reads of one tensor at a time, and errors
that name the file and tensor when a checkpoint is truncated or malformed (the `safetensors`
library raises its own `SafetensorError`, not a ValueError, naming no file). Only safetensors are
read: PyTorch `.bin`/`.pt` weights are refused, since loading them can run arbitrary code. Writing streams each
tensor to disk as it is produced, so an export never holds the whole HF-layout model.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from sparsevlm.integrity import contained

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK_BYTES = 8 * 1024 * 1024  # scratch for column-major reads


class SafetensorsFile:
    """One `.safetensors` file: its header, and tensors read on demand (memory-mapped)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint file {self.path} does not exist")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{self.path} is not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER:
                raise ValueError(f"{self.path} is not a valid safetensors file (header length {header_len})")
            if header_len > size - 8:
                raise ValueError(
                    f"{self.path} is truncated: its header needs {header_len} bytes but only {size - 8} follow"
                )
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{self.path} has a corrupted safetensors header: {err}") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path} has a corrupted safetensors header: the header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise ValueError(f"{self.path} has a corrupted safetensors header: __metadata__ is not a map of strings")
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
                if any(d < 0 for d in shape):
                    raise ValueError("negative dimension")
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{self.path}: tensor {name!r} has an unsupported or malformed header entry {entry!r}") from None
            nbytes = dtype.itemsize * math.prod(shape)  # exact: a huge forged shape must not wrap around
            if not 0 <= begin <= end or end - begin != nbytes:
                raise ValueError(
                    f"{self.path}: tensor {name!r} has data_offsets [{begin}, {end}], but {dtype} of shape {shape} "
                    f"takes {nbytes} bytes"
                )
            if self._data_start + end > size:
                raise ValueError(
                    f"{self.path} is truncated: tensor {name!r} ends at byte {self._data_start + end} "
                    f"but the file has {size}"
                )
            self._entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, without reading it."""
        return self._entry(name)[1]

    def _entry(self, name: str) -> tuple[np.dtype, tuple[int, ...], int, int]:
        if name not in self._entries:
            raise KeyError(f"tensor {name!r} is not in {self.path}")
        return self._entries[name]

    def read(self, name: str, order: str = "C") -> np.ndarray:
        """One tensor as a fresh numpy array; `order="F"` lays it out column-major (its `.T` is then C-contiguous)."""
        if order not in ("C", "F"):
            raise ValueError(f"order={order!r} is not supported; allowed: C, F")
        dtype, shape, begin, end = self._entry(name)
        out = np.empty(shape, dtype, order=order)
        if end == begin:
            return out
        # Read just this tensor's bytes straight into the result (no mapping of the whole file).
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            if order == "C" or out.ndim < 2:
                self._fill(f, out, name)
                return out
            # The file is row-major: read a few rows at a time into a small buffer and scatter them, so a
            # column-major read (a transposed load) never holds the tensor twice.
            rows = max(1, _CHUNK_BYTES // (out[0].size * dtype.itemsize))
            buffer = np.empty((min(rows, shape[0]), *shape[1:]), dtype)
            for start in range(0, shape[0], rows):
                block = buffer[: min(rows, shape[0] - start)]
                self._fill(f, block, name)
                out[start : start + len(block)] = block
        return out

    def _fill(self, f: BinaryIO, array: np.ndarray, name: str) -> None:
        # `array` is C-contiguous (so the reshape is a view): its bytes in memory order are the file's.
        if f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != array.nbytes:
            raise ValueError(f"{self.path} is truncated inside tensor {name!r}")


class Checkpoint:
    """A directory's safetensors weights: `model.safetensors`, or shards listed by `model.safetensors.index.json`."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        self._files: dict[str, SafetensorsFile] = {}
        if index.is_file():
            try:
                weight_map: Mapping[str, str] = json.loads(index.read_text())["weight_map"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{index} is not a valid safetensors index: {err}") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index} is not a valid safetensors index: weight_map must map tensor names to files")
            for name in sorted(set(weight_map.values())):
                try:
                    # The name alone is judged: hub-cache snapshots link every file into a blob store outside.
                    contained(self.directory, name, follow_symlinks=False)
                except ValueError as err:
                    raise ValueError(f"{index} names shard {name!r} outside the checkpoint directory: {err}") from None
                if not (self.directory / name).is_file():
                    raise FileNotFoundError(f"shard {name} listed in {index} is missing from {self.directory}")
            self._location = dict(weight_map)
        elif (self.directory / SINGLE_NAME).is_file():
            self._location = {name: SINGLE_NAME for name in self._file(SINGLE_NAME).keys()}
        else:
            torch_files = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                p.name for p in self.directory.glob("*.pt*")
            )
            if torch_files:
                raise ValueError(
                    f"{self.directory} holds only PyTorch .bin/.pt weights ({', '.join(torch_files[:3])}); they are "
                    "refused because loading them can run arbitrary code. Convert them to safetensors first "
                    "(e.g. with transformers: model.save_pretrained(dir, safe_serialization=True) on a trusted machine)."
                )
            raise FileNotFoundError(f"{self.directory} has no {SINGLE_NAME} or {INDEX_NAME}")

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._files:
            self._files[name] = SafetensorsFile(self.directory / name)
        return self._files[name]

    def keys(self) -> list[str]:
        """All tensor names."""
        return list(self._location)

    def __contains__(self, name: str) -> bool:
        return name in self._location

    def where(self, name: str) -> str:
        """The file holding a tensor."""
        return str(self.directory / self._location.get(name, "?"))

    def read(self, name: str, order: str = "C") -> np.ndarray:
        """One tensor (`order` as in `SafetensorsFile.read`); a clear error if its shard lacks it."""
        if name not in self._location:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.directory}")
        shard = self._file(self._location[name])
        if name not in shard.keys():
            raise ValueError(f"{shard.path} does not contain tensor {name!r}, though {INDEX_NAME} says it does")
        return shard.read(name, order)

    def file_metadata(self) -> dict[str, dict[str, str]]:
        """Each file's safetensors `__metadata__`, by file name."""
        return {name: self._file(name).metadata for name in sorted(set(self._location.values()))}

    def nbytes(self) -> int:
        """Total bytes of tensor data (from the headers)."""
        total = 0
        for name, file in self._location.items():
            dtype, shape, _, _ = self._file(file)._entry(name)
            total += dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        return total


def write_file(
    path: str | os.PathLike,
    specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, np.ndarray]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file whose header is known up front (`specs`), streaming `tensors` in that order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (dtype, shape) in specs.items():
        if np.dtype(dtype) not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {np.dtype(dtype)} cannot be written to safetensors")
        nbytes = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section, as the reference writer does
    order = list(specs)
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            written = 0
            for name, array in tensors:
                if written >= len(order) or name != order[written]:
                    raise ValueError(f"tensor {name!r} arrives out of the declared order")
                dtype, shape = specs[name]
                if array.dtype != np.dtype(dtype) or tuple(array.shape) != tuple(shape):
                    raise ValueError(f"tensor {name!r} is {array.dtype}{tuple(array.shape)}, "
                                     f"declared {np.dtype(dtype)}{tuple(shape)}")
                f.write(np.ascontiguousarray(array).tobytes())
                written += 1
            if written != len(order):
                raise ValueError(f"only {written} of {len(order)} declared tensors were written")
    except BaseException:
        # A half-written file would look like a truncated checkpoint later; leave nothing behind.
        Path(path).unlink(missing_ok=True)
        raise


def iter_file(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of one file, in file order."""
    file = SafetensorsFile(path)
    for name in file.keys():
        yield name, file.read(name)
