"""The hub datasets each task is tested with, as local copies with their published schemas column for column.

Each fixture is a copy of a hub repo as `huggingface-cli download` leaves it (data files, and the README
`configs` that name each config's files per split), so `load_task` reads it through the same
`datasets.load_dataset(path, config, split=..., data_files=..., streaming=...)` call as the hub name.
"""

from __future__ import annotations

import io
import json
import os
import re

import datasets
import numpy as np
import pytest
from PIL import Image

from sparsevlm.data import hf
from sparsevlm.eval.metrics import caption_tokens, cider_d

WORDS = ["a", "red", "cat", "dog", "on", "the", "grass", "sofa", "two", "small", "big", "sits", "runs", "near"]


def _pixels(i: int) -> np.ndarray:
    return np.full((8, 10, 3), (15 * (i % 16), 255 - 15 * (i % 16), 60), np.uint8)


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_pixels(i)).save(buffer, format="PNG")
    return buffer.getvalue()


def _save_png(path, i: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(_pixels(i)).save(path, format="PNG")


def _colour(cell) -> np.ndarray:
    image = cell if isinstance(cell, Image.Image) else Image.open(cell["path"] or io.BytesIO(cell["bytes"]))
    return np.asarray(image.convert("RGB"))


def _repo(root, configs: dict[str, dict[str, str]]) -> str:
    """A hub repo copy: README front matter naming each config's files per split (`{config: {split: glob}}`)."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {glob}" for split, glob in splits.items()]
    os.makedirs(root, exist_ok=True)
    (root / "README.md").write_text("\n".join(lines + ["---", ""]))
    return str(root)


def _parquet(path, rows: dict[str, list], features: datasets.Features) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))


def _load(task, source, tmp_path, **kwargs) -> datasets.Dataset:
    return hf.load_task(task, str(source), cache_dir=str(tmp_path / "cache"), **kwargs)


def _caption(i: int, k: int) -> str:
    return " ".join(WORDS[(i * 3 + k * 5 + j) % len(WORDS)] for j in range(4 + (i + k) % 4))


# --- VQA ------------------------------------------------------------------------------------------------------------

VQAV2_FEATURES = datasets.Features({
    "question_type": datasets.Value("string"),
    "multiple_choice_answer": datasets.Value("string"),
    "answers": datasets.List({"answer": datasets.Value("string"), "answer_confidence": datasets.Value("string"),
                              "answer_id": datasets.Value("int64")}),
    "image_id": datasets.Value("int64"),
    "answer_type": datasets.Value("string"),
    "question_id": datasets.Value("int64"),
    "question": datasets.Value("string"),
    "image": datasets.Image(),
})  # fmt: skip


def _vqav2_rows(n: int) -> dict[str, list]:
    answers = [[WORDS[(i + k % 3) % len(WORDS)] for k in range(10)] for i in range(n)]
    return {"question_type": ["what color"] * n, "multiple_choice_answer": [a[0] for a in answers],
            "answers": [[{"answer": x, "answer_confidence": "yes", "answer_id": k + 1} for k, x in enumerate(a)]
                        for a in answers],
            "image_id": [1000 + i // 2 for i in range(n)], "answer_type": ["other"] * n,
            "question_id": [5000 + i for i in range(n)], "question": [f"what is shown {i} ?" for i in range(n)],
            "image": [{"bytes": _png(i // 2), "path": None} for i in range(n)]}  # fmt: skip


@pytest.fixture
def vqav2_copy(tmp_path):
    """lmms-lab/VQAv2: splits validation, testdev, test; ten answer records per question."""
    root = tmp_path / "VQAv2"
    _parquet(root / "data" / "validation-00000-of-00001.parquet", _vqav2_rows(8), VQAV2_FEATURES)
    os.makedirs(root / "data", exist_ok=True)
    for split in ("testdev", "test"):  # not parquet at all: reading them would fail
        (root / "data" / f"{split}-00000-of-00001.parquet").write_bytes(b"never read")
    return _repo(root, {"default": {s: f"data/{s}-*" for s in ("validation", "testdev", "test")}})


@pytest.mark.parametrize("limit", [None, 3])
def test_vqav2_reads_only_its_splits_files(vqav2_copy, tmp_path, limit):
    data = _load("vqav2", vqav2_copy, tmp_path, limit=limit)
    rows = _vqav2_rows(8)
    n = limit or 8
    assert len(data) == n and data.split == "validation"
    assert list(data["answers"]) == [[a["answer"] for a in r] for r in rows["answers"][:n]]
    assert list(data["answer"]) == rows["multiple_choice_answer"][:n]
    assert list(data["image_id"]) == [str(i) for i in rows["image_id"][:n]]  # int ids become strings


def test_okvqa_val2014_with_string_question_ids(tmp_path):
    """lmms-lab/OK-VQA: one split `val2014`; `question_id` a string, `answers` ten strings, no `image_id`."""
    n = 6
    features = datasets.Features({
        "question_type": datasets.Value("string"), "confidence": datasets.Value("int32"),
        "answers": datasets.List(datasets.Value("string")), "answer_type": datasets.Value("string"),
        "question_id": datasets.Value("string"), "question": datasets.Value("string"), "image": datasets.Image(),
    })  # fmt: skip
    answers = [[WORDS[(i + k // 4) % len(WORDS)] for k in range(10)] for i in range(n)]
    root = tmp_path / "OK-VQA"
    _parquet(root / "data" / "val2014-00000-of-00001.parquet", {
        "question_type": ["one"] * n, "confidence": [3] * n, "answers": answers, "answer_type": ["other"] * n,
        "question_id": [f"{2971475 + i}" for i in range(n)], "question": [f"what sport {i} ?" for i in range(n)],
        "image": [{"bytes": _png(i), "path": None} for i in range(n)],
    }, features)  # fmt: skip
    _repo(root, {"default": {"val2014": "data/val2014-*"}})
    for limit in (None, 4):
        data = _load("okvqa", root, tmp_path, limit=limit)  # the task's default split is val2014
        assert data.split == "val2014" and len(data) == (limit or n)
        assert list(data["answers"]) == answers[: len(data)] and list(data["answer"]) == [a[0] for a in answers][: len(data)]
        assert set(data["question_type"]) == {"one"}
        for i, image in enumerate(data["image"]):
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), _pixels(i))
    assert len(set(data["image_id"])) == 4  # no image_id column: distinct images get distinct ids


def test_single_answer_vqa_copy_is_refused_at_load_time(tmp_path):
    """merve/vqav2-small style: one `multiple_choice_answer` per question; the VQA metric needs ≥ 2."""
    features = datasets.Features({"multiple_choice_answer": datasets.Value("string"),
                                  "question": datasets.Value("string"), "image": datasets.Image()})
    path = tmp_path / "small" / "validation.parquet"
    _parquet(path, {"multiple_choice_answer": ["yes", "no"], "question": ["is it ?", "is it ?"],
                    "image": [{"bytes": _png(0), "path": None}] * 2}, features)  # fmt: skip
    with pytest.raises(ValueError, match=r"row 0 has 1 answer\(s\) in column 'multiple_choice_answer' \(\['yes'\]\); "
                                         r"the VQA accuracy needs at least 2 human answers .*lmms-lab/VQAv2"):
        _load("vqav2", path, tmp_path)
    assert _load("gqa", path, tmp_path)["answers"] == [["yes"], ["no"]]  # GQA scores a single answer


@pytest.fixture
def gqa_copy(tmp_path):
    """lmms-lab/GQA: questions and images in two configs of split `testdev`, joined by `imageId`."""
    root = tmp_path / "GQA"
    n = 9
    questions = datasets.Features({
        "id": datasets.Value("string"), "imageId": datasets.Value("string"), "question": datasets.Value("string"),
        "answer": datasets.Value("string"), "fullAnswer": datasets.Value("string"),
        "isBalanced": datasets.Value("bool"),
        "groups": {"global": datasets.Value("string"), "local": datasets.Value("string")},
        "entailed": datasets.List(datasets.Value("string")), "equivalent": datasets.List(datasets.Value("string")),
        "types": {"structural": datasets.Value("string"), "semantic": datasets.Value("string"),
                  "detailed": datasets.Value("string")},
        "semanticStr": datasets.Value("string"),
    })  # fmt: skip
    _parquet(root / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet", {
        "id": [f"20{i:06d}" for i in range(n)], "imageId": [f"n{161313 + (i * 2) % 5}" for i in range(n)],
        "question": [f"is the cat {WORDS[i]} ?" for i in range(n)], "answer": ["yes" if i % 2 else "no" for i in range(n)],
        "fullAnswer": ["yes, it is."] * n, "isBalanced": [True] * n, "groups": [{"global": None, "local": "10c"}] * n,
        "entailed": [[]] * n, "equivalent": [[f"20{i:06d}"] for i in range(n)],
        "types": [{"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}] * n,
        "semanticStr": ["select: cat ->verify color: red"] * n,
    }, questions)  # fmt: skip
    images = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()})
    _parquet(root / "testdev_balanced_images" / "testdev-00000-of-00001.parquet",
             {"id": [f"n{161313 + k}" for k in range(6)], "image": [{"bytes": _png(k), "path": None} for k in range(6)]},
             images)  # fmt: skip
    return _repo(root, {"testdev_balanced_images": {"testdev": "testdev_balanced_images/testdev-*"},
                        "testdev_balanced_instructions": {"testdev": "testdev_balanced_instructions/testdev-*"}})


@pytest.mark.parametrize("limit", [None, 4])
def test_gqa_joins_its_two_configs_by_image_id(gqa_copy, tmp_path, limit):
    data = _load("gqa", gqa_copy, tmp_path, limit=limit)  # default config: testdev_balanced_instructions
    n = limit or 9
    assert len(data) == n and data.split == "testdev"
    assert list(data["image_id"]) == [f"n{161313 + (i * 2) % 5}" for i in range(n)]
    assert list(data["answers"]) == [["yes" if i % 2 else "no"] for i in range(n)]
    assert set(data["question_type"]) == {"verify"}
    for i, image in enumerate(data["image"]):
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), _pixels((i * 2) % 5))
    same = _load("gqa", gqa_copy, tmp_path, limit=limit, config="testdev_balanced_instructions")
    assert list(same["question"]) == list(data["question"])


def test_gqa_image_missing_from_the_images_config_is_named(gqa_copy, tmp_path):
    images = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()})
    _parquet(os.path.join(gqa_copy, "testdev_balanced_images", "testdev-00000-of-00001.parquet"),
             {"id": ["n161313"], "image": [{"bytes": _png(0), "path": None}]}, images)
    with pytest.raises(ValueError, match=r"gqa: 4 image id\(s\) of column 'imageId' \(e.g. 'n161314'\) are not in "
                                         r"config 'testdev_balanced_images' split 'testdev'"):
        _load("gqa", gqa_copy, tmp_path)


# --- captions -------------------------------------------------------------------------------------------------------

KARPATHY_FEATURES = datasets.Features({
    "filepath": datasets.Value("string"), "sentids": datasets.List(datasets.Value("int32")),
    "filename": datasets.Value("string"), "imgid": datasets.Value("int32"), "split": datasets.Value("string"),
    "sentences": datasets.List(datasets.Value("string")), "cocoid": datasets.Value("int32"),
    "url": datasets.Value("string"),
})  # fmt: skip


def _karpathy_rows(n: int) -> dict[str, list]:
    names = [f"COCO_val2014_{391895 + i:012d}.jpg" for i in range(n)]
    return {"filepath": ["val2014"] * n, "sentids": [[5 * i + k for k in range(5)] for i in range(n)],
            "filename": names, "imgid": list(range(n)), "split": ["test"] * n,
            "sentences": [[_caption(i, k) for k in range(5)] for i in range(n)], "cocoid": [391895 + i for i in range(n)],
            "url": [f"http://images.cocodataset.org/val2014/{name}" for name in names]}  # fmt: skip


@pytest.fixture
def karpathy_copy(tmp_path):
    """yerevann/coco-karpathy: file names and URLs, no image column; images from a local COCO folder."""
    root = tmp_path / "coco-karpathy"
    rows = _karpathy_rows(6)
    _parquet(root / "data" / "test-00000-of-00001.parquet", rows, KARPATHY_FEATURES)
    _parquet(root / "data" / "train-00000-of-00001.parquet", _karpathy_rows(2), KARPATHY_FEATURES)
    coco = tmp_path / "coco"
    for i, name in enumerate(rows["filename"]):
        _save_png(coco / "val2014" / name, i)  # PNG bytes under a .jpg name: PIL reads by content
    return _repo(root, {"default": {"train": "data/train-*", "test": "data/test-*"}}), str(coco), rows


def test_coco_karpathy_images_come_from_the_local_coco_folder(karpathy_copy, tmp_path):
    copy, coco, rows = karpathy_copy
    data = _load("coco_caption", copy, tmp_path, images=coco)  # default split: test
    assert len(data) == 6 and list(data["answers"]) == rows["sentences"]
    assert list(data["image_id"]) == [str(i) for i in rows["cocoid"]]
    cells = data.cast_column("image", datasets.Image(decode=False))["image"]
    for i, cell in enumerate(cells):
        assert cell["path"] == os.path.join(coco, "val2014", rows["filename"][i])
        np.testing.assert_array_equal(_colour(cell), _pixels(i))
    flat = tmp_path / "flat"  # a folder of the files themselves, without val2014/
    for i, name in enumerate(rows["filename"][:2]):
        _save_png(flat / name, i)
    assert len(_load("coco_caption", copy, tmp_path, images=str(flat), limit=2)) == 2


def test_coco_karpathy_without_images_names_the_fix(karpathy_copy):
    copy, _, _ = karpathy_copy
    raw = datasets.load_dataset(copy, split="test")
    # As from the hub (no folder to resolve against): the file names are not images.
    with pytest.raises(ValueError, match=r"row 0: image 'val2014/COCO_val2014_000000391895.jpg' is a file name and "
                                         r"the source holds no image files: pass --images DIR"):
        hf.from_dataset("coco_caption", raw, base_dir=None)
    urls = raw.select_columns(["sentences", "cocoid", "url"])
    with pytest.raises(ValueError, match=r"holds no images, only their URLs \(column 'url'\); sparsevlm does not "
                                         r"download images: fetch them into a folder and pass --images DIR"):
        hf.from_dataset("coco_caption", urls)


def test_url_only_source_reads_the_files_the_urls_name(karpathy_copy):
    copy, coco, rows = karpathy_copy
    urls = datasets.load_dataset(copy, split="test").select_columns(["sentences", "cocoid", "url"])
    data = hf.from_dataset("coco_caption", urls, images=coco)
    paths = [c["path"] for c in data.cast_column("image", datasets.Image(decode=False))["image"]]
    assert paths == [os.path.join(coco, "val2014", name) for name in rows["filename"]]


@pytest.fixture
def flat_karpathy(tmp_path):
    """A flattened Karpathy copy: one caption per row, `sentences` a single record with `raw`, images as bytes."""
    features = datasets.Features({
        "image": datasets.Image(), "filename": datasets.Value("string"), "cocoid": datasets.Value("int32"),
        "sentences": {"tokens": datasets.List(datasets.Value("string")), "raw": datasets.Value("string"),
                      "imgid": datasets.Value("int32"), "sentid": datasets.Value("int32")},
    })  # fmt: skip
    images, per_image = 7, 5
    rows = {"image": [], "filename": [], "cocoid": [], "sentences": []}
    for i in range(images):
        for k in range(per_image):
            raw = _caption(i, k)
            rows["image"].append({"bytes": _png(i), "path": None})
            rows["filename"].append(f"COCO_val2014_{i:012d}.jpg")
            rows["cocoid"].append(100 + i)
            rows["sentences"].append({"tokens": raw.split(), "raw": raw, "imgid": i, "sentid": per_image * i + k})
    path = tmp_path / "flat" / "test.parquet"
    _parquet(path, rows, features)
    return str(path), features, rows


def test_one_caption_per_row_is_grouped_per_image(flat_karpathy, tmp_path):
    path, _, _ = flat_karpathy
    references = {str(100 + i): [_caption(i, k) for k in range(5)] for i in range(7)}
    data = _load("coco_caption", path, tmp_path)
    assert dict(zip(data["image_id"], data["answers"])) == references and len(data) == 7
    assert list(data["answer"]) == [refs[0] for refs in references.values()]
    head = _load("coco_caption", path, tmp_path, limit=3)  # a limit counts images, each with all its references
    assert dict(zip(head["image_id"], head["answers"])) == dict(list(references.items())[:3])
    train = _load("coco_caption_train", path, tmp_path)  # training: every caption is a target
    assert len(train) == 35 and list(train["answer"]) == [c for refs in references.values() for c in refs]


def test_one_caption_per_row_out_of_order_with_a_limit_is_refused(flat_karpathy, tmp_path):
    path, features, rows = flat_karpathy
    order = list(range(10)) + [0] + list(range(10, 35))  # image 100 again after image 101
    shuffled = {k: [v[i] for i in order] for k, v in rows.items()}
    _parquet(path, shuffled, features)
    with pytest.raises(ValueError, match=r"rows of image '100' are not contiguous \(row 10 comes after other images' "
                                         r"rows\).*drop the limit"):
        _load("coco_caption", path, tmp_path, limit=3)
    whole = _load("coco_caption", path, tmp_path)  # no limit: every row is read, so grouping is complete
    assert len(whole) == 7 and len(whole["answers"][0]) == 5  # the repeated row's caption is a repeat


def test_grouped_cider_d_equals_pycocoevalcap(flat_karpathy, tmp_path):
    """The COCO caption evaluation's own CIDEr-D scorer on the grouped corpus gives our score."""
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    path, _, _ = flat_karpathy
    data = _load("coco_caption", path, tmp_path)
    rng = np.random.default_rng(0)
    candidates = {image: " ".join(rng.choice(WORDS, size=5)) if n % 2 else refs[1] + " ."
                  for n, (image, refs) in enumerate(zip(data["image_id"], data["answers"]))}  # fmt: skip
    references = dict(zip(data["image_id"], data["answers"]))
    ours, per_image = cider_d(candidates, references)

    def tokens(text: str) -> str:  # what the PTB tokenizer (java) gives pycocoevalcap: lower-case words
        return " ".join(caption_tokens(text))

    theirs, per_image_theirs = cider.Cider().compute_score(
        {i: [tokens(r) for r in refs] for i, refs in references.items()}, {i: [tokens(c)] for i, c in candidates.items()})
    assert ours == pytest.approx(theirs, abs=1e-12) and ours > 0.5
    np.testing.assert_allclose([per_image[i] for i in references], per_image_theirs, atol=1e-12)
    # Per row, each row would be scored against its one caption: a different (wrong) corpus score.
    flat = _load("coco_caption_train", path, tmp_path)
    row_refs = {i: [a] for i, a in enumerate(flat["answer"])}
    row_score, _ = cider_d({i: candidates[image] for i, image in enumerate(flat["image_id"])}, row_refs)
    assert abs(row_score - ours) > 0.05


def test_nocaps_annotations_captions(tmp_path):
    """lmms-lab/NoCaps: `annotations_captions` (ten per image), `image_id` int, images as bytes."""
    n = 4
    features = datasets.Features({
        "image": datasets.Image(), "image_coco_url": datasets.Value("string"), "image_file_name": datasets.Value("string"),
        "image_id": datasets.Value("int64"), "image_open_images_id": datasets.Value("string"),
        "annotations_ids": datasets.List(datasets.Value("int64")),
        "annotations_captions": datasets.List(datasets.Value("string")),
    })  # fmt: skip
    captions = [[_caption(i, k) for k in range(10)] for i in range(n)]
    root = tmp_path / "NoCaps"
    _parquet(root / "data" / "validation-00000-of-00001.parquet", {
        "image": [{"bytes": _png(i), "path": None} for i in range(n)], "image_coco_url": [f"https://x/{i}.jpg" for i in range(n)],
        "image_file_name": [f"{i}.jpg" for i in range(n)], "image_id": list(range(n)),
        "image_open_images_id": [f"o{i}" for i in range(n)], "annotations_ids": [list(range(10))] * n,
        "annotations_captions": captions,
    }, features)  # fmt: skip
    _repo(root, {"default": {"validation": "data/validation-*"}})
    data = _load("nocaps", root, tmp_path, limit=3)
    assert list(data["answers"]) == captions[:3] and list(data["image_id"]) == ["0", "1", "2"]


@pytest.fixture
def llava_copy(tmp_path):
    """liuhaotian/LLaVA-CC3M-Pretrain-595K: `chat.json` (a JSON array of conversations) beside `metadata.json`."""
    root = tmp_path / "LLaVA-CC3M-Pretrain-595K"
    root.mkdir()
    chat = [{"id": f"GCC_train_{i:09d}", "image": f"GCC_train_{i:09d}.jpg",
             "conversations": [{"from": "human", "value": "Give a brief description of the image.\n<image>"},
                               {"from": "gpt", "value": _caption(i, 0)}]} for i in range(5)]  # fmt: skip
    (root / "chat.json").write_text(json.dumps(chat))
    metadata = [{"id": c["id"], "image": c["image"], "caption": "raw", "blip_caption": "b", "url": "u"} for c in chat]
    (root / "metadata.json").write_text(json.dumps(metadata))
    images = tmp_path / "llava_images"  # images.zip, unpacked
    for i, c in enumerate(chat):
        _save_png(images / c["image"], i)
    return root, str(images), chat


def test_llava_chat_json_assistant_turn_is_the_target(llava_copy, tmp_path):
    root, images, chat = llava_copy
    for source in (root, root / "chat.json"):  # the repo copy (chat.json picked) or the file itself
        for limit in (None, 3):
            data = _load("cc3m_instruct", source, tmp_path, images=images, limit=limit)
            n = limit or 5
            assert list(data["answer"]) == [c["conversations"][1]["value"] for c in chat[:n]]
            assert set(data["question"]) == {hf.CAPTION_PROMPT}
            for i, image in enumerate(data["image"]):
                np.testing.assert_array_equal(np.asarray(image.convert("RGB")), _pixels(i))
    for i, c in enumerate(chat):  # images next to chat.json need no --images
        _save_png(root / c["image"], i)
    assert len(_load("cc3m_instruct", root / "chat.json", tmp_path)) == 5


def test_llava_conversation_without_an_assistant_turn_is_named(llava_copy, tmp_path):
    root, images, chat = llava_copy
    chat[2]["conversations"] = chat[2]["conversations"][:1]
    (root / "chat.json").write_text(json.dumps(chat))
    with pytest.raises(ValueError, match=r"row 2: column 'conversations' holds no answers / captions"):
        _load("cc3m_instruct", root / "chat.json", tmp_path, images=images)


def test_visual_genome_parquet_route(tmp_path):
    """ranjaykrishna/visual_genome `region_descriptions_v1.2.0` converted to parquet (the README's route)."""
    region = {"region_id": datasets.Value("int32"), "image_id": datasets.Value("int32"), "phrase": datasets.Value("string"),
              "x": datasets.Value("int32"), "y": datasets.Value("int32"), "width": datasets.Value("int32"),
              "height": datasets.Value("int32")}  # fmt: skip
    features = datasets.Features({
        "image": datasets.Image(), "image_id": datasets.Value("int32"), "url": datasets.Value("string"),
        "width": datasets.Value("int32"), "height": datasets.Value("int32"), "coco_id": datasets.Value("int64"),
        "flickr_id": datasets.Value("int64"), "regions": datasets.List(region),
    })  # fmt: skip
    n = 4
    regions = [[{"region_id": 10 * i + k, "image_id": i, "phrase": _caption(i, k), "x": 0, "y": 0, "width": 3,
                 "height": 3} for k in range(3)] for i in range(n)]  # fmt: skip
    root = tmp_path / "vg"
    _parquet(root / "region_descriptions_v1.2.0" / "train-00000-of-00001.parquet", {
        "image": [{"bytes": _png(i), "path": None} for i in range(n)], "image_id": list(range(1, n + 1)),
        "url": [f"https://cs.stanford.edu/VG_100K/{i}.jpg" for i in range(n)], "width": [10] * n, "height": [8] * n,
        "coco_id": [None] * n, "flickr_id": [None] * n, "regions": regions,
    }, features)  # fmt: skip
    _repo(root, {"region_descriptions_v1.2.0": {"train": "region_descriptions_v1.2.0/train-*"}})
    data = _load("visual_genome", root, tmp_path, config="region_descriptions_v1.2.0", limit=3, seed=1)
    phrases = [[r["phrase"] for r in rs] for rs in regions[:3]]
    assert list(data["answers"]) == phrases
    assert [q + a for q, a in zip(data["question"], data["answer"])] == [p[0] for p in phrases]


def test_loading_script_repo_is_refused_with_the_parquet_copies(tmp_path):
    """HuggingFaceM4/VQAv2 and ranjaykrishna/visual_genome are loading scripts, which `datasets` 5 refuses."""
    root = tmp_path / "VQAv2"
    root.mkdir()
    (root / "VQAv2.py").write_text("import datasets\n")
    with pytest.raises(ValueError, match=rf"source {re.escape(repr(str(root)))} is a loading-script dataset, which "
                                         r"datasets .* refuses: use a parquet copy \(tested: .*lmms-lab/VQAv2"):
        _load("vqav2", root, tmp_path)


def test_local_single_file_takes_no_config(flat_karpathy, tmp_path):
    with pytest.raises(ValueError, match=r"config='x': the local source .* is a single data set \(one file\)"):
        _load("coco_caption", flat_karpathy[0], tmp_path, config="x")


# --- through the command line ---------------------------------------------------------------------------------------


def test_hub_copies_evaluate_through_the_cli(tiny_bundle, vqav2_copy, gqa_copy, karpathy_copy, flat_karpathy, tmp_path):
    """`sparsevlm evaluate` on the copies: the config and image-folder flags reach the loader, scores are the metric's."""
    from sparsevlm.checkpoint import save_model
    from sparsevlm.cli import main
    from sparsevlm.eval.metrics import gqa_accuracy, vqa_score

    model = str(save_model(tmp_path / "model", tiny_bundle))
    copy, coco, rows = karpathy_copy
    runs = {"vqav2": ["--task", "vqav2", "--data", str(vqav2_copy)],
            "gqa": ["--task", "gqa", "--data", gqa_copy, "--dataset-config", "testdev_balanced_instructions"],
            "karpathy": ["--task", "coco_caption", "--data", copy, "--images", coco, "--streaming"],
            "flat": ["--task", "coco_caption", "--data", flat_karpathy[0]]}  # fmt: skip
    results = {}
    for name, argv in runs.items():
        out = tmp_path / f"{name}.json"
        assert main(["evaluate", "--model", model, *argv, "--limit", "4", "--max-new-tokens", "3", "--batch-size", "4",
                     "--json", str(out)]) == 0  # fmt: skip
        results[name] = json.loads(out.read_text())
    vqa = results["vqav2"]  # the default split, ten answers per question, scored by the VQA metric
    assert (vqa["metric"], vqa["n"], vqa["split"]) == ("vqa_accuracy", 4, "validation")
    assert all(len(r["references"]) == 10 for r in vqa["predictions"])
    assert vqa["score"] == pytest.approx(vqa_score([r["prediction"] for r in vqa["predictions"]],
                                                   [r["references"] for r in vqa["predictions"]]))
    gqa = results["gqa"]
    assert (gqa["metric"], gqa["n"], gqa["split"]) == ("gqa_accuracy", 4, "testdev")
    assert gqa["score"] == pytest.approx(gqa_accuracy([r["prediction"] for r in gqa["predictions"]],
                                                      [r["references"][0] for r in gqa["predictions"]]))
    karpathy = results["karpathy"]
    assert (karpathy["metric"], karpathy["n"], karpathy["split"]) == ("cider_d", 4, "test")
    assert [r["references"] for r in karpathy["predictions"]] == rows["sentences"][:4]
    flat = results["flat"]  # 4 images (20 rows), each scored against its 5 references
    assert flat["n"] == 4 and all(len(r["references"]) == 5 for r in flat["predictions"])
    for result in (karpathy, flat):
        rows_ = result["predictions"]
        expected, _ = cider_d({r["image_id"]: r["prediction"] for r in rows_}, {r["image_id"]: r["references"] for r in rows_})
        assert result["score"] == pytest.approx(expected)
