"""The default-model recipe: grid pooling, vision-tower pretraining, and a short end-to-end pretrain."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from sparsevlm import pretrain as pretrain_module
from sparsevlm.checkpoint import load_model_dir
from sparsevlm.config import PretrainConfig
from sparsevlm.data import shapes
from sparsevlm.data.batch import PackedSet, encode_vqa
from sparsevlm.eval.evaluate import evaluate_vqa
from sparsevlm.pretrain import frozen_tower, initialise, pool_to_grid, pretrain, pretrain_vision
from sparsevlm.train import TrainState, batch_arrays, lm_loss, make_optimizer, make_train_step
from sparsevlm.tree import flatten
from tests.conftest import Killed, tiny_config


def test_pool_to_grid_averages_each_cell():
    features = np.arange(36, dtype=np.float32).reshape(1, 36, 1)  # a 6x6 patch grid
    pooled = np.asarray(pool_to_grid(features, 3))[0, :, 0]
    grid = np.arange(36).reshape(6, 6)
    want = [grid[r * 2 : r * 2 + 2, c * 2 : c * 2 + 2].mean() for r in range(3) for c in range(3)]
    np.testing.assert_allclose(pooled, want)
    with pytest.raises(ValueError, match="do not tile a 3x3 grid"):
        pool_to_grid(np.zeros((1, 16, 2), np.float32), 3)


def test_cell_labels_follow_the_scene_key():
    colors, kinds = shapes.cell_labels("0:red:circle;8:blue:diamond")
    assert colors[0] == list(shapes.COLORS).index("red") + 1 and kinds[8] == shapes.SHAPES.index("diamond") + 1
    assert (colors[1:8] == 0).all() and (kinds[1:8] == 0).all()


def test_vision_pretraining_learns_cell_attributes(tokenizer):
    data = shapes.captioning_view(shapes.build_split("train", 300))
    encoded = encode_vqa(data, tokenizer, with_targets=True)
    config = tiny_config(len(tokenizer)).vision
    params, accuracy = pretrain_vision(config, encoded.images, list(data["scene"]), 150, 64, 0, progress=False)
    assert set(params) >= {"patch_embed", "pos_embed", "blocks_0"}
    # empty cells alone are ~2/3 of cells, so the bars sit above that; cell index chance is 1/9
    assert accuracy["color"] > 0.9 and accuracy["shape"] > 0.8 and accuracy["cell"] > 0.5


def test_a_frozen_tower_stays_bit_for_bit_while_the_rest_trains():
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    params = {name: {"kernel": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)} for name in ("vision", "language")}

    def loss_fn(params, batch):
        out = batch["x"] @ params["vision"]["kernel"] @ params["language"]["kernel"]
        return jnp.mean((out - batch["y"]) ** 2), {}

    # Weight decay on: a zero gradient alone would still shrink the tower.
    loss, optimizer = frozen_tower(loss_fn, make_optimizer(1e-2, 1e-3, 0, 5, 0.5, 1.0), params, "vision")
    grads = jax.grad(lambda p: loss(p, {"x": jnp.ones((2, 4)), "y": jnp.zeros((2, 4))})[0])(params)
    assert float(jnp.abs(grads["vision"]["kernel"]).max()) == 0.0  # no backward pass into the tower
    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
    step = make_train_step(loss, optimizer)
    for _ in range(5):
        state, _ = step(state, {"x": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "y": jnp.zeros((8, 4))})
    assert np.array_equal(state.params["vision"]["kernel"], params["vision"]["kernel"])
    assert not np.allclose(state.params["language"]["kernel"], params["language"]["kernel"])


@pytest.mark.slow
def test_short_pretrain_lowers_loss_saves_the_model_and_resumes_after_a_kill(tokenizer, tmp_path, kill_after_checkpoint):
    config = PretrainConfig(
        # Vision pretraining has its own test above: a short stage 1 here only checks that it runs and is skipped
        # on resume.
        steps=150, warmup_steps=20, learning_rate=3e-3, train_images=300, vision_steps=20, batch_size=16,
        checkpoint_every=50,
    )
    model_config = dataclasses.replace(tiny_config(len(tokenizer)))
    bundle = pretrain(config, tmp_path / "m", model_config=model_config, eval_images=24, progress=False,
                      checkpoint_dir=tmp_path / "m-checkpoints")
    history = bundle.metadata["loss_history"]
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    loaded = load_model_dir(tmp_path / "m")
    assert loaded.metadata["test_accuracy"] == bundle.metadata["test_accuracy"]
    # The recorded accuracy is the saved model's on the same test questions.
    test = shapes.build_split("test", 24, image_size=model_config.vision.image_size)
    assert evaluate_vqa(loaded, test, progress=False)["accuracy"] == bundle.metadata["test_accuracy"]
    # Killed right after its second checkpoint (step 100), then run again: it resumes there (params,
    # AdamW moments, both data streams' positions and the shared generator) and ends where the
    # uninterrupted run did, bit for bit.
    kill_after_checkpoint(2)
    with pytest.raises(Killed):
        pretrain(config, tmp_path / "k", model_config=model_config, eval_images=24, progress=False,
                 checkpoint_dir=tmp_path / "k-checkpoints")
    assert not (tmp_path / "k").exists()
    assert sorted(p.name for p in (tmp_path / "k-checkpoints").iterdir() if p.name.isdigit()) == ["100", "50"]
    resumed = pretrain(config, tmp_path / "k", model_config=model_config, eval_images=24, progress=False,
                       checkpoint_dir=tmp_path / "k-checkpoints")
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(flatten(bundle.params).values(),
                                                         flatten(resumed.params).values())) == 0.0
    assert resumed.metadata["loss_history"] == history
    assert resumed.metadata["test_accuracy"] == bundle.metadata["test_accuracy"]


class _Recorded(Exception):
    """Stops `pretrain` once its batch mixture is built."""


@pytest.mark.parametrize("caption_weight, expected", [(None, "by size"), (0.0, [1.0, 0.0]), (0.25, [0.75, 0.25])])
def test_caption_weight_sets_the_share_of_caption_batches(monkeypatch, caption_weight, expected):
    seen = {}

    class Recording(pretrain_module.MixedStream):
        def __init__(self, streams, weights, rng):
            super().__init__(streams, weights, rng)
            seen["sizes"], seen["probabilities"] = [len(s.data) for s in streams], list(self.probabilities)
            raise _Recorded

    monkeypatch.setattr(pretrain_module, "MixedStream", Recording)
    with pytest.raises(_Recorded):
        pretrain_module.pretrain(PretrainConfig(steps=2, warmup_steps=0, batch_size=4, train_images=20,
                                                vision_steps=0, caption_weight=caption_weight), progress=False)
    questions, captions = seen["sizes"]
    if expected == "by size":
        expected = [questions / (questions + captions), captions / (questions + captions)]
    np.testing.assert_allclose(seen["probabilities"], expected)


def test_packed_questions_train_on_the_losses_of_rows_of_their_own(monkeypatch, tokenizer):
    seen = {}

    class Recording(pretrain_module.MixedStream):
        def __init__(self, streams, weights, rng):
            seen["streams"] = streams
            raise _Recorded

    monkeypatch.setattr(pretrain_module, "MixedStream", Recording)
    with pytest.raises(_Recorded):
        pretrain_module.pretrain(PretrainConfig(steps=2, warmup_steps=0, batch_size=4, train_images=20,
                                                vision_steps=0, pack_questions=True), progress=False)
    questions, captions = (stream.data for stream in seen["streams"])
    assert isinstance(questions, PackedSet) and isinstance(captions, PackedSet)
    assert len(questions) == len(captions) == 20  # one unit per image
    packed = seen["streams"][0].example()
    assert packed.segments.max() >= 2 and packed.tokens.shape[1] == seen["streams"][0].length
    config = tiny_config(len(tokenizer))
    model, params = pretrain_module.VLM(config), _vlm_params(config)
    alone = questions.data.collate(np.concatenate(questions.groups[:4]), 16, tokenizer.pad_token_id, config.vision)
    loss, metrics = lm_loss(model)(params, batch_arrays(packed))
    want, want_metrics = lm_loss(model)(params, batch_arrays(alone))
    assert float(metrics["tokens"]) == float(want_metrics["tokens"]) > 4
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("bad", [1.0, -0.1])
def test_caption_weight_outside_0_1_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=rf"caption_weight={bad}"):
        PretrainConfig(caption_weight=bad)


def _vlm_params(config):
    model = pretrain_module.VLM(config)
    images = np.zeros((1, config.vision.image_size, config.vision.image_size, 3), np.float32)
    tokens = np.zeros((1, 8), np.int32)
    return model.init(jax.random.key(0), images, tokens, np.ones((1, 8), bool))["params"]


def test_fan_in_init_redraws_every_linear_kernel_at_one_over_sqrt_fan_in():
    params = _vlm_params(tiny_config(64))
    assert initialise(params, "normal", jax.random.key(1)) is params
    drawn = flatten(initialise(params, "fan-in", jax.random.key(1)))
    kernels = 0
    for name, before in flatten(params).items():
        after = np.asarray(drawn[name])
        assert after.shape == before.shape and after.dtype == before.dtype
        if name.endswith("kernel") and before.ndim == 2:
            kernels += 1
            # 0.02 under the modules' own init; 1/sqrt(32..64) = 0.125..0.177 here.
            assert after.std() == pytest.approx(1 / np.sqrt(before.shape[0]), rel=0.25), name
            assert abs(after.mean()) < 5 * after.std() / np.sqrt(after.size)  # zero-mean
        else:
            np.testing.assert_array_equal(after, np.asarray(before), err_msg=name)
    assert kernels >= 20  # vision, connector and language blocks all redrawn
    again = flatten(initialise(params, "fan-in", jax.random.key(1)))
    assert all(np.array_equal(again[k], drawn[k]) for k in drawn)  # a function of the key alone


def test_an_unknown_init_scheme_is_refused_by_name():
    with pytest.raises(ValueError, match="init='xavier'"):
        initialise({}, "xavier", jax.random.key(0))
    with pytest.raises(ValueError, match="xavier"):
        PretrainConfig(init="xavier")


def test_pretrain_starts_from_the_recipes_init(monkeypatch):
    seen = {}
    real = pretrain_module.initialise

    def recording(params, scheme, key):
        seen["scheme"], seen["params"] = scheme, real(params, scheme, key)
        raise _Recorded

    monkeypatch.setattr(pretrain_module, "initialise", recording)
    with pytest.raises(_Recorded):
        pretrain_module.pretrain(PretrainConfig(steps=2, warmup_steps=0, batch_size=4, train_images=20,
                                                vision_steps=0, init="fan-in"), progress=False)
    assert seen["scheme"] == "fan-in"
    kernel = np.asarray(seen["params"]["language"]["blocks_0"]["mlp"]["up"]["kernel"])
    assert kernel.std() == pytest.approx(1 / np.sqrt(kernel.shape[0]), rel=0.1)
