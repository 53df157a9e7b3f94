"""Our safetensors reader/writer against the reference `safetensors` library, and its errors on damaged checkpoints."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sparsevlm.hf import safetensors_io
from sparsevlm.hf.safetensors_io import INDEX_NAME, Checkpoint, SafetensorsFile, iter_file, write_file

# Every dtype a VLM checkpoint holds in practice, with awkward shapes: a scalar and an empty tensor.
TORCH_TENSORS = {
    "f32": lambda g: torch.randn(3, 5, generator=g),
    "f16": lambda g: torch.randn(4, 2, generator=g).to(torch.float16),
    "bf16": lambda g: torch.randn(7, generator=g).to(torch.bfloat16),
    "i64": lambda g: torch.randint(-(2**40), 2**40, (2, 3), generator=g),
    "bool": lambda g: torch.rand(6, generator=g) > 0.5,
    "scalar": lambda g: torch.tensor(2.5),
    "empty": lambda g: torch.zeros(0, 4),
}


def _torch_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: make(generator) for name, make in TORCH_TENSORS.items()}


def _bits(tensor: torch.Tensor) -> np.ndarray:
    """A torch tensor's raw bytes as numpy (numpy has no bfloat16, so compare bit patterns)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def _our_bits(array: np.ndarray) -> np.ndarray:
    return array.view(np.int16) if array.dtype == ml_dtypes.bfloat16 else array


def _escaped(path: Path) -> str:
    return re.escape(str(path))


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return length, json.loads(raw[8 : 8 + length])


