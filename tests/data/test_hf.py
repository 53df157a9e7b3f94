"""HF loaders: every on-disk format → the common format, answers/captions mapped, prefix splits, bad inputs."""

from __future__ import annotations

import io
import json
import os
import re

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sparsevlm.data import hf
from sparsevlm.data.batch import decode_image, encode_vqa
from sparsevlm.data.tokenize import build_word_tokenizer

COLUMNS = ["image", "image_id", "question", "answer", "answers", "question_type"]
WORDS = ["red", "green", "blue", "cat", "dog", "two", "yes", "no"]


def _pixels(i: int) -> np.ndarray:
    """A 12×16 image whose colour encodes `i` (flat colours survive JPEG almost exactly)."""
    return np.full((12, 16, 3), (20 * (i % 12), 255 - 20 * (i % 12), 100), np.uint8)


def _write_image(path: str, i: int) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(_pixels(i)).save(path)
    return path


def _image_name(i: int) -> str:
    return f"img_{i}.{'png' if i % 2 == 0 else 'jpg'}"  # both formats in every set


def _bytes(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_pixels(i)).save(buffer, format="PNG" if i % 2 == 0 else "JPEG")
    return buffer.getvalue()


def _write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def _vqa_rows(n: int) -> list[dict]:
    """Two questions per image; answers cycle through the word list."""
    return [
        {"image_id": i // 2, "question": f"what is in image {i // 2} ?", "question_type": "what",
         "answers": [WORDS[i % 8], WORDS[(i + 1) % 8], WORDS[i % 8]]}
        for i in range(n)
    ]  # fmt: skip


def _load(task: str, source: str, tmp_path, **kwargs) -> datasets.Dataset:
    return hf.load_task(task, str(source), cache_dir=str(tmp_path / "cache"), **kwargs)


def _words(dataset: datasets.Dataset) -> set[str]:
    texts = list(dataset["question"]) + list(dataset["answer"])
    return {word for text in texts for word in re.findall(r"\w+|[^\w\s]", text)}


def _check_encodes(dataset: datasets.Dataset) -> None:
    tokenizer = build_word_tokenizer(_words(dataset))
    encoded = encode_vqa(dataset, tokenizer, with_targets=True)
    assert len(encoded) == len(dataset)
    assert encoded.images.shape[0] == len(set(dataset["image_id"]))
    assert encoded.answers == list(dataset["answer"])
    for (ids, n_prompt), answer in zip(encoded.sequences, dataset["answer"]):
        assert tokenizer.decode(ids[n_prompt:-1]).replace(" ", "") == answer.replace(" ", "")
        assert ids[-1] == tokenizer.eos_token_id


