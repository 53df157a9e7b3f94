"""Scenes VQA: seeding, split disjointness, and every answer re-derived from the scene's pixels and geometry.

The property tests re-state the rules independently of the generator: visibility from an id buffer
(the last object painting each pixel), relations from the centroids of the objects' silhouette
masks, "in the box" from the silhouette pixels against the box's inner and outer squares.
"""

from __future__ import annotations

import dataclasses
import re

import datasets
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsevlm.data import scenes
from sparsevlm.data.batch import decode_image
from sparsevlm.data.builtin import model_task, task_module
from sparsevlm.data.shapes import COLORS
from sparsevlm.data.tasks import BUILTIN_SETS, builtin_set, parse_data_spec

GRID = 64  # the generator's geometry grid


def _coords(size: int = GRID) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size) + 0.5) / size
    return np.meshgrid(c, c, indexing="ij")


def _id_buffer(scene: scenes.Scene, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    top = np.full(yy.shape, -1)
    for i, obj in enumerate(scene.objects):
        top[scenes.painted(obj, yy, xx)] = i
    return top


def _centroid(obj: scenes.SceneObject) -> np.ndarray:
    yy, xx = _coords(256)
    mask = scenes.silhouette(obj, yy, xx)
    return np.array([xx[mask].mean(), yy[mask].mean()])


def _in_box_by_pixels(scene: scenes.Scene, obj: scenes.SceneObject) -> bool | None:
    """True: every silhouette pixel inside the box's inner square; False: none within its outer square; else None."""
    box = scene.box
    yy, xx = _coords(256)
    mask = scenes.silhouette(obj, yy, xx)
    offset = np.maximum(np.abs(xx - box.x), np.abs(yy - box.y))[mask]
    if (offset < box.size - scenes.LINE).all():
        return True
    if (offset > box.size).all():
        return False
    return None


def _referent(scene: scenes.Scene, color: str, kind: str) -> scenes.SceneObject:
    matches = [o for o in scene.shapes if o.color == color and o.kind == kind]
    assert len(matches) == 1, f"'the {color} {kind}' names {len(matches)} objects"
    return matches[0]


def _assert_distractor(scene: scenes.Scene, anchor: scenes.SceneObject, answer: str) -> None:
    """A shape of another kind than the answer, besides the anchor, so "the other shape" is no answer."""
    assert any(o.kind != answer for o in scene.shapes if o is not anchor)


def _check_answer(scene: scenes.Scene, qtype: str, question: str, answer: str) -> None:
    words = question.split()
    if qtype == "count":  # how many circles are there ?
        assert scenes.NUMBERS.index(answer) == sum(o.kind == words[2][:-1] for o in scene.shapes)
    elif qtype == "color":  # what color is the circle ?
        matches = [o for o in scene.shapes if o.kind == words[4]]
        assert len(matches) == 1 and matches[0].color == answer
    elif qtype == "style":  # what style is the red circle ?
        assert _referent(scene, words[4], words[5]).style == answer
    elif qtype == "relation":  # what shape is left of the red circle ?
        match = re.fullmatch(r"what shape is (left of|right of|above|below) the (\w+) (\w+) \?", question)
        anchor = _referent(scene, *match.group(2, 3))
        ax, ay = _centroid(anchor)
        deltas = {o: {"left of": ax - x, "right of": x - ax, "above": ay - y, "below": y - ay}[match.group(1)]
                  for o in scene.shapes if o is not anchor for x, y in [_centroid(o)]}
        # Exactly one shape is on that side; every other clearly is not. The centroids move at most 0.2 r
        # (triangles) from the centres the margin is measured on.
        on_side = [o for o, d in deltas.items() if d > 0]
        assert len(on_side) == 1 and on_side[0].kind == answer
        assert all(abs(d) >= scenes.RELATION_MARGIN - 0.1 for d in deltas.values())
        _assert_distractor(scene, anchor, answer)
    elif qtype == "nearest":  # what shape is nearest to the red circle ?
        anchor = _referent(scene, words[6], words[7])
        distances = sorted((np.hypot(o.x - anchor.x, o.y - anchor.y), o.kind) for o in scene.shapes if o is not anchor)
        assert distances[0][1] == answer
        assert len(distances) == 1 or distances[1][0] - distances[0][0] >= scenes.NEAREST_MARGIN
        _assert_distractor(scene, anchor, answer)
    elif qtype == "inside":  # how many circles / shapes are in the box ?
        assert scene.box is not None
        where = [_in_box_by_pixels(scene, o) for o in scene.shapes]
        assert None not in where, "a shape straddles the box"
        kind = words[2][:-1]
        inside = [o for o, w in zip(scene.shapes, where) if w and (kind == "shape" or o.kind == kind)]
        assert scenes.NUMBERS.index(answer) == len(inside)
    else:
        pytest.fail(f"unexpected question type {qtype}")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_every_answer_follows_from_the_scene(seed):
    rng = np.random.default_rng(seed)
    scene = scenes.sample_scene(rng)
    assert 2 <= len(scene.shapes) <= 4 and sum(o.kind == scenes.BOX for o in scene.objects) <= 1
    assert scenes.Scene.from_key(scene.key) == scene
    # Visibility rule: at least MIN_VISIBLE of every shape's silhouette (the box: of its outline) lies
    # outside every later shape's silhouette, so each object counts and shows its shape.
    yy, xx = _coords()
    for i, obj in enumerate(scene.objects):
        own = scenes.painted(obj, yy, xx) if obj.kind == scenes.BOX else scenes.silhouette(obj, yy, xx)
        covered = np.zeros_like(own)
        for later in scene.objects[i + 1:]:
            covered |= scenes.silhouette(later, yy, xx)
        assert own.sum() > 0 and (own & ~covered).sum() / own.sum() >= scenes.MIN_VISIBLE
    asked = scenes.questions(scene, rng)
    assert len({q for q, _, _ in asked}) == len(asked)
    vocabulary = set(scenes.vocabulary())
    for qtype, question, answer in asked:
        _check_answer(scene, qtype, question, answer)
        assert set(question.split()) | {answer} <= vocabulary
    assert set(scene.caption().split()) <= vocabulary


def test_objects_span_patches_off_grid_with_every_style():
    found = [scenes.sample_scene(np.random.default_rng(i)) for i in range(150)]
    shapes = [o for s in found for o in s.shapes]
    diameters = np.array([2 * o.size * 64 for o in shapes])  # px of the 64-px image, patches of 16
    assert diameters.min() >= 15 and diameters.max() > 29 and np.mean(diameters > 25) > 0.2  # 0.95–1.9 patches
    assert {o.style for o in shapes} == set(scenes.STYLES)
    centres = np.array([(o.x, o.y) for o in shapes]) * 4  # in patch units
    assert np.std(centres % 1) > 0.25  # not aligned to the patch grid
    assert 0.35 < np.mean([s.box is not None for s in found]) < 0.65
    overlapped = [min(scenes.visible_fractions(s)) < 0.99 for s in found]
    assert np.mean(overlapped) > 0.2  # occlusion is common


def test_same_seed_same_data_different_seed_different_data():
    a, b, c = (scenes.build_split("validation", 5, seed=s) for s in (3, 3, 4))
    assert list(a["question"]) == list(b["question"]) and list(a["answer"]) == list(b["answer"])
    bytes_of = lambda d: [r["bytes"] for r in d.cast_column("image", datasets.Image(decode=False))["image"]]  # noqa: E731
    assert bytes_of(a) == bytes_of(b)
    assert list(a["scene"]) != list(c["scene"])
    assert a.features == task_module("shapes").features()


def test_splits_are_disjoint_and_each_scene_hashes_to_its_split():
    keys = {s: set(scenes.build_split(s, 40 if s == "train" else 8)["scene"]) for s in scenes.SPLITS}
    assert not keys["train"] & keys["test"] and not keys["validation"] & keys["test"]
    for split, found in keys.items():
        assert all(scenes.scene_split(scenes.Scene.from_key(k)) == split for k in found)


def test_question_types_answers_and_captions():
    data = scenes.build_split("train", 120)
    types, answers = np.array(data["question_type"]), np.array(data["answer"])
    assert set(types) == set(scenes.QUESTION_TYPES)
    assert len(set(answers[types == "count"])) >= 3
    assert set(answers[types == "nearest"]) == set(answers[types == "relation"]) == set(scenes.SHAPES)
    view = scenes.captioning_view(data)
    assert len(view) == len(set(data["image_id"])) and set(view["question_type"]) == {"caption"}
    assert all(answer == caption for answer, caption in zip(view["answer"], view["caption"]))


def test_image_shows_each_object_in_its_colour():
    data = scenes.build_split("test", 6)
    for row in data.select(np.unique(np.array(data["image_id"]), return_index=True)[1]):
        image = decode_image(row["image"]).astype(float)
        assert image.shape == (64, 64, 3)
        scene = scenes.Scene.from_key(row["scene"])
        yy, xx = _coords(64)
        top = _id_buffer(scene, yy, xx)
        for i, obj in enumerate(scene.objects):
            pixels = image[top == i]
            if len(pixels) >= 4:
                distance = np.linalg.norm(pixels - np.array(COLORS[obj.color]), axis=1)
                assert np.median(distance) < 80, obj


def test_probe_labels_name_the_top_object_at_each_patch_centre():
    scene = scenes.Scene((scenes.SceneObject("square", "red", "filled", 0.5, 0.5, 0.3),
                          scenes.SceneObject("circle", "blue", "striped", 0.6, 0.6, 0.12)))
    labels = scenes.probe_labels(scene.key, 6)
    assert all(v.shape == (36,) for v in labels.values())
    grid = {k: v.reshape(6, 6) for k, v in labels.items()}
    assert grid["shape"][0, 0] == 0 and grid["color"][0, 0] == 0  # background
    assert grid["shape"][2, 2] == scenes.SHAPES.index("square") + 1
    assert grid["shape"][3, 3] == scenes.SHAPES.index("circle") + 1  # the circle is painted over the square
    assert grid["style"][3, 3] == scenes.STYLES.index("striped") + 1
    # Object-level labels: every patch of an object carries its centre's eighth of the image side (both
    # centres, 0.5 and 0.6, are in the fifth), and the patch holding a shape's centre names its kind:
    # both centres fall in patch (3, 3), where the later (top) shape wins.
    assert grid["x"][1, 1] == grid["y"][1, 1] == 5 and grid["x"][3, 3] == grid["y"][3, 3] == 5
    assert grid["x"][0, 0] == grid["y"][0, 0] == 0
    assert grid["centre"][3, 3] == scenes.SHAPES.index("circle") + 1 and np.count_nonzero(grid["centre"]) == 1
    far = scenes.Scene((scenes.SceneObject("triangle", "red", "filled", 0.9, 0.1, 0.1),))
    assert scenes.probe_labels(far.key, 6)["x"].reshape(6, 6)[0, 5] == 8  # the last eighth
    classes = scenes.probe_classes(6)
    assert all(labels[k].max() < classes[k] for k in classes)


def test_data_names_select_the_scenes_task():
    assert {"scenes-captions", "scenes-vqa", "scenes-mix"} <= set(BUILTIN_SETS)
    assert BUILTIN_SETS[0] == "shapes-captions"  # the studies' default calibration set
    assert parse_data_spec("scenes-mix") == ("scenes-mix", None) and builtin_set("scenes-vqa") == ("scenes", "vqa")
    assert task_module("scenes") is scenes
    with pytest.raises(ValueError, match="allowed: shapes, scenes"):
        task_module("squares")
    assert model_task({"pretrain": {"task": "scenes"}}) == "scenes" and model_task({}) == "shapes"


def test_load_examples_reads_scenes_sets():
    from sparsevlm.data.examples import load_examples
    from sparsevlm.data.tokenize import build_word_tokenizer

    tokenizer = build_word_tokenizer(scenes.vocabulary())
    captions = load_examples("scenes-captions", tokenizer, 4)
    mix = load_examples("scenes-mix", tokenizer, 4)
    assert len(captions) == 4 and len(mix) > len(captions)
    assert tokenizer.unk_token_id not in {t for ids, _ in mix.sequences for t in ids}


def test_invalid_split_and_size_are_named():
    with pytest.raises(ValueError, match="scenes-VQA split"):
        scenes.build_split("dev", 2)
    with pytest.raises(ValueError, match="num_images=0"):
        scenes.build_split("test", 0)
    with pytest.raises(ValueError, match="unknown object kind"):
        scenes.silhouette(dataclasses.replace(scenes.SceneObject.from_key("circle:red:filled:0.5:0.5:0.1"),
                                              kind="star"), *_coords(8))


def test_a_built_in_model_rejects_the_other_tasks_sets():
    from sparsevlm.data.examples import load_examples
    from sparsevlm.data.tokenize import build_word_tokenizer

    with pytest.raises(ValueError, match="pretrained on scenes VQA .* use scenes-captions"):
        load_examples("shapes-captions", build_word_tokenizer(scenes.vocabulary()), 4)
    with pytest.raises(ValueError, match="pretrained on shapes VQA"):
        load_examples("scenes-vqa", build_word_tokenizer(task_module("shapes").vocabulary()), 4)
