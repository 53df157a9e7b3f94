"""Compressed sparse export: the compressed-tensors layout by hand, bit-exact round trips for all five families,
transformers' logits from the decompressed weights, verify's check of the declared sparsity_config, bad inputs."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from sparsevlm.checkpoint import export_safetensors_compressed, import_safetensors, save_model
from sparsevlm.cli import main
from sparsevlm.config import Pattern
from sparsevlm.hf.compressed import (
    BITMASK, DENSE, SPARSE_24, CompressedCheckpoint, check_declared, choose_format, compress, decompress,
)
from sparsevlm.hf.load import export_hf, export_hf_compressed, load_hf_model
from sparsevlm.masks import apply_masks, flat_masks, masks_from_flat, prunable_paths
from sparsevlm.pruning.patterns import select
from sparsevlm.tree import flatten
from tests.hf.test_families import FAMILIES, _inputs, _mask, _ours, _theirs

# A 2×8 `[out, in]` weight, 2:4 along its inputs (row 1's second group has 3 zeros), worked by hand.
W24 = np.array([[1.0, 0.0, 0.0, 2.0, 0.0, 3.0, 4.0, 0.0],
                [0.0, 0.0, 5.0, 6.0, 0.0, 0.0, 0.0, 7.0]], np.float32)


def test_sparse_24_layout_worked_by_hand():
    parts = compress("m.weight", W24, SPARSE_24)
    assert sorted(parts) == ["m.bitmask", "m.compressed", "m.shape"]  # named after the module, as the library does
    np.testing.assert_array_equal(parts["m.shape"], [[2], [8]])
    # Row 1's second group keeps its nonzero and its first zero: exactly 2 of every 4 are stored.
    np.testing.assert_array_equal(parts["m.compressed"], [[1, 2, 3, 4], [5, 6, 0, 7]])
    # Kept positions, little-endian bits: row 0 keeps 0,3,5,6 → 0b01101001; row 1 keeps 2,3,4,7 → 0b10011100.
    np.testing.assert_array_equal(parts["m.bitmask"], [[0b01101001], [0b10011100]])
    assert np.array_equal(decompress("m.weight", SPARSE_24, parts.__getitem__), W24)


def test_bitmask_layout_worked_by_hand():
    weight = np.array([[0.0, 1.5, 0.0], [2.5, 0.0, -3.5]], np.float32)
    parts = compress("m.weight", weight, BITMASK)
    assert sorted(parts) == ["m.weight.bitmask", "m.weight.compressed", "m.weight.row_offsets", "m.weight.shape"]
    np.testing.assert_array_equal(parts["m.weight.compressed"], [1.5, 2.5, -3.5])
    np.testing.assert_array_equal(parts["m.weight.bitmask"], [[0b010], [0b101]])
    np.testing.assert_array_equal(parts["m.weight.row_offsets"], [0, 1])
    np.testing.assert_array_equal(parts["m.weight.shape"], [2, 3])
    assert np.array_equal(decompress("m.weight", BITMASK, parts.__getitem__), weight)


def test_format_follows_the_measured_zeros():
    assert choose_format(W24) == SPARSE_24
    broken = W24.copy()
    broken[0, 1] = 9.0  # the first group now has one zero: not 2:4, still 7/16 sparse
    assert choose_format(broken) == BITMASK
    assert choose_format(np.ones((4, 8), np.float32)) == DENSE
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        compress("m.weight", broken, SPARSE_24)


def _pruned(bundle, unstructured_first: bool = True):
    """Magnitude-pruned copy: 2:4 everywhere, except the first prunable kernel unstructured 50% (not 2:4)."""
    flat = flatten(bundle.params)
    masks = {}
    for i, path in enumerate(prunable_paths(bundle.params)):
        pattern = Pattern.parse("unstructured" if unstructured_first and i == 0 else "2:4")
        masks[path] = np.asarray(select(jnp.abs(jnp.asarray(flat[path])), pattern, 0.5))
    masks = masks_from_flat(bundle.params, masks)
    return dataclasses.replace(bundle, params=apply_masks(bundle.params, masks), masks=masks)


def _bits(x):
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}")) if x.dtype.kind == "f" or x.dtype.name == "bfloat16" else x


def test_round_trip_is_bit_exact_and_transformers_reads_the_decompressed_weights(family, tmp_path):
    name, bundle, _ = family
    pruned = _pruned(bundle)
    report = export_hf_compressed(pruned, tmp_path / "compressed")
    assert report["formats"][SPARSE_24] > 0 and len(report["not_2_4"]) == 1  # the unstructured layer fell back
    back = load_hf_model(tmp_path / "compressed")
    ours, theirs = flatten(pruned.params), flatten(back.params)
    assert set(ours) == set(theirs)
    for path, value in ours.items():
        assert np.array_equal(_bits(value), _bits(theirs[path])), path
    # The stored bitmasks come back as masks: the pruned ones, except a 2:4 group with 3 zeros keeps one more.
    stored = flat_masks(back.masks)
    assert set(stored) == set(flat_masks(pruned.masks))
    for path, keep in flat_masks(pruned.masks).items():
        assert (stored[path] | ~keep).all() and (stored[path] <= (keep | (ours[path] == 0))).all(), path
    # Dense again, transformers' own loader: the same logits as our model (the compressed claim is not carried).
    dense = export_hf(back, tmp_path / "dense")
    assert "quantization_config" not in json.loads((dense / "config.json").read_text())
    model = getattr(transformers, FAMILIES[name][0]).from_pretrained(dense).eval()
    inputs = _inputs(bundle.processor, FAMILIES[name][1])
    assert np.abs(_ours(pruned, inputs) - _theirs(model, inputs))[_mask(bundle, inputs)].max() <= 1e-4
    assert all(c["ok"] for c in check_declared(tmp_path / "compressed"))


def test_bfloat16_export_is_smaller_and_exact(llava_dir, tmp_path):
    bundle = _pruned(load_hf_model(llava_dir), unstructured_first=False)
    export_hf_compressed(bundle, tmp_path / "c", dtype="bfloat16")
    export_hf(bundle, tmp_path / "d", dtype="bfloat16")
    checkpoint = CompressedCheckpoint(tmp_path / "c")
    dense = load_hf_model(tmp_path / "d", dtype="bfloat16")
    back = load_hf_model(tmp_path / "c", dtype="bfloat16")
    for path, value in flatten(dense.params).items():
        assert np.array_equal(_bits(value), _bits(flatten(back.params)[path])), path
    assert set(checkpoint.formats.values()) == {SPARSE_24}
    assert (tmp_path / "c" / "model.safetensors").stat().st_size < (tmp_path / "d" / "model.safetensors").stat().st_size


def test_native_export_round_trip(tiny_bundle, tmp_path):
    bundle = _pruned(tiny_bundle)
    report = export_safetensors_compressed(bundle, tmp_path / "out")
    assert report["formats"][SPARSE_24] > 0 and len(report["not_2_4"]) == 1
    back = flatten(import_safetensors(tmp_path / "out").params)
    for path, value in flatten(bundle.params).items():
        assert np.array_equal(_bits(value), _bits(back[path])), path


def test_cli_export_verify_and_evaluate_a_compressed_directory(llava_dir, tmp_path, capsys):
    pruned_dir, out = tmp_path / "pruned", tmp_path / "out"
    save_model(pruned_dir, _pruned(load_hf_model(llava_dir)))
    assert main(["export", "--model", str(pruned_dir), "--format", "compressed-tensors", "--out", str(out),
                 "--json", str(tmp_path / "export.json")]) == 0
    printed = capsys.readouterr().out
    fallback = json.loads((tmp_path / "export.json").read_text())["not_2_4"]
    assert len(fallback) == 1 and fallback[0].endswith("encoder.layers.0.self_attn.q_proj.weight")  # vision q
    assert f"not 2:4, written as a bitmask: {fallback[0]}" in printed
    sparsity = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["format"] == SPARSE_24 and sparsity["sparsity_structure"] == "2:4" and len(sparsity["ignore"]) == 1
    assert main(["verify", "--model", str(out)]) == 0
    assert "OK      sparsity_config claims" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(out), "--limit", "2", "--json", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["n"] > 0

    # A false claim: a bitmask (not 2:4) layer declared as a 2:4 target.
    config = json.loads((out / "config.json").read_text())
    declared = config["quantization_config"]["sparsity_config"]
    declared["targets"] = sorted(declared["targets"] + declared.pop("ignore"))
    (out / "config.json").write_text(json.dumps(config))
    assert main(["verify", "--model", str(out)]) == 1
    lines = capsys.readouterr().out
    assert "FAILED  sparsity_config claims" in lines and "break 2:4" in lines


def test_export_without_masks_is_refused_before_writing(llava_dir, tmp_path, capsys):
    assert main(["export", "--model", str(llava_dir), "--format", "compressed-tensors", "--out",
                 str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "the model has no masks" in error[0]
    assert not (tmp_path / "out").exists()


def test_a_corrupted_compressed_weight_is_named(llava_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    export_hf_compressed(_pruned(load_hf_model(llava_dir)), tmp_path / "c")
    path = tmp_path / "c" / "model.safetensors"
    tensors = load_file(str(path))
    with open(path, "rb") as f:  # keep the header's metadata (it names each weight's format)
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    victim = next(n for n in tensors if n.endswith(".bitmask"))
    tensors[victim] = np.full_like(tensors[victim], 0xFF)  # marks more weights than are stored
    save_file(tensors, str(path), metadata=header["__metadata__"])
    with pytest.raises(ValueError, match=rf"{path}: compressed weight .* is corrupted: .*bitmask marks"):
        load_hf_model(tmp_path / "c")
