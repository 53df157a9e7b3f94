"""Untrusted input: no unsafe loaders in the source, checksummed model directories, contained paths."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import sparsevlm
from sparsevlm.checkpoint import export_safetensors, import_safetensors, load_model_dir, save_model
from sparsevlm.cli import main
from sparsevlm.hf.processor import processor_from_files
from sparsevlm.integrity import (
    MANIFEST_NAME,
    CorruptCheckpointError,
    contained,
    listed_files,
    verify_checksums,
    write_checksums,
)
from sparsevlm.tree import flatten

UNSAFE = re.compile(r"pickle|torch\.load|trust_remote_code|allow_pickle", re.IGNORECASE)


def test_package_source_names_no_unsafe_loader():
    package = Path(sparsevlm.__file__).parent
    sources = sorted(package.rglob("*.py"))
    assert len(sources) > 20  # the whole package, not an empty glob
    hits = [f"{path.relative_to(package)}:{number}: {line.strip()}"
            for path in sources for number, line in enumerate(path.read_text().splitlines(), 1)
            if UNSAFE.search(line)]
    assert hits == []


# --- checksums on a plain directory ---


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    """A directory with nested files, an empty file and a symlink."""
    root = tmp_path / "dir"
    (root / "a" / "b").mkdir(parents=True)
    (root / "top.bin").write_bytes(bytes(range(256)) * 40)
    (root / "a" / "b" / "deep.json").write_text('{"x": 1}')
    (root / "a" / "empty").write_bytes(b"")
    (tmp_path / "outside.txt").write_text("not part of the directory")
    (root / "link.txt").symlink_to(tmp_path / "outside.txt")
    return root


def test_checksums_round_trip(files):
    manifest = write_checksums(files)
    assert manifest == files / MANIFEST_NAME
    listed = json.loads(manifest.read_text())["files"]
    # Regular files only (the symlink is not part of the directory), keyed by relative posix path.
    assert sorted(listed) == ["a/b/deep.json", "a/empty", "top.bin"]
    for name, entry in listed.items():
        raw = (files / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    assert listed_files(files) == {"a/b/deep.json", "a/empty", "top.bin"}
    assert verify_checksums(files) and verify_checksums(files, required=True)
    assert [p.name for p in files.iterdir() if p.name.endswith(".tmp")] == []  # the temporary file was renamed
    (files / "added-later.json").write_text("{}")  # unlisted files are ignored (see sparsevlm.integrity)
    assert verify_checksums(files)


def test_missing_manifest_is_false_unless_required(files):
    assert verify_checksums(files) is False and listed_files(files) == frozenset()
    with pytest.raises(CorruptCheckpointError, match=rf"{re.escape(str(files))} has no checksums.json"):
        verify_checksums(files, required=True)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:1000]), "top.bin is truncated: 1000 of 10240 bytes"),
        (lambda p: p.write_bytes(p.read_bytes()[:5000] + b"\xff" + p.read_bytes()[5001:]),
         r"top.bin is corrupted \(sha256 mismatch"),
        (lambda p: p.write_bytes(p.read_bytes() + b"x"), "top.bin has 10241 bytes, but .*checksums.json lists 10240"),
        (lambda p: p.unlink(), r"top.bin is missing \(listed in"),
    ],
    ids=["truncated", "flipped", "grown", "missing"],
)
def test_damaged_file_is_named(files, damage, message):
    write_checksums(files)
    damage(files / "top.bin")
    with pytest.raises(CorruptCheckpointError, match=f"^{re.escape(str(files))}/{message}"):
        verify_checksums(files)


@pytest.mark.parametrize(
    "manifest,message",
    [
        ('{"files": ', "checksums.json is unreadable: Expecting value"),
        ("[1, 2]", "checksums.json is not a sparsevlm-checksums/1 manifest"),
        ({"files": {"x": {"sha256": "abc", "size": 1}}}, "the entry for 'x' is malformed"),
        ({"files": {"x": {"sha256": "0" * 64, "size": -1}}}, "the entry for 'x' is malformed"),
        ({"files": {"../x": {"sha256": "0" * 64, "size": 1}}}, r"lists a file outside the directory: path '../x'"),
    ],
    ids=["not-json", "not-a-manifest", "bad-hash", "bad-size", "escapes"],
)
def test_malformed_manifest_is_a_corrupt_checkpoint(files, manifest, message):
    if isinstance(manifest, dict):
        manifest = json.dumps({"format": "sparsevlm-checksums/1", **manifest})
    (files / MANIFEST_NAME).write_text(manifest)
    with pytest.raises(CorruptCheckpointError, match=message):
        verify_checksums(files)


# --- contained paths ---


def test_contained_refuses_paths_that_leave_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "outside-link").symlink_to(tmp_path)
    (root / "inside-link").symlink_to(root / "sub")
    assert contained(root, "sub/file.json") == root.resolve() / "sub" / "file.json"
    assert contained(root, "sub/../file.json") == root.resolve() / "file.json"
    assert contained(root, "inside-link/file.json") == root.resolve() / "sub" / "file.json"
    with pytest.raises(ValueError, match=r"path '../x' leads outside"):
        contained(root, "../x")
    with pytest.raises(ValueError, match=r"path 'sub/../../x' leads outside"):
        contained(root, "sub/../../x")
    with pytest.raises(ValueError, match=r"path '/etc/passwd' is absolute; expected a path relative to"):
        contained(root, "/etc/passwd")
    with pytest.raises(ValueError, match=r"path 'outside-link/x' leads outside .* through a symlink"):
        contained(root, "outside-link/x")
    with pytest.raises(ValueError, match=r"path 3 is not a string"):
        contained(root, 3)  # type: ignore[arg-type]  # names come from JSON: anything can arrive
    # By name alone (reading a hub-cache snapshot, whose files link to a blob store outside it).
    assert contained(root, "outside-link/x", follow_symlinks=False) == root / "outside-link" / "x"
    with pytest.raises(ValueError, match=r"path '../x' leads outside"):
        contained(root, "../x", follow_symlinks=False)


def test_processor_file_names_cannot_leave_the_directory(tmp_path):
    with pytest.raises(ValueError, match=r"stored processor file name '../evil.json' would leave the output directory"):
        processor_from_files({"preprocessor_config.json": "{}", "../evil.json": "{}"})
    with pytest.raises(ValueError, match=rf"stored processor file name '{re.escape(str(tmp_path))}/evil.json' would"):
        processor_from_files({str(tmp_path / "evil.json"): "{}"})
    assert not (tmp_path / "evil.json").exists()


def test_processor_asking_for_custom_code_is_refused():
    config = {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}
    with pytest.raises(ValueError, match=r"tokenizer_config.json asks for custom code \(auto_map: AutoTokenizer\); "
                                         "refused"):
        processor_from_files({"tokenizer_config.json": json.dumps(config)})


# --- saved model directories ---


@pytest.fixture(scope="module")
def saved_model(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model saved with `save_model`; tests damage copies of it."""
    return save_model(tmp_path_factory.mktemp("saved") / "model", tiny_bundle)


