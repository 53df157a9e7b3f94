"""HF processors (tokenizer + image processor): loading them safely, and storing their files with a model."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import transformers

from sparsevlm.integrity import contained, write_atomic


def _refuse_custom_code(directory: Path) -> None:
    """Refuse configs that ask transformers for custom code (`auto_map`): loading them would run that code."""
    # Without an `auto_map` no Auto class looks for custom code. With one, transformers' default is to
    # ask on a terminal (and refuse otherwise); we refuse outright, naming the file.
    for path in sorted(directory.rglob("*config.json")):
        try:
            content = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not ours to judge: transformers reports an unreadable config when it reads it
        auto_map = content.get("auto_map") if isinstance(content, dict) else None
        if auto_map:
            classes = ", ".join(map(str, auto_map)) if isinstance(auto_map, (dict, list)) else repr(auto_map)
            raise ValueError(
                f"{path} asks for custom code (auto_map: {classes}); refused: only the model and processor "
                "classes built into transformers are used, since custom code could run anything"
            )


def load_processor(directory: str | os.PathLike) -> Any:
    """The checkpoint's `AutoProcessor` (tokenizer + image processor; PIL image processing without torchvision)."""
    _refuse_custom_code(Path(directory))
    try:
        return transformers.AutoProcessor.from_pretrained(str(directory))
    except OSError as err:  # transformers' "can't load" is a bare OSError, which callers do not expect
        detail = " ".join(str(err).split())
        raise FileNotFoundError(
            f"{directory} lacks usable processor files (tokenizer, image processor): {detail}"
        ) from None


def processor_files(processor: Any) -> dict[str, str]:
    """A processor's saved files as text, to store with a model and write back on export."""
    with tempfile.TemporaryDirectory() as tmp:
        processor.save_pretrained(tmp)
        # InstructBLIP keeps its Q-Former tokenizer in a subfolder: store relative paths.
        return {p.relative_to(tmp).as_posix(): p.read_text() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}


def processor_from_files(files: dict[str, str]) -> Any:
    """Inverse of `processor_files`."""
    if not isinstance(files, dict) or not all(isinstance(text, str) for text in files.values()):
        raise ValueError("stored processor files are malformed: expected a map from file names to file contents")
    with tempfile.TemporaryDirectory() as tmp:
        write_processor_files(Path(tmp), files)
        return load_processor(tmp)


def write_processor_files(root: str | os.PathLike, files: dict[str, str]) -> None:
    """Write stored processor files under `root`, refusing names that would leave it (stored names are data)."""
    root = Path(root)
    for name, text in files.items():
        try:
            target = contained(root, name)
        except ValueError as err:
            raise ValueError(f"stored processor file name {name!r} would leave the output directory: {err}") from None
        if target.is_dir():
            raise ValueError(f"stored processor file name {name!r} names a directory, not a file")
        write_atomic(target, text)
