"""The `sparsevlm` command: evaluate/export on a saved model, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sparsevlm.checkpoint import save_model
from sparsevlm.cli import main


@pytest.fixture()
def saved_model(tiny_bundle, tmp_path):
    return str(save_model(tmp_path / "model", tiny_bundle))


def test_evaluate_writes_the_result_json(saved_model, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["evaluate", "--model", saved_model, "--split", "validation", "--limit", "6", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"accuracy", "n", "split", "by_type", "model"}
    assert result["split"] == "validation" and result["n"] >= 6
    assert 0.0 <= result["accuracy"] <= 1.0
    assert set(result["by_type"]) <= {"color", "count", "shape", "exist"}
    assert f"accuracy {result['accuracy']:.4f}" in capsys.readouterr().out


def test_export_writes_safetensors(saved_model, tmp_path):
    assert main(["export", "--model", saved_model, "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "model.safetensors").stat().st_size > 0
    assert (tmp_path / "exp" / "config.json").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["evaluate", "--model", "llava-13b"], "unknown model 'llava-13b'"),
        (["evaluate", "--model", "./no/such/dir"], "model path './no/such/dir' does not exist"),
        (["export", "--model", "/no/such/dir", "--out", "x"], "model path '/no/such/dir' does not exist"),
    ],
)
def test_bad_model_is_one_clear_error_line(argv, message, capsys):
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_bad_split_is_one_clear_error_line(saved_model, capsys, tmp_path):
    out = tmp_path / "r.json"
    assert main(["evaluate", "--model", saved_model, "--split", "dev", "--json", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--split 'dev' is not a split" in err[0]
    assert not out.exists()


def test_model_dir_without_model_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--model", str(tmp_path / "empty")]) != 0
    assert "holds no saved sparsevlm model" in capsys.readouterr().err


def test_bad_flag_value_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", "default", "--limit", "-3"])
    assert exit_info.value.code != 0
    assert "'-3' must be a positive integer" in capsys.readouterr().err


def test_console_script_reports_unknown_model():
    proc = subprocess.run(
        [sys.executable, "-m", "sparsevlm.cli", "evaluate", "--model", "nonexistent-model"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "sparsevlm evaluate: error: unknown model 'nonexistent-model': expected one of default "
        "or the path of a saved model directory"
    ]
