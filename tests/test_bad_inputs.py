"""Every row of docs/bad-inputs.md: the command fails with its exit code and message, and writes nothing."""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from sparsevlm.checkpoint import TrainingCheckpoints, save_model
from sparsevlm.cli import main
from sparsevlm.config import SparsitySpec
from sparsevlm.pruning import prune

TABLE = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
ROW = re.compile(r"^\| (\d+) \| `([^`]+)` \| (\d) \| `([^`]+)` \|$")


def _rows() -> list[tuple[int, str, int, str]]:
    rows = [(int(n), cmd, int(code), msg) for n, cmd, code, msg in
            (m.groups() for m in map(ROW.match, TABLE.read_text().splitlines()) if m)]
    assert [n for n, *_ in rows] == list(range(1, len(rows) + 1)), "rows are numbered 1..N without gaps"
    return rows


def test_the_table_has_at_least_25_rows():
    assert len(_rows()) >= 25


@pytest.fixture(scope="module")
def inputs(tiny_bundle, tmp_path_factory) -> dict[str, str]:
    """The placeholders' files: built once, and checked unchanged after every row."""
    root = tmp_path_factory.mktemp("inputs")
    model = save_model(root / "model", tiny_bundle)
    result = prune(tiny_bundle.params, tiny_bundle.config, SparsitySpec.same(0.5), "magnitude")
    target = {"vision": 0.5, "connector": 0.0, "language": 0.5}
    pruned = dataclasses.replace(tiny_bundle, params=result.params, masks=result.masks, metadata={
        "pruning": {"pattern": "unstructured", "target": target, "source_model": str(model)}})
    save_model(root / "pruned", pruned)
    claim = dataclasses.replace(tiny_bundle, metadata={"pruning": {"pattern": "2:4", "target": target}})
    save_model(root / "claim", claim)
    escape = dataclasses.replace(tiny_bundle, metadata={"hf": {"processor_files": {"../evil.json": "{}"}}})
    save_model(root / "escape", escape)
    for name, damage in (("corrupt", "truncate"), ("flipped", "flip")):
        shutil.copytree(model, root / name)
        data = max((p for p in (root / name).rglob("*") if p.is_file() and "params" in p.parts),
                   key=lambda p: p.stat().st_size)
        raw = bytearray(data.read_bytes())
        if damage == "truncate":
            raw = raw[: len(raw) // 2]
        else:
            raw[len(raw) // 2 : len(raw) // 2 + 8] = bytes(b ^ 0xFF for b in raw[len(raw) // 2 : len(raw) // 2 + 8])
        data.write_bytes(bytes(raw))
    (root / "existing").mkdir()
    (root / "existing" / "keep.txt").write_text("kept")
    (root / "file").write_text("a file, not a directory")
    (root / "empty").mkdir()
    # Another run's checkpoints next to the output path `stale`.
    other = TrainingCheckpoints(root / "stale-checkpoints", {"restore": {"steps": 99}})
    other.save(1, {"x": np.zeros(2, np.float32)}, {})
    other.close()
    return {"model": str(model), "pruned": str(root / "pruned"), "unpruned-claim": str(root / "claim"),
            "escape": str(root / "escape"), "corrupt": str(root / "corrupt"), "flipped": str(root / "flipped"),
            "existing": str(root / "existing"), "file": str(root / "file"), "empty": str(root / "empty"),
            "stale": str(root / "stale"), "root": str(root)}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() or p.is_dir()}


@pytest.mark.parametrize("number,command,code,message", _rows(), ids=lambda v: str(v) if isinstance(v, int) else None)
def test_bad_input(number, command, code, message, inputs, tmp_path, capsys):
    root = Path(inputs["root"])
    values = dict(inputs, out=str(tmp_path / "out"))
    argv = [re.sub(r"\{([a-z-]+)\}", lambda m: values[m.group(1)], word) for word in shlex.split(command)]
    before, outputs_before = _snapshot(root), _snapshot(tmp_path)
    try:
        got = main(argv)
    except SystemExit as exit_:  # argparse's errors
        got = exit_.code
    captured = capsys.readouterr()
    assert got == code, f"row {number}: exit {got}, stderr {captured.err[-500:]}"
    text = captured.err if code == 2 else captured.out
    lines = [line for line in text.splitlines() if message in line]
    assert lines, f"row {number}: {message!r} not in {text[-800:]!r}"
    if code == 2:
        assert lines[0].startswith(f"sparsevlm {argv[0]}: error:"), lines[0]
    # Nothing written: no output, no temporary sibling, no checkpoint, inputs untouched.
    assert _snapshot(tmp_path) == outputs_before, f"row {number} wrote {set(_snapshot(tmp_path)) - set(outputs_before)}"
    assert _snapshot(root) == before, f"row {number} changed its inputs"
