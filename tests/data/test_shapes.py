"""Shapes VQA: determinism, split disjointness, answers re-derived from the scene, tokenizer coverage."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from sparsevlm.data import shapes
from sparsevlm.data.batch import decode_image, encode_vqa


def _parse(scene_key: str) -> list[tuple[int, str, str]]:
    return [(int(c), color, shape) for c, color, shape in (part.split(":") for part in scene_key.split(";"))]


def test_same_seed_same_data_different_seed_different_data():
    a = shapes.build_split("validation", 20, seed=3)
    b = shapes.build_split("validation", 20, seed=3)
    c = shapes.build_split("validation", 20, seed=4)
    assert list(a["question"]) == list(b["question"]) and list(a["answer"]) == list(b["answer"])
    image_a = [r["bytes"] for r in a.cast_column("image", datasets.Image(decode=False))["image"]]
    image_b = [r["bytes"] for r in b.cast_column("image", datasets.Image(decode=False))["image"]]
    assert image_a == image_b
    assert list(a["scene"]) != list(c["scene"])


def test_splits_are_disjoint_by_scene_and_image():
    keys = {s: set(shapes.build_split(s, 300 if s == "train" else 150)["scene"]) for s in shapes.SPLITS}
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    for split, scenes in keys.items():
        assert all(shapes.scene_split(shapes.Scene(tuple(shapes.ShapeObject(*o) for o in _parse(k)))) == split
                   for k in scenes)


def test_answers_follow_from_the_scene(test_split):
    for row in test_split:
        objects = _parse(row["scene"])
        q, a, kind = row["question"], row["answer"], row["question_type"]
        if kind == "count":
            shape = q.split()[2][:-1]  # "how many circles are there ?"
            assert shapes.NUMBERS.index(a) == sum(o[2] == shape for o in objects)
        elif kind == "color":
            shape = q.split()[4]
            matches = [o for o in objects if o[2] == shape]
            assert len(matches) == 1 and matches[0][1] == a
        elif kind == "shape":
            position = q[len("what shape is at the ") : -2]
            cell = shapes.POSITIONS.index(position)
            assert [o[2] for o in objects if o[0] == cell] == [a]
        elif kind == "exist":
            color, shape = q.split()[3:5]
            assert a == ("yes" if any(o[1] == color and o[2] == shape for o in objects) else "no")
        else:
            pytest.fail(f"unexpected question type {kind}")
        assert 1 <= len(objects) <= 4 and len({o[0] for o in objects}) == len(objects)


def test_question_types_and_answers_are_balanced_enough():
    data = shapes.build_split("train", 400)
    types = np.array(data["question_type"])
    answers = np.array(data["answer"])
    assert set(types) == set(shapes.QUESTION_TYPES)
    exist = answers[types == "exist"]
    assert 0.4 < np.mean(exist == "yes") < 0.6
    assert {"zero", "one", "two", "three"} <= set(answers[types == "count"])


def test_images_show_the_scene_colours(test_split):
    row = test_split[0]
    image = decode_image(row["image"])
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    # every object's colour is present in its grid cell
    for cell, color, _ in _parse(row["scene"]):
        r, c = divmod(cell, shapes.GRID)
        patch = image[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16].reshape(-1, 3).astype(float)
        distance = np.linalg.norm(patch - np.array(shapes.COLORS[color]), axis=1)
        assert (distance < 45).sum() >= 20


def test_tokenizer_covers_every_generated_word(tokenizer, test_split):
    unk = tokenizer.unk_token_id
    for text in list(test_split["question"]) + list(test_split["answer"]) + list(test_split["caption"]):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert unk not in ids
        assert tokenizer.decode(ids) == text
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2, 3]


def test_captioning_view_has_one_row_per_image(test_split):
    view = shapes.captioning_view(test_split)
    assert len(view) == len(set(test_split["image_id"]))
    assert all(q == shapes.CAPTION_PROMPT for q in view["question"])
    assert list(view["answer"]) == list(view["caption"])


def test_encoded_set_shares_decoded_images(tokenizer, test_split):
    encoded = encode_vqa(test_split, tokenizer, with_targets=True)
    assert encoded.images.shape[0] == len(set(test_split["image_id"]))
    assert len(encoded) == len(test_split)
    ids, n_prompt = encoded.sequences[0]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]) == test_split[0]["answer"]


def test_bad_split_is_a_clear_error():
    with pytest.raises(ValueError, match="split='dev' is not a shapes-VQA split"):
        shapes.build_split("dev", 3)
