"""The paper's studies end to end (quick budgets) on a briefly trained default-architecture model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reproduce_quick_writes_every_study(trained_model_dir, tmp_path, script):
    # In this process (the script's own code path from its `main`): no second interpreter, JAX start-up
    # or recompilation of what the other tests compiled already.
    reproduce = script(ROOT / "experiments", "reproduce")
    reproduce.main(["--quick", "--model", trained_model_dir, "--out", str(tmp_path), "--seeds", "0"])
    for stem in ("split_sweep", "modality", "restoration"):
        for suffix in (".json", ".md", ".png"):
            assert (tmp_path / f"{stem}{suffix}").stat().st_size > 0, stem + suffix
    sweep = json.loads((tmp_path / "split_sweep.json").read_text())["rows"]
    assert all(abs(r["vision"] + r["language"] - r["total"]) < 1e-9 for r in sweep)
    assert all(abs(r["measured"]["vision"] - r["vision"]) < 0.01 for r in sweep)
    modality = json.loads((tmp_path / "modality.json").read_text())["rows"]
    only_language = [r for r in modality if r["setting"] == "language only"]
    assert only_language and all(r["measured"]["vision"] == 0.0 for r in only_language)
    # Every other registered pruner at every level; ECoFLaP (one budget over both towers) at unstructured
    # levels only. --quick runs them on both towers only.
    pruners = {(r["pruner"], r["setting"], r["level"]) for r in modality if r["pruner"] != "wanda"}
    assert pruners == {(p, "both", lv) for p in ("magnitude", "random", "sparsegpt", "dsnot") for lv in ("50%", "2:4")
                       } | {("ecoflap", "both", "50%")}
    assert [r["pruner"] for r in modality if r["setting"] == "both" and r["level"] == "2:4"] == [
        "wanda", "magnitude", "random", "sparsegpt", "dsnot"]
    assert {(r["setting"], r["level"]) for r in modality if r["pruner"] == "wanda"} == {
        (s, lv) for s in ("both", "language only", "vision only") for lv in ("50%", "2:4")}
    ecoflap = next(r for r in modality if r["pruner"] == "ecoflap" and r["setting"] == "both")
    measured = ecoflap["measured"]
    assert measured["vision"] != measured["language"]
    assert "| dsnot | both |" in (tmp_path / "modality.md").read_text()
    rows = json.loads((tmp_path / "restoration.json").read_text())["rows"]
    by = {(r["setting"], r["pruner"], r["variant"]): r for r in rows}
    for setting in ("2:4", "70%"):
        target = by[(setting, "wanda", "pruned")]["measured"]
        # SparseLoRA and remasked LoRA keep the pruned sparsity exactly; plain LoRA loses it.
        for variant in ("SparseLoRA", "SparseLoRA + KL", "LoRA + remask"):
            assert by[(setting, "wanda", variant)]["measured"] == target, (setting, variant)
        assert by[(setting, "wanda", "LoRA")]["measured"]["language"] < 0.01
    # --quick restores the other pruners at 70% only; SparseLoRA keeps their patterns too.
    for pruner in ("dsnot", "ecoflap"):
        assert by[("70%", pruner, "SparseLoRA + KL")]["measured"] == by[("70%", pruner, "pruned")]["measured"]
        assert ("2:4", pruner, "pruned") not in by
    assert "## restoration" in (tmp_path / "reproduce.md").read_text()


@pytest.mark.slow
def test_split_sweep_over_seeds_is_the_mean_of_each_seeds_run(trained_model_dir, tmp_path, script):
    sweep = script(ROOT / "experiments", "split_sweep")
    common = ["--quick", "--model", trained_model_dir, "--totals", "1.0", "--eval-images", "24"]
    sweep.main([*common, "--seeds", "0", "3", "--out", str(tmp_path / "both")])
    sweep.main([*common, "--seeds", "3", "--out", str(tmp_path / "one")])
    both = json.loads((tmp_path / "both" / "split_sweep.json").read_text())["rows"]
    alone = json.loads((tmp_path / "one" / "split_sweep.json").read_text())["rows"]
    assert [r["vision"] for r in both] == [r["vision"] for r in alone] == [0.1, 0.5, 0.9]
    for merged, single in zip(both, alone):
        assert merged["seeds"] == [0, 3] and single["seeds"] == [3]
        # Seed 3's run inside the pair is the same prune as seed 3's run alone (one model, seeded calibration).
        assert merged["accuracies"][1] == single["accuracy"]
        assert merged["accuracy"] == pytest.approx(np.mean(merged["accuracies"]))
        assert merged["accuracy_std"] == pytest.approx(np.std(merged["accuracies"], ddof=1))
    table = (tmp_path / "both" / "split_sweep.md").read_text()
    assert "mean ± sample sd over seeds 0, 3" in table
    assert f"{both[0]['accuracy']:.4f} ± {both[0]['accuracy_std']:.4f}" in table
    with pytest.raises(SystemExit):
        sweep.main([*common, "--seeds", "1", "1", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_rows_merge_over_seeds_only_where_their_settings_agree(script):
    common = script(ROOT / "experiments", "common")
    restoration = script(ROOT / "experiments", "restoration")

    def row(accuracy, vision=0.5, measured=0.5):
        return {"vision": vision, "accuracy": accuracy, "measured": {"vision": measured}, "train_seconds": 2.0}

    merged = common.merge_seeds([[row(0.6), row(0.8, 0.9)], [row(0.7, measured=0.7), row(0.5, 0.9)]], [0, 1])
    assert [m["accuracy"] for m in merged] == pytest.approx([0.65, 0.65])
    assert merged[0]["accuracy_std"] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    assert merged[0]["measured"] == {"vision": pytest.approx(0.6)} and merged[1]["accuracies"] == [0.8, 0.5]
    assert common.with_spread(merged[0]) == "0.6500 ± 0.0707"
    assert common.with_spread(common.merge_seeds([[row(0.6)]], [4])[0]) == 0.6
    assert common.seeds_note(merged) == "mean ± sample sd over seeds 0, 1"
    with pytest.raises(ValueError, match="differ between seeds .* in \\['vision'\\]"):
        common.merge_seeds([[row(0.6)], [row(0.6, vision=0.4)]], [0, 1])
    with pytest.raises(ValueError, match="different numbers of rows"):
        common.merge_seeds([[row(0.6)], []], [0, 1])
    # A restoration gain is paired seed by seed: its spread is the gains', not the accuracies'.
    restored = common.merge_seeds([[row(0.70)], [row(0.90)]], [0, 1])[0]
    pruned = common.merge_seeds([[row(0.60)], [row(0.80)]], [0, 1])[0]
    assert restoration.gain(restored, pruned) == "+0.1000 ± 0.0000"


@pytest.mark.slow
def test_calibration_mode_quick_compares_both_modes_for_both_methods(trained_model_dir, tmp_path, script):
    study = script(ROOT / "experiments", "calibration_mode")
    study.main(["--quick", "--model", trained_model_dir, "--eval-images", "8", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "calibration_mode.json").read_text())
    rows = {(r["method"], r["setting"], r["mode"]): r for r in payload["rows"]}
    assert set(rows) == {(m, s, mode) for m in ("wanda", "sparsegpt") for s in study.SPECS
                         for mode in ("sequential", "dense")}
    for (method, setting, mode), row in rows.items():
        assert 0.0 <= row["accuracy"] <= 1.0
        measured, spec = row["measured"], study.SPECS[setting]
        assert abs(measured["language"] - spec.language) < 0.01, (method, setting, mode)
        assert abs(measured["vision"] - spec.vision) < 0.01, (method, setting, mode)
    table = (tmp_path / "calibration_mode.md").read_text()
    assert table.count("\n| wanda |") == table.count("\n| sparsegpt |") == len(study.SPECS)


@pytest.mark.slow
def test_dsnot_error_quick_guard_never_raises_a_layers_squared_error(trained_model_dir, tmp_path, script):
    study = script(ROOT / "experiments", "dsnot_error")
    study.main(["--quick", "--model", trained_model_dir, "--out", str(tmp_path)])
    rows = {(r["setting"], r["variant"]): r for r in json.loads((tmp_path / "dsnot_error.json").read_text())["rows"]}
    assert set(rows) == {(s, v) for s in study.SETTINGS for v in study.VARIANTS}
    for (setting, variant), row in rows.items():
        assert row["layers"] == len(row["per_layer"]) > 0
        # Every swap lowers its row's |expected error|; with the guard, none raises its squared error.
        assert row["expected_ratio_max"] <= 1 + 1e-4
        if variant == "DSnoT + guard":
            assert row["squared_ratio_max"] <= 1 + 1e-4, setting
    assert (tmp_path / "dsnot_error.png").stat().st_size > 0


def test_scenes_lm_stage_object_tokens_put_each_objects_attributes_at_its_centre(script):
    study = script(ROOT / "experiments", "scenes_lm_stage")
    from sparsevlm.data import scenes

    box = scenes.SceneObject("box", "green", "outlined", 0.4, 0.4, 0.35)
    inside = scenes.SceneObject("circle", "red", "striped", 0.3, 0.45, 0.12)
    outside = scenes.SceneObject("square", "blue", "filled", 0.88, 0.1, 0.1)
    scene = scenes.Scene((box, inside, outside))
    tokens = study.object_tokens(scene.key, 4, 128)
    colors, bins = list(scenes.COLORS), scenes.POSITION_BINS
    kinds = len(scenes.SHAPES) + 1
    offsets = np.cumsum([0, len(colors), kinds, len(scenes.STYLES), bins, bins])

    def expected(obj, in_box):
        hot = [colors.index(obj.color), (*scenes.SHAPES, "box").index(obj.kind), scenes.STYLES.index(obj.style),
               int(obj.x * bins), int(obj.y * bins), in_box]
        return sorted(int(o + h) for o, h in zip(offsets, hot))

    # The box's centre (0.4, 0.4) and the circle's (0.3, 0.45) share patch (1, 1): their one-hots add up.
    shared = np.zeros(128)
    shared[expected(box, 0)] += 1
    shared[expected(inside, 1)] += 1
    np.testing.assert_array_equal(tokens[5], shared)
    assert sorted(np.flatnonzero(tokens[3])) == expected(outside, 0)
    assert set(np.flatnonzero(tokens.sum(axis=1))) == {5, 3}
    # With relations: each shape's next shape per side and nearest (left, right, above, below, nearest),
    # 0 for none, after the attributes; the box has none.
    related = study.object_tokens(scene.key, 4, 128, related=True)
    start, groups = offsets[-1] + 2, len(study.RELATED_LABELS)
    none, square, circle = 0, scenes.SHAPES.index("square") + 1, scenes.SHAPES.index("circle") + 1
    side = lambda labels: [start + kinds * g + k for g, k in enumerate(labels)]  # noqa: E731
    assert sorted(np.flatnonzero(related[3])) == expected(outside, 0) + side([circle, none, none, circle, circle])
    np.testing.assert_array_equal(related[5, :start], shared[:start])
    np.testing.assert_array_equal(related[5, start:start + kinds * groups],
                                  np.bincount(side([none, square, square, none, square]) + side([none] * groups),
                                              minlength=start + kinds * groups)[start:])
    # Cell tokens: one one-hot per vision-stage target in every patch.
    cell = study.cell_tokens(scene.key, 4, 128)
    assert (cell.sum(axis=1) == len(scenes.probe_classes(4))).all()


def test_scenes_lm_stage_relational_labels_name_the_next_shape_on_each_side(script):
    study = script(ROOT / "experiments", "scenes_lm_stage")
    from sparsevlm.data import scenes

    circle, square, diamond = (scenes.SceneObject(kind, "red", "filled", x, 0.6, 0.1)
                               for kind, x in (("circle", 0.1), ("square", 0.35), ("diamond", 0.85)))
    scene = scenes.Scene((circle, square, diamond))
    label = {name: {obj.kind: study._related_kind(scene, obj, relation) for obj in scene.shapes}
             for name, relation in study.RELATED_LABELS.items()}
    kind = {name: scenes.SHAPES.index(name) + 1 for name in scenes.SHAPES}
    assert label["left"] == {"circle": 0, "square": kind["circle"], "diamond": kind["square"]}  # the next one
    assert label["right"] == {"circle": kind["square"], "square": kind["diamond"], "diamond": 0}
    assert set(label["above"].values()) == set(label["below"].values()) == {0}  # one row: within the margin
    assert label["nearest"] == {"circle": kind["square"], "square": kind["circle"], "diamond": kind["square"]}
    # Where a relation question is asked (one shape on that side), the label is its answer.
    asked = scenes.related_shape(scene, "left of", square)
    assert asked is circle and label["left"]["square"] == kind[asked.kind]
    assert scenes.related_shape(scene, "left of", diamond) is None  # two on its left


def test_scenes_lm_stage_conversations_hold_every_question_of_an_image_once(script):
    study = script(ROOT / "experiments", "scenes_lm_stage")
    from sparsevlm.data import scenes
    from sparsevlm.data.batch import encode_vqa, pack_by_image
    from sparsevlm.data.tokenize import build_word_tokenizer

    tokenizer = build_word_tokenizer(scenes.vocabulary())
    pool = encode_vqa(scenes.build_split("train", 4), tokenizer, with_targets=True)
    turns = pack_by_image(pool).groups
    assert len(turns) == len(pool.images) and sorted(np.concatenate(turns)) == list(range(len(pool)))
    assert all((pool.image_index[t] == image).all() for image, t in enumerate(turns))
    features = np.arange(len(pool.images), dtype=np.float32)[:, None, None] * np.ones((1, 16, 8), np.float32)
    rows = study.conversation_from(pool, features, turns, np.array([2, 0]), 96, tokenizer.pad_token_id,
                                   np.random.default_rng(0))
    bos = tokenizer.bos_token_id
    for row, image in enumerate([2, 0]):
        ids = rows["tokens"][row][rows["text_mask"][row]]
        assert ids[0] == bos and (ids == bos).sum() == 1  # one BOS, then every question of the image
        targets = [pool.sequences[e][0][pool.sequences[e][1]:] for e in turns[image]]  # answer + EOS per turn
        assert rows["loss_mask"][row].sum() == sum(len(t) for t in targets)
        answered = rows["tokens"][row][rows["loss_mask"][row]]
        assert sorted(answered.tolist()) == sorted(sum(targets, []))
        assert len(ids) == sum(len(pool.sequences[e][0]) for e in turns[image]) - (len(turns[image]) - 1)
        assert (rows["x"][row] == image).all()
    with pytest.raises(ValueError, match="does not fit length=8"):
        study.conversation_from(pool, features, turns, np.array([0]), 8, tokenizer.pad_token_id,
                                np.random.default_rng(0))


def test_scenes_lm_stage_from_tower_features_is_the_whole_forward(script):
    study = script(ROOT / "experiments", "scenes_lm_stage")
    import jax

    from sparsevlm.config import scenes_vlm_config
    from sparsevlm.data import scenes
    from sparsevlm.data.batch import encode_vqa
    from sparsevlm.data.tokenize import build_word_tokenizer
    from sparsevlm.models.vlm import VLM

    tokenizer = build_word_tokenizer(scenes.vocabulary())
    model = VLM(scenes_vlm_config(len(tokenizer)))
    pool = encode_vqa(scenes.build_split("train", 3), tokenizer, with_targets=True)
    batch = pool.collate(np.arange(4), 16, tokenizer.pad_token_id, model.config.vision)
    params = model.init(jax.random.key(0), batch.images, batch.tokens, batch.text_mask)["params"]
    features = study.tower_features(model, params, pool.images)
    rows = study.batch_from(pool, features, np.arange(4), 16, tokenizer.pad_token_id, model.config.vision)
    split = study.lm_stage_logits(model)(params, rows)
    whole, _ = model.apply({"params": params}, batch.images, batch.tokens, batch.text_mask,
                           target_mask=batch.loss_mask)
    np.testing.assert_allclose(np.asarray(split), np.asarray(whole[:, -16:]), rtol=1e-5, atol=1e-5)

    # Packed rows (an image's questions sharing its tokens) train on the same per-question losses.
    from sparsevlm.data.batch import pack_by_image
    from sparsevlm.losses import token_cross_entropy

    packed = pack_by_image(pool)
    rows = study.batch_from(packed, features, np.arange(len(packed)), 64, tokenizer.pad_token_id, model.config.vision)
    total, count = token_cross_entropy(study.lm_stage_logits(model)(params, rows), rows["tokens"], rows["loss_mask"])
    alone = study.batch_from(pool, features, np.arange(len(pool)), 16, tokenizer.pad_token_id, model.config.vision)
    want, want_count = token_cross_entropy(study.lm_stage_logits(model)(params, alone), alone["tokens"],
                                           alone["loss_mask"])
    assert int(count) == int(want_count) > len(pool)
    np.testing.assert_allclose(float(total), float(want), rtol=1e-5)


@pytest.mark.slow
def test_scenes_lm_stage_quick_scores_the_tower_in_both_shared_layouts(tmp_path, script):
    study = script(ROOT / "experiments", "scenes_lm_stage")
    # Perfect tokens (cells, objects, relations) are tested as arrays above; here the tower, in both shared layouts.
    study.main(["--quick", "--features", "tower", "--layouts", "multi-turn", "packed", "--out", str(tmp_path)])
    rows = {(r["features"], r["layout"]): r for r in json.loads((tmp_path / "scenes_lm_stage.json").read_text())["rows"]}
    assert set(rows) == {("tower", "multi-turn"), ("tower", "packed")}
    assert len({r["n"] for r in rows.values()}) == 1 and rows["tower", "packed"]["n"] > 0
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and np.isfinite(row["final_loss"])
        assert set(row["by_type"]) <= set(study.TYPES)
        # Both layouts put an image's 1-5 questions in a row: more questions than rows per batch.
        assert row["batch_size"] < row["questions_per_step"] <= 5 * row["batch_size"]
    # A packed batch fills a single-question batch's positions (32 rows of 16 text + 16 image tokens).
    assert rows["tower", "packed"]["batch_size"] == 32 * 32 // (64 + 16)
    # A greedy exact match starts with the right answer word: never above the answer-word accuracy.
    for layout in ("multi-turn", "packed"):
        assert rows["tower", layout]["greedy_accuracy"] <= rows["tower", layout]["accuracy"] + 1e-9
    assert (tmp_path / "scenes_lm_stage.png").stat().st_size > 0


def test_a_study_of_a_scenes_model_uses_its_tasks_data_and_scores_dense_on_its_own_test_set(
        scenes_model_dir, tmp_path, script):
    common = script(ROOT / "experiments", "common")
    sweep = script(ROOT / "experiments", "split_sweep")
    flags = ["--quick", "--model", scenes_model_dir, "--eval-images", "6", "--seeds", "0"]
    parser = argparse.ArgumentParser()
    common.add_arguments(parser)
    study = common.load_study(parser.parse_args(flags))
    assert study.settings["calib_data"] == "scenes-captions"
    assert common.own_set(study.bundle.metadata, "mix") == "scenes-mix"
    dense = study.pipeline.evaluate(study.bundle)["accuracy"]
    sweep.main([*flags, "--totals", "1.0", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "split_sweep.json").read_text())
    assert payload["dense_accuracy"] == dense != 0.5
    assert f"dense accuracy {dense:.4f}" in (tmp_path / "split_sweep.md").read_text()
    # Data of the other built-in task is refused by name (the model's tokenizer lacks its words).
    with pytest.raises(ValueError, match="use scenes-captions"):
        sweep.main([*flags, "--totals", "1.0", "--calib-data", "shapes-captions", "--out", str(tmp_path / "bad")])