@pytest.fixture()
def model(saved_model: Path, tmp_path: Path) -> Path:
    """A private copy of the saved model, free to damage."""
    return Path(shutil.copytree(saved_model, tmp_path / "model"))


def _params_data_file(model: Path) -> Path:
    """The file holding the params' array bytes: the largest one (the rest is orbax and zarr metadata)."""
    return max((p for p in (model / "0" / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _flip_middle(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 8] = bytes(b ^ 0xFF for b in raw[middle : middle + 8])
    path.write_bytes(bytes(raw))


def test_saved_model_carries_a_manifest_of_every_file(model, tiny_bundle):
    on_disk = {p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    assert listed_files(model) == on_disk and verify_checksums(model, required=True)
    assert _params_data_file(model).stat().st_size > 100_000  # really the array bytes (the tiny model is ~240 kB)
    loaded = load_model_dir(model)
    for path, value in flatten(tiny_bundle.params).items():
        np.testing.assert_array_equal(flatten(loaded.params)[path], value)


def test_truncated_params_file_is_named(model):
    data = _params_data_file(model)
    size = data.stat().st_size
    _truncate(data, size // 3)
    with pytest.raises(CorruptCheckpointError, match=rf"^{re.escape(str(data))} is truncated: {size // 3} of {size} "
                                                     r"bytes$"):
        load_model_dir(model)


def test_flipped_bytes_are_named(model):
    data = _params_data_file(model)
    _flip_middle(data)
    with pytest.raises(CorruptCheckpointError, match=rf"^{re.escape(str(data))} is corrupted \(sha256 mismatch"):
        load_model_dir(model)


def test_model_without_manifest_still_loads(model, tiny_bundle):
    (model / MANIFEST_NAME).unlink()  # as saved before manifests existed
    loaded = load_model_dir(model)
    np.testing.assert_array_equal(flatten(loaded.params)["language/blocks_0/attn/q/kernel"],
                                  flatten(tiny_bundle.params)["language/blocks_0/attn/q/kernel"])


@pytest.mark.parametrize(
    "damage,cause",
    [
        (lambda m: _truncate(_params_data_file(m), 1000), "ValueError: OUT_OF_RANGE"),
        # Flipped bytes in the array data itself go unnoticed without a manifest (orbax stores no checksum of
        # it; the model would load with wrong weights), so flip bytes in a file that is parsed: the config.
        (lambda m: _flip_middle(m / "0" / "config" / "metadata"), "UnicodeDecodeError"),
    ],
    ids=["truncated-params", "flipped-config"],
)
def test_damage_without_manifest_is_still_a_clear_error(model, damage, cause):
    (model / MANIFEST_NAME).unlink()
    damage(model)
    with pytest.raises(CorruptCheckpointError) as info:
        load_model_dir(model)
    message = str(info.value)
    assert message.startswith(f"model directory {model} is damaged or incomplete (restoring it failed): {cause}")
    assert "\n" not in message and len(message) < 500 and "tensorstore_spec" not in message
    assert info.value.__cause__ is not None  # the library's own exception stays attached for debugging


def test_step_added_after_saving_is_not_restored(model):
    # A complete orbax step the manifest does not cover (latest_step would pick it): never restored unverified.
    shutil.copytree(model / "0", model / "1")
    with pytest.raises(CorruptCheckpointError, match=rf"{re.escape(str(model / '1' / 'params'))} is not covered by "
                                                     rf"{re.escape(str(model / MANIFEST_NAME))}"):
        load_model_dir(model)


def test_cli_reports_a_damaged_model_in_one_line(model, capsys):
    data = _params_data_file(model)
    _truncate(data, 1000)
    assert main(["evaluate", "--model", str(model), "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"sparsevlm evaluate: error: {data} is truncated: 1000 of "), err


def test_stored_processor_file_leaving_the_directory_is_refused_on_load(tiny_bundle, tmp_path):
    hf = {"processor_files": {"../evil.json": "{}"}}
    path = save_model(tmp_path / "model", dataclasses.replace(tiny_bundle, metadata={"hf": hf}))
    message = rf"{re.escape(str(path))} holds an unusable model: ValueError: stored processor file name '../evil.json' "
    with pytest.raises(CorruptCheckpointError, match=message + "would leave the output directory"):
        load_model_dir(path)


# --- safetensors export, read back ---


def test_import_of_a_damaged_export_names_the_file(tiny_bundle, tmp_path):
    out = export_safetensors(tiny_bundle, tmp_path / "out")
    weights = out / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(weights))} is truncated: tensor '.*' ends at byte "):
        import_safetensors(out)
    weights.write_bytes(raw)
    (out / "config.json").write_text('{"vision": ')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(out / 'config.json'))} is not a valid sparsevlm config: "
                                         "JSONDecodeError"):
        import_safetensors(out)
    (out / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(out / 'config.json'))} does not exist"):
        import_safetensors(out)


def test_write_atomic_leaves_the_old_file_and_no_temporary_on_failure(tmp_path):
    from sparsevlm.integrity import write_atomic

    target = write_atomic(tmp_path / "sub" / "r.json", '{"old": 1}')
    assert target.read_text() == '{"old": 1}'

    def half(tmp: Path) -> None:
        tmp.write_text('{"ne')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half)
    assert target.read_text() == '{"old": 1}' and sorted(p.name for p in target.parent.iterdir()) == ["r.json"]
    write_atomic(target, b"\x00\xff")
    assert target.read_bytes() == b"\x00\xff"
