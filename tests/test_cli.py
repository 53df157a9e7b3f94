"""The `sparsevlm` command: evaluate/export on a saved model, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from safetensors.numpy import load_file

from sparsevlm.checkpoint import load_model_dir, save_model
from sparsevlm.cli import main
from sparsevlm.data import shapes
from sparsevlm.eval.evaluate import evaluate_vqa
from sparsevlm.tree import flatten


@pytest.fixture()
def saved_model(tiny_bundle, tmp_path):
    return str(save_model(tmp_path / "model", tiny_bundle))


def test_evaluate_writes_the_result_json(saved_model, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["evaluate", "--model", saved_model, "--split", "validation", "--limit", "6", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"accuracy", "n", "split", "by_type", "num_beams", "length_penalty", "max_new_tokens", "model"}
    assert result["split"] == "validation" and result["n"] >= 6
    # The library's own evaluation of the same model on the same questions.
    direct = evaluate_vqa(load_model_dir(saved_model), shapes.build_split("validation", 6), progress=False)
    assert result["accuracy"] == direct["accuracy"] and result["n"] == direct["n"]
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
    assert "holds neither a saved sparsevlm model nor config.json" in capsys.readouterr().err


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
        "sparsevlm evaluate: error: unknown model 'nonexistent-model': expected one of default, scenes, "
        "the path of a saved model or HF checkpoint directory, or a hub name like org/model"
    ]


def test_prune_wanda_language_only_reports_measured_numbers(trained_model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    argv = ["prune", "--model", trained_model_dir, "--method", "wanda", "--language-sparsity", "0.5",
            "--calib-samples", "32", "--eval-images", "40", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "wanda" and report["pattern"] == "unstructured"
    assert report["target"] == {"vision": 0.0, "connector": 0.0, "language": 0.5}
    assert report["measured"] == {"vision": 0.0, "connector": 0.0, "language": 0.5}
    assert sorted(report["ratios"]) and all(p.startswith("language/blocks_") for p in sorted(report["ratios"]))
    assert all(r == [0.5, 0.5] for r in report["row_sparsity_range"].values())
    assert report["calibration"] == {"data": "shapes-captions", "samples": 32, "mode": "sequential"}
    # The saved model has the masks, the zeros agree with them, and evaluating it reproduces the accuracy.
    bundle = load_model_dir(out)
    flat_params, flat_masks = flatten(bundle.params), flatten(bundle.masks)
    assert sorted(p for p, m in flat_masks.items() if m is not None) == sorted(report["ratios"])
    for path in sorted(report["ratios"]):
        assert ((flat_params[path] == 0) == ~flat_masks[path]).all()
    evaluated = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(out), "--limit", "40", "--json", str(evaluated)]) == 0
    assert json.loads(evaluated.read_text())["accuracy"] == report["accuracy"]


def test_two_four_pruning_survives_export(trained_model_dir, tmp_path):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", trained_model_dir, "--method", "sparsegpt", "--pattern", "2:4",
                 "--vision-sparsity", "0.5", "--language-sparsity", "0.5", "--calib-samples", "16",
                 "--eval-images", "8", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    # `verify` recomputes the same from the saved weights alone.
    assert main(["verify", "--model", str(out), "--json", str(tmp_path / "verify.json")]) == 0
    verified = json.loads((tmp_path / "verify.json").read_text())
    assert verified["ok"] and verified["towers"]["language"]["n_of_m"]["2:4"] and verified["towers"]["vision"]["n_of_m"]["2:4"]
    assert verified["towers"]["language"]["sparsity"] == pytest.approx(report["measured"]["language"])
    assert all(v["mask_violations"] == 0 for v in verified["towers"].values() if v["mask_violations"] is not None)
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "exported")]) == 0
    tensors = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert {p.split("/")[0] for p in sorted(report["ratios"])} == {"vision", "language"}
    for path in sorted(report["ratios"]):
        kernel = tensors[path]  # Flax [in, out]: groups of 4 consecutive inputs per output
        groups = kernel.reshape(kernel.shape[0] // 4, 4, kernel.shape[1])
        assert ((groups == 0).sum(axis=1) >= 2).all(), path
    unpruned = [p for p in tensors if p.endswith("kernel") and p not in sorted(report["ratios"])]
    assert unpruned and not any((tensors[p] == 0).mean() > 0.1 for p in unpruned)


def test_prune_dsnot_with_ecoflap_allocation_reports_per_layer_ratios(trained_model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", trained_model_dir, "--method", "dsnot", "--allocation", "ecoflap-first",
                 "--vision-sparsity", "0.6", "--language-sparsity", "0.6", "--calib-samples", "16",
                 "--eval-images", "8", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["allocation"] == "ecoflap-first" and report["dsnot"]["init"] == "wanda"
    ratios = report["ratios"]
    assert {p.split("/")[0] for p in ratios} == {"vision", "language"}
    assert len(set(ratios.values())) > 1 and max(ratios.values()) <= 0.8
    printed = capsys.readouterr().out
    assert "ecoflap-first allocation, per-layer sparsity:" in printed
    assert "language/blocks_0/attn/q/kernel" in printed
    # Each layer is pruned at its own ratio (floor per output row); one budget over both towers.
    measured = report["layer_sparsity"]
    assert all(measured[p] <= ratios[p] + 1e-9 and measured[p] > ratios[p] - 0.05 for p in ratios)
    assert main(["verify", "--model", str(out)]) == 0
    assert "verify: OK" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--method", "wanda", "--language-sparsity", "1.0"], "argument --language-sparsity: '1.0' is outside [0, 1)"),
        (["--method", "wanda", "--vision-sparsity", "-0.1"], "argument --vision-sparsity: '-0.1' is outside [0, 1)"),
        (["--method", "wanda", "--vision-sparsity", "half"], "argument --vision-sparsity: 'half' is not a number"),
        (["--method", "obs", "--language-sparsity", "0.5"], "argument --method: invalid choice: 'obs'"),
        (["--method", "wanda", "--pattern", "4:4", "--language-sparsity", "0.5"], "N:M pattern 4:4 needs 0 < N < M"),
        (["--method", "wanda", "--pattern", "5:4", "--language-sparsity", "0.5"], "N:M pattern 5:4 needs 0 < N < M"),
        (["--method", "wanda", "--pattern", "blocky", "--language-sparsity", "0.5"], "pattern 'blocky' is not understood"),
        (["--method", "wanda", "--pattern", "2:4", "--language-sparsity", "0.3"], "language sparsity 0.3 does not match pattern 2:4"),
        (["--method", "wanda"], "nothing to prune"),
        (["--method", "wanda", "--language-sparsity", "0.5", "--calib-data", "c4"], "argument --calib-data: data 'c4' is neither a built-in set nor TASK=SOURCE"),
        (["--method", "wanda", "--pattern", "2:4", "--language-sparsity", "0.5", "--allocation", "ecoflap-first"],
         "--allocation ecoflap-first needs an unstructured pattern, not 2:4"),
        (["--method", "wanda", "--language-sparsity", "0.7", "--allocation", "ecoflap-zeroth",
          "--max-layer-sparsity", "0.6"], "--max-layer-sparsity 0.6 is below the target sparsity 0.7"),
        (["--method", "dsnot", "--language-sparsity", "0.5", "--dsnot-init", "random"],
         "argument --dsnot-init: invalid choice: 'random'"),
    ],
)
def test_prune_rejects_bad_input_and_writes_nothing(flags, message, saved_model, tmp_path, capsys):
    out = tmp_path / "never"
    argv = ["prune", "--model", saved_model, "--out", str(out), *flags]
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse-level errors
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert not out.exists()


def test_prune_refuses_to_overwrite_a_nonempty_out(saved_model, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["prune", "--model", saved_model, "--method", "magnitude", "--language-sparsity", "0.5",
                 "--out", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_prune_and_restore_default_to_the_models_own_task_data(scenes_model_dir, tmp_path):
    # A scenes model calibrates on scenes captions and restores on the scenes mixture unless told otherwise
    # (shapes data would be refused: its tokenizer lacks those words).
    pruned, restored = tmp_path / "pruned", tmp_path / "restored"
    assert main(["prune", "--model", scenes_model_dir, "--method", "wanda", "--language-sparsity", "0.5",
                 "--calib-samples", "8", "--eval-images", "4", "--out", str(pruned)]) == 0
    assert json.loads((pruned / "report.json").read_text())["calibration"]["data"] == "scenes-captions"
    assert main(["restore", "--model", str(pruned), "--method", "sparselora", "--steps", "2", "--warmup-steps", "0",
                 "--batch-size", "4", "--train-images", "8", "--eval-images", "4", "--out", str(restored)]) == 0
    report = json.loads((restored / "report.json").read_text())
    assert report["config"]["train_data"] == "scenes-mix"
    assert report["measured"]["language"] == 0.5


@pytest.fixture(scope="module")
def pruned_dir(trained_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "wanda-2of4"
    assert main(["prune", "--model", trained_model_dir, "--method", "wanda", "--pattern", "2:4",
                 "--vision-sparsity", "0.5", "--language-sparsity", "0.5", "--calib-samples", "16",
                 "--eval-images", "20", "--out", str(out)]) == 0
    return str(out)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "remask", "keeps_sparsity"),
                         [("sparselora", False, True), ("lora", False, False), ("lora", True, True)])
def test_restore_reports_accuracy_and_measured_sparsity(pruned_dir, trained_model_dir, tmp_path, method, remask,
                                                        keeps_sparsity):
    out = tmp_path / "restored"
    argv = ["restore", "--model", pruned_dir, "--method", method, "--steps", "8", "--warmup-steps", "2",
            "--batch-size", "8", "--train-images", "40", "--eval-images", "20", "--out", str(out)]
    assert main(argv + (["--remask"] if remask else [])) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["steps"] == 8 and report["kl_weight"] == 0.1
    assert report["teacher"] == trained_model_dir  # found in the pruned model's metadata
    if keeps_sparsity:
        assert report["measured"] == {"vision": 0.5, "connector": 0.0, "language": 0.5}
    else:
        assert report["measured"]["language"] < 0.01 and report["measured"]["vision"] < 0.01
    evaluated = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(out), "--limit", "20", "--json", str(evaluated)]) == 0
    assert json.loads(evaluated.read_text())["accuracy"] == report["accuracy"]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--method", "dora"], "argument --method: invalid choice: 'dora'"),
        (["--method", "lora", "--kl-weight", "1.5"], "kl_weight=1.5 must be in [0, 1]"),
        (["--method", "lora", "--temperature", "0"], "temperature=0.0 must be > 0"),
        (["--method", "lora", "--steps", "0"], "'0' must be a positive integer"),
        (["--method", "lora", "--language-rank", "0"], "argument --language-rank: '0' must be a positive integer"),
        (["--method", "lora", "--alpha", "-1"], "alpha=-1.0 must be > 0"),
    ],
)
def test_restore_rejects_bad_input_and_writes_nothing(flags, message, saved_model, tmp_path, capsys):
    out = tmp_path / "never"
    try:
        code = main(["restore", "--model", saved_model, "--out", str(out), *flags])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_restore_needs_a_pruned_model(saved_model, tmp_path, capsys):
    assert main(["restore", "--model", saved_model, "--method", "sparselora", "--teacher", saved_model,
                 "--out", str(tmp_path / "r")]) == 2
    assert "has no masks: prune it first" in capsys.readouterr().err
