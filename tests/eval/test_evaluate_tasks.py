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


def _dataset_file(tmp_path, kind: str, rows: int = 10) -> str:
    root = tmp_path / kind
    records = []
    for i in range(rows):
        name = _image_name(i)
        _write_image(str(root / "images" / name), i)
        row = {"image": f"images/{name}", "image_id": str(i)}
        if kind == "caption":
            row["captions"] = [f"a {WORDS[i % 8]} {WORDS[(i + 3) % 8]}", f"the {WORDS[(i + 1) % 8]} shape"]
        else:
            row |= {"question": f"what color is shape {i} ?", "answers": [WORDS[(i + k) % 3] for k in range(10)]}
        records.append(row)
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