@pytest.fixture()
def reference_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A file written by `safetensors.torch.save_file`, and the tensors in it."""
    tensors = _torch_tensors()
    path = tmp_path / "reference.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path, tensors


def test_reads_what_safetensors_torch_writes(reference_file):
    path, tensors = reference_file
    file = SafetensorsFile(path)
    assert sorted(file.keys()) == sorted(tensors) and file.metadata == {"format": "pt"}
    want_dtypes = {"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16, "i64": np.int64,
                   "bool": np.bool_, "scalar": np.float32, "empty": np.float32}
    for name, tensor in tensors.items():
        got = file.read(name)
        assert got.dtype == np.dtype(want_dtypes[name]) and got.shape == tuple(tensor.shape) == file.shape(name)
        np.testing.assert_array_equal(_our_bits(got), _bits(tensor))
    assert dict(iter_file(path)).keys() == set(tensors)


def test_written_files_load_bit_exactly_in_safetensors_torch(tmp_path):
    arrays = {name: _bits(t) for name, t in _torch_tensors().items()}
    arrays["bf16"] = arrays["bf16"].view(ml_dtypes.bfloat16)
    arrays["transposed"] = np.arange(12, dtype=np.float32).reshape(3, 4).T  # not C-contiguous: written in C order
    path = tmp_path / "ours.safetensors"
    metadata = {"format": "pt", "note": "written by sparsevlm"}
    write_file(path, {n: (a.dtype, a.shape) for n, a in arrays.items()}, arrays.items(), metadata=metadata)
    loaded = load_file(path)
    assert loaded.keys() == arrays.keys()
    assert loaded["bf16"].dtype == torch.bfloat16 and loaded["bool"].dtype == torch.bool
    for name, array in arrays.items():
        assert tuple(loaded[name].shape) == array.shape
        np.testing.assert_array_equal(_bits(loaded[name]), _our_bits(array))
    with safe_open(path, "pt") as reference:
        assert reference.metadata() == metadata
    length, _ = _header(path)
    assert length % 8 == 0  # the data section is 8-byte aligned, as the reference writer leaves it


def test_write_file_refuses_tensors_that_break_the_declared_header(tmp_path):
    a, b = np.zeros((2, 3), np.float32), np.ones(4, np.int64)
    specs = {"a": (a.dtype, a.shape), "b": (b.dtype, b.shape)}
    path = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match="'b' arrives out of the declared order"):
        write_file(path, specs, [("b", b), ("a", a)])
    with pytest.raises(ValueError, match=r"'a' is float32\(3, 2\), declared float32\(2, 3\)"):
        write_file(path, specs, [("a", a.T), ("b", b)])
    with pytest.raises(ValueError, match="'b' is int32"):
        write_file(path, specs, [("a", a), ("b", b.astype(np.int32))])
    with pytest.raises(ValueError, match="only 1 of 2 declared tensors were written"):
        write_file(path, specs, [("a", a)])
    with pytest.raises(ValueError, match="'c' arrives"):
        write_file(path, specs, [("a", a), ("b", b), ("c", b)])
    with pytest.raises(ValueError, match="dtype complex64 cannot be written"):
        write_file(path, {"c": (np.complex64, (2,))}, [])
    assert not path.exists()  # a refused write leaves no half-written file behind


@pytest.mark.parametrize("chunk_bytes", [8 * 2**20, 24])  # one block; many blocks with a short last one
def test_column_major_reads_equal_row_major_reads(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(safetensors_io, "_CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(0)
    arrays = {"kernel": rng.normal(size=(7, 5)).astype(np.float32),
              "conv": rng.normal(size=(5, 3, 2, 2)).astype(ml_dtypes.bfloat16),
              "bias": rng.normal(size=(5,)).astype(np.float16), "empty": np.zeros((0, 3), np.float32)}
    path = tmp_path / "layouts.safetensors"
    write_file(path, {n: (a.dtype, a.shape) for n, a in arrays.items()}, arrays.items())
    file = SafetensorsFile(path)
    for name, array in arrays.items():
        got = file.read(name, order="F")
        assert got.flags.f_contiguous and got.T.flags.c_contiguous and got.dtype == array.dtype
        np.testing.assert_array_equal(_our_bits(got), _our_bits(array))
    with pytest.raises(ValueError, match="order='K' is not supported; allowed: C, F"):
        file.read("kernel", order="K")


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved by transformers in several shards with `model.safetensors.index.json`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    directory = tmp_path_factory.mktemp("sharded")
    LlamaForCausalLM(config).save_pretrained(directory, max_shard_size="20KB")
    return directory


def test_sharded_checkpoint_reads_every_tensor_like_safe_open(sharded_dir):
    weight_map = json.loads((sharded_dir / INDEX_NAME).read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 3, shards
    checkpoint = Checkpoint(sharded_dir)
    assert sorted(checkpoint.keys()) == sorted(weight_map)
    total = 0
    for shard in shards:
        with safe_open(sharded_dir / shard, "np") as reference:
            for name in reference.keys():
                want = reference.get_tensor(name)
                got = checkpoint.read(name)
                assert got.dtype == want.dtype
                np.testing.assert_array_equal(got, want)
                assert checkpoint.where(name) == str(sharded_dir / shard)
                total += want.nbytes
    assert checkpoint.nbytes() == total


# --- damaged files: every error names the file, and the tensor where there is one ---


def test_file_truncated_in_the_data_section_names_the_tensor(reference_file):
    path, _ = reference_file
    length, header = _header(path)
    header.pop("__metadata__")
    # Cut one byte into the tensor stored last, so exactly that tensor is incomplete.
    last = max((entry["data_offsets"][1], name) for name, entry in header.items() if entry["shape"] != [0, 4])[1]
    cut = 8 + length + header[last]["data_offsets"][0] + 1
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ValueError, match=rf"{_escaped(path)} is truncated: tensor '{last}' ends at byte \d+ "
                                         rf"but the file has {cut}"):
        SafetensorsFile(path)


def test_file_truncated_in_the_header_is_reported_as_truncated(reference_file):
    path, _ = reference_file
    length, _ = _header(path)
    path.write_bytes(path.read_bytes()[: 8 + length // 2])
    with pytest.raises(ValueError, match=rf"{_escaped(path)} is truncated: its header needs {length} bytes"):
        SafetensorsFile(path)
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match=rf"{_escaped(path)} is not a safetensors file \(only 3 bytes\)"):
        SafetensorsFile(path)


def test_flipped_header_bytes_are_a_corrupted_header(reference_file):
    path, _ = reference_file
    raw = bytearray(path.read_bytes())
    start = raw.index(b'"data_offsets"')
    raw[start : start + 3] = bytes(b ^ 0xFF for b in raw[start : start + 3])
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"{_escaped(path)} has a corrupted safetensors header"):
        SafetensorsFile(path)


def _write_header(path: Path, header: object) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(64))


@pytest.mark.parametrize(
    "header,message",
    [
        ([1, 2], "header is not a JSON object"),
        ({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, "tensor 'w' has an unsupported"),
        ({"w": {"dtype": "F32", "shape": [2]}}, "tensor 'w' has an unsupported or malformed header entry"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
         r"tensor 'w' has data_offsets \[0, 8\], but float32 of shape \(3,\) takes 12 bytes"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-4, 4]}}, r"tensor 'w' has data_offsets \[-4, 4\]"),
        ({"w": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}}, "tensor 'w' has an unsupported"),
        # A forged shape whose size wraps around in int64 (2**66 bytes) must not pass as 0 bytes.
        ({"w": {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 0]}},
         r"tensor 'w' has data_offsets \[0, 0\], but float32 of shape \(4611686018427387904, 4\) takes "
         r"73786976294838206464 bytes"),
        ({"__metadata__": ["format", "pt"]}, "corrupted safetensors header: __metadata__ is not a map of strings"),
    ],
)
def test_malformed_headers_name_the_file_and_tensor(tmp_path, header, message):
    path = tmp_path / "odd.safetensors"
    _write_header(path, header)
    with pytest.raises(ValueError, match=f"{_escaped(path)}.*{message}"):
        SafetensorsFile(path)


def test_index_naming_a_missing_shard(sharded_dir, tmp_path):
    directory = Path(shutil.copytree(sharded_dir, tmp_path / "ckpt"))
    shard = sorted(json.loads((directory / INDEX_NAME).read_text())["weight_map"].values())[-1]
    (directory / shard).unlink()
    index = _escaped(directory / INDEX_NAME)
    with pytest.raises(FileNotFoundError, match=rf"shard {shard} listed in {index} is missing"):
        Checkpoint(directory)


def test_index_whose_shard_lacks_a_tensor(sharded_dir, tmp_path):
    directory = Path(shutil.copytree(sharded_dir, tmp_path / "ckpt"))
    index = json.loads((directory / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[1]  # the index now points at a shard that does not hold it
    (directory / INDEX_NAME).write_text(json.dumps(index))
    checkpoint = Checkpoint(directory)
    with pytest.raises(ValueError, match=rf"{_escaped(directory / shards[1])} does not contain tensor '{name}', "
                                         rf"though {INDEX_NAME}"):
        checkpoint.read(name)
    with pytest.raises(KeyError, match="'nope' is not in the checkpoint"):
        checkpoint.read("nope")


def test_invalid_index_names_the_index(sharded_dir, tmp_path):
    directory = Path(shutil.copytree(sharded_dir, tmp_path / "ckpt"))
    for index in ('{"metadata": {}}', '{"weight_map": ["model-00001.safetensors"]}', '{"weight_map": {"w": 3}}'):
        (directory / INDEX_NAME).write_text(index)
        with pytest.raises(ValueError, match=rf"{_escaped(directory / INDEX_NAME)} is not a valid safetensors index"):
            Checkpoint(directory)


@pytest.mark.parametrize(
    "shard,reason",
    [("../elsewhere.safetensors", "leads outside"), ("sub/../../x.safetensors", "leads outside"),
     ("/etc/passwd", "is absolute")],
)
def test_index_naming_a_shard_outside_the_directory_is_refused(sharded_dir, tmp_path, shard, reason):
    directory = Path(shutil.copytree(sharded_dir, tmp_path / "ckpt"))
    (directory / INDEX_NAME).write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(ValueError, match=rf"{_escaped(directory / INDEX_NAME)} names shard '{re.escape(shard)}' "
                                         rf"outside the checkpoint directory: path .* {reason}"):
        Checkpoint(directory)


def test_hub_cache_layout_with_linked_shards_reads(sharded_dir, tmp_path):
    # huggingface_hub's cache: snapshots/<rev>/<file> are symlinks into ../../blobs/<hash>, outside the snapshot.
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for path in sharded_dir.iterdir():
        shutil.copy(path, blobs / f"blob-{path.name}")
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", f"blob-{path.name}"))
    linked, plain = Checkpoint(snapshot), Checkpoint(sharded_dir)
    assert sorted(linked.keys()) == sorted(plain.keys())
    for name in plain.keys():
        np.testing.assert_array_equal(linked.read(name), plain.read(name))


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_damaged_file_is_one_clear_line_where_the_reference_library_also_fails(reference_file, damage):
    path, _ = reference_file
    raw = bytearray(path.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) - 3]
    else:
        raw[12:15] = b"\xff\xfe\xfd"  # inside the JSON header: no longer UTF-8
    path.write_bytes(bytes(raw))
    with pytest.raises(Exception):  # the reference reader agrees the file is damaged
        with safe_open(path, "np") as reference:
            [reference.get_tensor(name) for name in reference.keys()]
    with pytest.raises(ValueError) as info:
        SafetensorsFile(path)
    message = str(info.value)
    expected = "is truncated: tensor" if damage == "truncated" else "has a corrupted safetensors header"
    assert message.startswith(f"{path} {expected}") and "\n" not in message, message


def test_pytorch_only_directory_is_refused_with_the_reason(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin") as info:
        Checkpoint(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "refused" in message and "arbitrary code" in message


def test_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{_escaped(tmp_path)} has no model.safetensors or {INDEX_NAME}"):
        Checkpoint(tmp_path)