@pytest.fixture
def vqa_jsonl(tmp_path):
    """VQAv2-style JSON lines, answers as plain strings, image paths relative to the file."""
    root = tmp_path / "vqa_jsonl"
    rows = _vqa_rows(20)
    for row, i in zip(rows, range(20)):
        name = _image_name(i // 2)
        _write_image(str(root / "images" / name), i // 2)
        row["image"] = f"images/{name}"
    return _write_jsonl(str(root / "val.jsonl"), rows), rows


def test_vqa_jsonl_with_string_answers(vqa_jsonl, tmp_path):
    path, rows = vqa_jsonl
    data = _load("vqav2", path, tmp_path)
    assert data.column_names == COLUMNS and len(data) == 20
    assert list(data["answers"]) == [r["answers"] for r in rows]
    assert list(data["answer"]) == [r["answers"][0] for r in rows]  # no majority column: the first answer
    assert list(data["image_id"]) == [str(r["image_id"]) for r in rows]
    assert set(data["question_type"]) == {"what"}
    cells = data.cast_column("image", datasets.Image(decode=False))["image"]
    for i, cell in enumerate(cells):
        assert cell["path"] == os.path.join(os.path.dirname(path), rows[i]["image"])
        np.testing.assert_allclose(decode_image(cell), _pixels(i // 2), atol=4)  # JPEG rounding
    _check_encodes(data)


def test_streaming_is_materialised_up_to_limit(vqa_jsonl, tmp_path):
    path, _ = vqa_jsonl
    streamed = _load("vqav2", path, tmp_path, streaming=True, limit=5)
    eager = _load("vqav2", path, tmp_path, limit=5)
    assert isinstance(streamed, datasets.Dataset) and len(streamed) == 5
    for column in ("image_id", "question", "answer", "answers"):
        assert list(streamed[column]) == list(eager[column])


def test_vqa_imagefolder_with_answer_records(tmp_path):
    """OK-VQA / VQAv2 hub form: answers as records, a majority answer column, images in an imagefolder."""
    root = tmp_path / "okvqa"
    rows = []
    for i, row in enumerate(_vqa_rows(12)):
        if i % 2 == 0:
            _write_image(str(root / _image_name(i // 2)), i // 2)
        rows.append({"file_name": _image_name(i // 2), "image_id": row["image_id"], "question": row["question"],
                     "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                 for k, a in enumerate(row["answers"])],
                     "multiple_choice_answer": row["answers"][1]})  # fmt: skip
    _write_jsonl(str(root / "metadata.jsonl"), rows)
    data = _load("okvqa", root, tmp_path)
    assert data.column_names == COLUMNS and len(data) == 12
    assert list(data["answers"]) == [[a["answer"] for a in r["answers"]] for r in rows]
    assert list(data["answer"]) == [r["multiple_choice_answer"] for r in rows]
    assert set(data["question_type"]) == {"vqa"}  # none in the source: the task's kind
    for i, image in enumerate(data["image"]):
        np.testing.assert_allclose(np.asarray(image.convert("RGB")), _pixels(i // 2), atol=4)
    _check_encodes(data)


def test_gqa_parquet_with_image_bytes(tmp_path):
    """GQA (lmms-lab style): `imageId`, a single `answer`, `types` records; images as bytes in parquet."""
    n = 10
    table = pa.table({
        "id": [f"q{i}" for i in range(n)],
        "imageId": [f"n{i // 2}" for i in range(n)],
        "image": [{"bytes": _bytes(i // 2), "path": None} for i in range(n)],
        "question": [f"is the {WORDS[i % 5]} cat red ?" for i in range(n)],
        "answer": ["yes" if i % 3 else "no" for i in range(n)],
        "fullAnswer": ["yes , it is ." for _ in range(n)],
        "types": [{"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"} for _ in range(n)],
    })  # fmt: skip
    path = str(tmp_path / "gqa.parquet")
    pq.write_table(table, path)
    data = _load("gqa", path, tmp_path)
    assert data.column_names == COLUMNS and len(data) == n
    assert list(data["answers"]) == [[a] for a in table["answer"].to_pylist()]
    assert list(data["answer"]) == table["answer"].to_pylist()
    assert list(data["image_id"]) == table["imageId"].to_pylist()
    assert set(data["question_type"]) == {"verify"}
    _check_encodes(data)


def test_caption_parquet_with_relative_paths(tmp_path):
    """COCO captions (Karpathy style): a list of captions per image; the prompt is the caption instruction."""
    root = tmp_path / "coco"
    names = [_image_name(i) for i in range(10)]
    for i, name in enumerate(names):
        _write_image(str(root / "images" / name), i)
    captions = [[f"a {WORDS[i % 3]} {WORDS[3 + i % 2]} .", f"{WORDS[5]} {WORDS[3 + i % 2]}s ."] for i in range(10)]
    path = str(root / "test.parquet")
    pq.write_table(pa.table({"image": [f"images/{n}" for n in names], "captions": captions}), path)
    data = _load("coco_caption", path, tmp_path)
    assert data.column_names == COLUMNS and len(data) == 10
    assert list(data["answers"]) == captions
    assert list(data["answer"]) == [c[0] for c in captions]
    assert set(data["question"]) == {hf.CAPTION_PROMPT} and set(data["question_type"]) == {"caption"}
    assert list(data["image_id"]) == [os.path.join(str(root), "images", n) for n in names]  # id from the path
    _check_encodes(data)


@pytest.fixture
def cc3m_jsonl(tmp_path):
    """CC3M-style calibration captions, one per image, images referenced relative to the file."""
    root = tmp_path / "cc3m"
    rows = []
    for i in range(40):
        name = _image_name(i)
        _write_image(str(root / "img" / name), i)
        rows.append({"jpg": f"img/{name}", "__key__": f"{i:05d}",
                     "txt": " ".join(WORDS[(i + k) % 8] for k in range(2 + i % 5))})  # fmt: skip
    rows[0]["txt"] = "a"  # a one-character caption: empty prompt, never an empty target
    return _write_jsonl(str(root / "cc3m.jsonl"), rows), rows


def test_cc3m_prefix_captioning_splits_reassemble_and_are_seeded(cc3m_jsonl, tmp_path):
    path, rows = cc3m_jsonl
    data = _load("cc3m", path, tmp_path, seed=7)
    assert data.column_names == COLUMNS and len(data) == 40
    captions = [r["txt"] for r in rows]
    assert [q + a for q, a in zip(data["question"], data["answer"])] == captions
    assert list(data["answers"]) == [[c] for c in captions]
    assert (data[0]["question"], data[0]["answer"]) == ("", "a")
    assert all(0 < len(q) < len(c) for q, c in zip(data["question"][1:], captions[1:]))
    assert list(data["image_id"]) == [r["__key__"] for r in rows]
    again = _load("cc3m", path, tmp_path, seed=7)
    other = _load("cc3m", path, tmp_path, seed=8)
    head = _load("cc3m", path, tmp_path, seed=7, limit=10)
    assert list(again["question"]) == list(data["question"])
    assert list(other["question"]) != list(data["question"])
    assert list(head["question"]) == list(data["question"])[:10]  # a row's cut does not depend on limit
    _check_encodes(data)


def test_split_caption_draws_every_position_uniformly():
    caption = "abcdef"
    rng = np.random.default_rng(0)
    cuts = [len(hf.split_caption(caption, rng)[0]) for _ in range(5000)]
    counts = np.bincount(cuts, minlength=len(caption))
    assert counts[0] == 0 and counts[1:].min() > 850  # 1 … 5, about 1000 each
    with pytest.raises(ValueError, match="empty caption"):
        hf.split_caption("", rng)


def test_visual_genome_region_phrases_and_restoration_captions(tmp_path):
    root = tmp_path / "vg"
    rows = []
    for i in range(10):
        name = _image_name(i)
        _write_image(str(root / name), i)
        regions = [{"region_id": k, "phrase": f"{WORDS[(i + k) % 3]} {WORDS[3]}", "x": 0, "y": 0, "width": 4,
                    "height": 4} for k in range(3)]  # fmt: skip
        rows.append({"image": name, "image_id": 100 + i, "regions": regions})
    path = _write_jsonl(str(root / "regions.jsonl"), rows)
    data = _load("visual_genome", path, tmp_path)
    phrases = [[r["phrase"] for r in row["regions"]] for row in rows]
    assert list(data["answers"]) == phrases
    assert [q + a for q, a in zip(data["question"], data["answer"])] == [p[0] for p in phrases]
    assert set(data["question_type"]) == {"prefix_caption"}
    _check_encodes(data)
    restoration = _load("cc3m_instruct", path, tmp_path)
    assert list(restoration["answer"]) == [p[0] for p in phrases]
    assert set(restoration["question"]) == {hf.CAPTION_PROMPT}


def test_hub_name_goes_to_load_dataset_and_streams_are_materialised(monkeypatch, tmp_path):
    """A hub copy (VQAv2 style, answers as a sequence of records = dict of lists), streamed: the first rows."""
    features = datasets.Features({
        "image": datasets.Image(),
        "image_id": datasets.Value("int64"),
        "question": datasets.Value("string"),
        "question_type": datasets.Value("string"),
        "multiple_choice_answer": datasets.Value("string"),
        "answers": datasets.Sequence({"answer": datasets.Value("string"), "answer_confidence": datasets.Value("string"),
                                      "answer_id": datasets.Value("int64")}),
    })  # fmt: skip
    rows = _vqa_rows(8)
    hub = datasets.Dataset.from_dict({
        "image": [{"bytes": _bytes(r["image_id"]), "path": None} for r in rows],
        "image_id": [r["image_id"] for r in rows],
        "question": [r["question"] for r in rows],
        "question_type": [r["question_type"] for r in rows],
        "multiple_choice_answer": [r["answers"][0] for r in rows],
        "answers": [{"answer": r["answers"], "answer_confidence": ["yes"] * 3, "answer_id": [1, 2, 3]} for r in rows],
    }, features=features)  # fmt: skip
    calls = []
    files = {"validation": ["hf://datasets/someone/VQAv2/data/validation-00000-of-00002.parquet"],
             "train": ["hf://datasets/someone/VQAv2/data/train-00000-of-00009.parquet"]}

    class Builder:  # what `load_dataset_builder` knows from the repo's file list alone, before any download
        config = type("Config", (), {"data_files": files})

    def fake_builder(path, cache_dir=None, **kwargs):
        calls.append(("builder", path, kwargs))
        return Builder()

    def fake_load_dataset(path, **kwargs):
        calls.append(("load", path, kwargs))
        return hub.to_iterable_dataset()

    monkeypatch.setattr(hf.datasets, "load_dataset_builder", fake_builder)
    monkeypatch.setattr(hf.datasets, "load_dataset", fake_load_dataset)
    data = _load("vqav2", "someone/VQAv2", tmp_path, limit=6, config="default")
    # A limit streams, and only the split's own files are named: nothing of the train split is fetched.
    assert calls == [("builder", "someone/VQAv2", {"name": "default"}),
                     ("load", "someone/VQAv2", {"split": "validation", "streaming": True,
                                                "cache_dir": str(tmp_path / "cache"), "name": "default",
                                                "data_files": {"validation": files["validation"]}})]  # fmt: skip
    assert len(data) == 6 and list(data["answers"]) == [r["answers"] for r in rows[:6]]
    assert list(data["image_id"]) == [str(r["image_id"]) for r in rows[:6]]
    _check_encodes(data)


# Bad inputs: each names what is wrong.


def test_missing_column_names_it_and_the_columns_present(vqa_jsonl, tmp_path):
    path, rows = vqa_jsonl
    for row in rows:
        del row["question"]
    _write_jsonl(path, rows)
    with pytest.raises(ValueError, match=r"no 'question' column.*columns present: image_id, question_type, answers, "
                                         r"image"):  # fmt: skip
        _load("vqav2", path, tmp_path)
    for row in rows:
        del row["answers"]
    _write_jsonl(path, rows)
    with pytest.raises(ValueError, match=r"no 'captions' column \(looked for conversations, captions, caption, .*\); columns present: "
                                         r"image_id, question_type, image"):  # fmt: skip
        _load("coco_caption", path, tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "missing"])
def test_unreadable_image_names_the_row_and_file(vqa_jsonl, tmp_path, damage):
    path, rows = vqa_jsonl
    bad = os.path.join(os.path.dirname(path), rows[6]["image"])  # rows 6 and 7 share this image
    if damage == "garbage":
        with open(bad, "wb") as f:
            f.write(b"not an image at all")
    else:
        os.remove(bad)
    with pytest.raises(ValueError, match=rf"row 6: unreadable image {re.escape(bad)}"):
        _load("vqav2", path, tmp_path)


def test_empty_split_names_source_and_split(tmp_path):
    path = str(tmp_path / "empty.parquet")
    schema = pa.schema([("image", pa.string()), ("question", pa.string()), ("answers", pa.list_(pa.string()))])
    pq.write_table(schema.empty_table(), path)
    with pytest.raises(ValueError, match=rf"source {re.escape(repr(path))} split 'train' has no rows"):
        _load("vqav2", path, tmp_path, split="train")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n")
    with pytest.raises(ValueError, match=r"blank.jsonl' split 'train' has no rows"):
        _load("cc3m", blank, tmp_path)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"folder' split 'train' has no rows"):
        _load("coco_caption", folder, tmp_path)


@pytest.mark.parametrize("limit", [0, -3])
def test_non_positive_limit_is_rejected(vqa_jsonl, tmp_path, limit):
    with pytest.raises(ValueError, match=rf"limit={limit} must be positive"):
        _load("vqav2", vqa_jsonl[0], tmp_path, limit=limit)


def test_unknown_task_missing_split_and_unknown_file_type(vqa_jsonl, tmp_path):
    path, _ = vqa_jsonl
    with pytest.raises(ValueError, match=r"task='vqa3' is not one of vqav2, okvqa, gqa"):
        _load("vqa3", path, tmp_path)
    with pytest.raises(ValueError, match=r"has no split 'validation'; splits: train"):
        _load("vqav2", path, tmp_path, split="validation")
    other = tmp_path / "data.csv"
    other.write_text("image,question\n")
    with pytest.raises(ValueError, match=r"extension '.csv' is not one of .parquet, .jsonl, .json"):
        _load("vqav2", other, tmp_path)
    # A folder of images without metadata is read as `datasets` reads it: images only, so no questions.
    with pytest.raises(ValueError, match=r"has no 'question' column \(looked for question\); columns present: image$"):
        _load("vqav2", tmp_path / "vqa_jsonl" / "images", tmp_path)
