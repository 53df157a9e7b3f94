"""`evaluate --task` on local benchmark-format data: the right metric, per-row predictions, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparsevlm.checkpoint import save_model
from sparsevlm.cli import main
from sparsevlm.data import hf
from sparsevlm.eval.evaluate import evaluate_task
from sparsevlm.eval.metrics import cider_d, gqa_accuracy, vqa_accuracy
from tests.data.test_hf import _image_name, _write_image, _write_jsonl

WORDS = ("red", "blue", "green", "circle", "square", "two", "three", "yes")


def _dataset_file(tmp_path, kind: str, rows: int = 10, form: str = "jsonl") -> str:
    """A small VQA or caption set with real PNG/JPEG files, as JSON lines, parquet or an imagefolder."""
    root = tmp_path / f"{kind}-{form}"
    records = []
    for i in range(rows):
        name = _image_name(i)
        _write_image(str(root / ("" if form == "imagefolder" else "images") / name), i)
        row = {"file_name": name} if form == "imagefolder" else {"image": f"images/{name}"}
        row["image_id"] = str(i)
        if kind == "caption":
            row["captions"] = [f"a {WORDS[i % 8]} {WORDS[(i + 3) % 8]}", f"the {WORDS[(i + 1) % 8]} shape"]
        else:
            row |= {"question": f"what color is shape {i} ?", "answers": [WORDS[(i + k) % 3] for k in range(10)]}
        records.append(row)
    if form == "imagefolder":
        _write_jsonl(str(root / "metadata.jsonl"), records)
        return str(root)
    if form == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), str(root / "data.parquet"))
        return str(root / "data.parquet")
    return _write_jsonl(str(root / "data.jsonl"), records)


@pytest.fixture(scope="module")
def saved_model(tiny_bundle, tmp_path_factory):
    return str(save_model(tmp_path_factory.mktemp("model") / "m", tiny_bundle))


def test_vqav2_through_the_cli_scores_with_official_vqa_accuracy(saved_model, tmp_path):
    data = _dataset_file(tmp_path, "vqa")
    out = tmp_path / "result.json"
    assert main(["evaluate", "--model", saved_model, "--task", "vqav2", "--data", data, "--limit", "8",
                 "--max-new-tokens", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["task"], result["metric"], result["n"], result["max_new_tokens"]) == ("vqav2", "vqa_accuracy", 8, 3)
    rows = result["predictions"]
    assert len(rows) == 8 and all(len(r["references"]) == 10 for r in rows)
    for row in rows:
        assert row["score"] == pytest.approx(vqa_accuracy(row["prediction"], row["references"]))
    assert result["score"] == pytest.approx(np.mean([r["score"] for r in rows]))


def test_gqa_and_caption_tasks_use_their_metrics(tiny_bundle, tmp_path):
    gqa = hf.load_task("gqa", _dataset_file(tmp_path, "vqa"), cache_dir=str(tmp_path / "cache"))
    result = evaluate_task(tiny_bundle, "gqa", gqa, batch_size=4, max_new_tokens=2, progress=False)
    predictions = [r["prediction"] for r in result["predictions"]]
    assert result["metric"] == "gqa_accuracy"
    assert result["score"] == pytest.approx(gqa_accuracy(predictions, list(gqa["answer"])))

    captions = hf.load_task("coco_caption", _dataset_file(tmp_path, "caption"), cache_dir=str(tmp_path / "cache"))
    result = evaluate_task(tiny_bundle, "coco_caption", captions, batch_size=4, max_new_tokens=4, progress=False)
    predictions = {i: r["prediction"] for i, r in enumerate(result["predictions"])}
    references = {i: list(c) for i, c in enumerate(captions["answers"])}
    assert result["metric"] == "cider_d" and result["n"] == 10
    assert result["score"] == pytest.approx(cider_d(predictions, references)[0])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--task", "vqav2"], "--task vqav2 needs --data"),
        (["--task", "shapes", "--data", "x.jsonl"], "--data is for benchmark tasks"),
        (["--task", "gqa", "--data", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
    ],
)
def test_bad_task_arguments_are_one_line_errors(saved_model, argv, message, capsys):
    assert main(["evaluate", "--model", saved_model, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_limit_zero_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", "default", "--task", "vqav2", "--data", "x", "--limit", "0"])
    assert exit_info.value.code == 2 and "--limit" in capsys.readouterr().err


@pytest.mark.slow
def test_calibrate_prune_restore_evaluate_on_local_real_format_data(saved_model, tmp_path):
    """CC3M-style prefix captions (JSON lines) calibrate, COCO-style captions (imagefolder) restore,
    VQAv2-style data (parquet) evaluates: every on-disk format through the whole pipeline."""
    root = tmp_path / "cc3m"
    rows = []
    for i in range(12):
        name = _image_name(i)
        _write_image(str(root / "images" / name), i)
        rows.append({"image": f"images/{name}", "caption": f"a {WORDS[i % 8]} {WORDS[(i + 2) % 8]} on the left"})
    cc3m = _write_jsonl(str(root / "train.jsonl"), rows)
    captions = _dataset_file(tmp_path, "caption", rows=12, form="imagefolder")
    vqa = _dataset_file(tmp_path, "vqa", form="parquet")
    pruned, restored = str(tmp_path / "pruned"), str(tmp_path / "restored")
    assert main(["prune", "--model", saved_model, "--method", "wanda", "--language-sparsity", "0.5",
                 "--calib-data", f"cc3m={cc3m}", "--calib-samples", "8", "--eval-images", "4", "--out", pruned]) == 0
    report = json.loads((tmp_path / "pruned" / "report.json").read_text())
    assert report["calibration"]["data"] == f"cc3m={cc3m}" and report["calibration"]["samples"] == 8
    assert main(["restore", "--model", pruned, "--method", "sparselora", "--steps", "2", "--warmup-steps", "1",
                 "--batch-size", "4", "--train-data", f"coco_caption_train={captions}", "--train-images", "12",
                 "--eval-images", "4", "--out", restored]) == 0
    out = tmp_path / "vqa.json"
    assert main(["evaluate", "--model", restored, "--task", "vqav2", "--data", vqa, "--max-new-tokens", "2",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == 10


@pytest.mark.parametrize("value", ["cc3m", "c4=/data", "cc3m="])
def test_bad_data_flags_name_the_value(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--model", "default", "--method", "wanda", "--language-sparsity", "0.5",
              "--calib-data", value, "--out", "x"])
    assert exit_info.value.code == 2 and f"data {value!r} is neither" in capsys.readouterr().err
