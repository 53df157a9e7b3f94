"""Checks on files we did not write ourselves: checksum manifests for saved directories, and contained paths.

A saved directory carries `checksums.json`, the sha256 and size of every regular file in it, so a
truncated copy or a flipped bit is reported by name before any library parses the damaged bytes.
The manifest guards against accidents (an interrupted copy or download, a full disk, bit rot), not
against someone who can write the directory: they could rewrite the manifest too.

Files present but not listed are ignored, so tools may add files next to a saved model (the CLI
writes `report.json` into it). That is safe for what the manifest is for: a damaged listed file is
still caught, and whatever reads the directory has to confirm that the files it reads are listed
(`checkpoint.load_model_dir` checks that every item it restores is, with `listed_files`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

MANIFEST_NAME = "checksums.json"
_FORMAT = "sparsevlm-checksums/1"
_CHUNK_BYTES = 4 * 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CorruptCheckpointError(ValueError):
    """A saved directory is damaged or incomplete: a file is missing, truncated or its bytes changed."""


def _digest(path: Path) -> tuple[str, int]:
    """The sha256 hex digest of a file and the number of bytes it was computed over."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def write_checksums(directory: str | os.PathLike) -> Path:
    """Write `directory/checksums.json`: the sha256 and size of every regular file below it (atomically)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot write checksums: {directory} is not a directory")
    files: dict[str, dict[str, object]] = {}
    for folder, subfolders, names in os.walk(directory):
        subfolders.sort()
        for name in sorted(names):
            path = Path(folder, name)
            relative = path.relative_to(directory).as_posix()
            # Links are not regular files: what they point at is not part of the directory.
            if relative == MANIFEST_NAME or path.is_symlink() or not path.is_file():
                continue
            sha256, size = _digest(path)
            files[relative] = {"sha256": sha256, "size": size}
    return write_atomic(directory / MANIFEST_NAME, json.dumps({"format": _FORMAT, "files": files}, indent=1,
                                                              sort_keys=True))


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write text, bytes, or whatever `data(temporary_path)` writes, to a hidden sibling, then rename it to `path`.

    A reader never sees half a file, and a failure leaves any previous file at `path` and no temporary.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            if not callable(data):
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        if callable(data):
            data(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _read_manifest(directory: Path) -> dict[str, dict[str, object]] | None:
    """The manifest's `{relative path: {sha256, size}}`, None if there is none; malformed is an error."""
    manifest = directory / MANIFEST_NAME
    if not manifest.exists():
        return None
    try:
        content = json.loads(manifest.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpointError(f"{manifest} is unreadable: {' '.join(str(err).split())}") from None
    files = content.get("files") if isinstance(content, dict) else None
    if not isinstance(content, dict) or content.get("format") != _FORMAT or not isinstance(files, dict):
        raise CorruptCheckpointError(f"{manifest} is not a {_FORMAT} manifest (expected format and files keys)")
    for name, entry in files.items():
        size = entry.get("size") if isinstance(entry, dict) else None
        sha256 = entry.get("sha256") if isinstance(entry, dict) else None
        valid_size = isinstance(size, int) and not isinstance(size, bool) and size >= 0
        if not valid_size or not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise CorruptCheckpointError(f"{manifest}: the entry for {name!r} is malformed: {entry!r}")
    return files


def listed_files(directory: str | os.PathLike) -> frozenset[str]:
    """The relative paths `checksums.json` lists (empty if there is none); no file is checked."""
    return frozenset(_read_manifest(Path(directory)) or ())


def verify_checksums(directory: str | os.PathLike, required: bool = False) -> bool:
    """Check every file `checksums.json` lists; False if there is no manifest (an error when `required`)."""
    directory = Path(directory)
    files = _read_manifest(directory)
    manifest = directory / MANIFEST_NAME
    if files is None:
        if required:
            raise CorruptCheckpointError(f"{directory} has no {MANIFEST_NAME}, so its files cannot be verified")
        return False
    for name, entry in sorted(files.items()):
        try:
            contained(directory, name)
        except ValueError as err:
            raise CorruptCheckpointError(f"{manifest} lists a file outside the directory: {err}") from None
        path = directory / name
        if not path.exists():
            raise CorruptCheckpointError(f"{path} is missing (listed in {manifest})")
        if path.is_symlink() or not path.is_file():
            raise CorruptCheckpointError(f"{path} is not a regular file, though {manifest} lists it as one")
        expected_size, actual_size = entry["size"], path.stat().st_size
        if actual_size < expected_size:
            raise CorruptCheckpointError(f"{path} is truncated: {actual_size} of {expected_size} bytes")
        if actual_size > expected_size:
            raise CorruptCheckpointError(f"{path} has {actual_size} bytes, but {manifest} lists {expected_size}")
        try:
            sha256, _ = _digest(path)
        except OSError as err:
            raise CorruptCheckpointError(f"{path} cannot be read: {err.strerror or err}") from None
        if sha256 != entry["sha256"]:
            raise CorruptCheckpointError(f"{path} is corrupted (sha256 mismatch with {manifest})")
    return True


def contained(root: str | os.PathLike, relative: str, follow_symlinks: bool = True) -> Path:
    """`root/relative` resolved; ValueError if `relative` is absolute or leads (by `..`, symlinks) outside `root`.

    `follow_symlinks=False` judges the name alone: for reading directories whose files are links
    elsewhere by design (the Hugging Face hub cache links snapshot files to its blob store).
    """
    if not isinstance(relative, str):
        raise ValueError(f"path {relative!r} is not a string (expected a path relative to {root})")
    if not relative or "\x00" in relative:
        raise ValueError(f"path {relative!r} is not a valid file name inside {root}")
    if Path(relative).is_absolute() or relative.startswith(("/", "\\")):
        raise ValueError(f"path {relative!r} is absolute; expected a path relative to {root}")
    if follow_symlinks:
        base = Path(root).resolve()
        target = (base / relative).resolve()
    else:
        base = Path(os.path.abspath(root))
        target = Path(os.path.normpath(base / relative))
    if target != base and base not in target.parents:
        via = " through a symlink" if ".." not in Path(relative).parts else ""
        raise ValueError(f"path {relative!r} leads outside {root}{via}")
    return target


def one_line_error(err: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its type and message (tensorstore's spec dump and tracebacks cut)."""
    text = re.sub(r"\s*\[tensorstore_spec=.*", "", str(err), flags=re.DOTALL)
    text = " ".join(text.split("Traceback (most recent call last)")[0].split())
    text = text if len(text) <= limit else f"{text[:limit]}..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
