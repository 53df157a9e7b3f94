"""The scenes model: its architecture gives the vision tower a third or more of the prunable weights, its
recipe and cache never collide with the shapes default, and its vision stage has a head per patch label."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sparsevlm import hub
from sparsevlm.config import PretrainConfig, VisionConfig, builtin_vlm_config, default_vlm_config, pretrain_preset
from sparsevlm.data import scenes
from sparsevlm.data.builtin import data_fingerprint
from sparsevlm.masks import prunable_paths
from sparsevlm.models.vlm import VLM
from sparsevlm.pretrain import CellProbe
from sparsevlm.tree import flatten


def _prunable_by_tower(config) -> dict[str, int]:
    model, side = VLM(config), config.vision.image_size
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, side, side, 3), np.float32),
                                               np.ones((1, 4), np.int32), np.ones((1, 4), bool)))["params"]
    flat = flatten(shapes)
    totals: dict[str, int] = {}
    for path in prunable_paths(shapes):
        tower = path.split("/")[0]
        totals[tower] = totals.get(tower, 0) + int(np.prod(flat[path].shape))
    return totals


def test_scenes_vision_tower_holds_at_least_a_third_of_the_prunable_weights():
    vocab = len(scenes.vocabulary()) + 4
    config = builtin_vlm_config("scenes", vocab)
    assert config.vision.num_patches == 16 and config.vision.patch_size == 16  # objects span 2-3 patches
    totals = _prunable_by_tower(config)
    assert totals["vision"] / sum(totals.values()) >= 1 / 3
    assert builtin_vlm_config("shapes", vocab) == default_vlm_config(vocab)  # the shapes default is unchanged


def test_recipes_and_cache_directories_are_kept_apart(monkeypatch, tmp_path):
    assert pretrain_preset("shapes") == PretrainConfig()
    assert pretrain_preset("scenes").task == "scenes"
    with pytest.raises(ValueError, match="task='squares' is not supported"):
        PretrainConfig(task="squares")
    monkeypatch.setenv("SPARSEVLM_HOME", str(tmp_path))
    assert hub.default_model_dir() == tmp_path / "default"
    assert hub.default_model_dir("scenes") == tmp_path / "scenes"
    assert "scenes" in hub.BUILTIN_MODELS
    with pytest.raises(ValueError, match="not a built-in model"):
        hub.default_model_dir("squares")


def test_scenes_vision_stage_has_one_head_per_patch_label():
    # The training loop is the one shapes uses (tests/test_pretrain.py trains it); here the scenes probe's
    # heads and grid must fit the tower's 4x4 patches and the labels' classes, checked from shapes alone.
    config = VisionConfig(image_size=64, patch_size=16, width=32, depth=1, num_heads=2, mlp_dim=64)
    grid = scenes.probe_grid(config.image_size // config.patch_size)
    classes = scenes.probe_classes(grid)
    probe = CellProbe(config, grid, tuple(classes.items()))
    out = jax.eval_shape(lambda: probe.apply(probe.init(jax.random.key(0), np.zeros((2, 64, 64, 3), np.float32)),
                                             np.zeros((2, 64, 64, 3), np.float32)))
    assert {k: v.shape for k, v in out.items()} == {k: (2, 16, n) for k, n in classes.items()}
    scene = scenes.sample_scene(np.random.default_rng(0))
    labels = scenes.probe_labels(scene.key, grid)
    assert all(labels[k].shape == (16,) and labels[k].max() < n for k, n in classes.items())


def test_a_cached_built_in_model_of_another_recipe_is_retrained(monkeypatch, tiny_bundle):
    import dataclasses

    import sparsevlm.pretrain
    from sparsevlm.bundle import ModelBundle
    from sparsevlm.checkpoint import save_model

    trained = []
    monkeypatch.setattr(sparsevlm.pretrain, "pretrain", lambda recipe, path, progress: trained.append(recipe))

    def cache(name: str, recipe: dict, data: str | None = None) -> None:
        # data: the generator fingerprint recorded (None: today's; "": none, as models before the record)
        data = data_fingerprint(hub.BUILTIN_MODEL_TASKS[name]) if data is None else data
        metadata = {"pretrain": recipe} | ({"data": data} if data else {})
        bundle = ModelBundle(tiny_bundle.config, tiny_bundle.params, tiny_bundle.tokenizer, metadata)
        save_model(hub.default_model_dir(name), bundle, overwrite=True)

    scenes_recipe = pretrain_preset("scenes")
    cache("scenes", dataclasses.asdict(scenes_recipe) | {"eval_every": 500})
    hub.ensure_default_model(progress=False, name="scenes")
    assert trained == []  # today's recipe (validated as it ran, which does not change the model): kept
    # Saved before a field existed: the field counts at its default (the shapes recipe does not change).
    older = {k: v for k, v in dataclasses.asdict(pretrain_preset("shapes")).items() if k != "freeze_vision"}
    cache("default", older)
    hub.ensure_default_model(progress=False)
    assert trained == []
    # The scenes model of an earlier recipe (a trainable tower, fewer steps) is trained again.
    cache("scenes", {k: v for k, v in dataclasses.asdict(scenes_recipe).items() if k != "freeze_vision"} | {"steps": 650})
    hub.ensure_default_model(progress=False, name="scenes")
    assert trained == [scenes_recipe]
    assert hub.saved_recipe(hub.default_model_dir("scenes")) == dataclasses.replace(
        scenes_recipe, steps=650, freeze_vision=False)
    # Today's recipe on data its task no longer generates (or a model that does not record its data) too.
    for data in ("0" * 16, ""):
        cache("scenes", dataclasses.asdict(scenes_recipe), data)
        hub.ensure_default_model(progress=False, name="scenes")
    assert trained == [scenes_recipe] * 3


def test_the_data_fingerprint_covers_the_vision_stage_targets(monkeypatch):
    before = data_fingerprint("scenes", 2)
    original = scenes.probe_labels
    extra = {"extra": np.zeros(16, np.int32)}
    monkeypatch.setattr(scenes, "probe_labels", lambda key, grid: original(key, grid) | extra)
    data_fingerprint.cache_clear()
    try:
        assert data_fingerprint("scenes", 2) != before
    finally:
        monkeypatch.undo()
        data_fingerprint.cache_clear()
    assert data_fingerprint("scenes", 2) == before
