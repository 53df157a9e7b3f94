"""LoRA / SparseLoRA: effective kernels, merge invariants, training touches only the factors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsevlm.config import LoraConfig, RestoreConfig, SparsitySpec
from sparsevlm.data.batch import iterate_batches
from sparsevlm.data.examples import load_examples
from sparsevlm.lora import adapter_variables, effective_kernel, init_lora, lora_scope, lora_targets, merge
from sparsevlm.losses import distillation_kl
from sparsevlm.models.vlm import VLM
from sparsevlm.pruning import prune
from sparsevlm.restoration import restore
from sparsevlm.train import TrainState, batch_arrays, make_train_step, restoration_loss
from sparsevlm.tree import flatten, unflatten


@pytest.fixture(scope="module")
def pruned(tiny_bundle):
    return prune(tiny_bundle.params, tiny_bundle.config, SparsitySpec.same(0.5), "magnitude")


@pytest.fixture(scope="module")
def trained_lora(tiny_bundle):
    """LoRA factors with non-zero B, as after some training."""
    lora = init_lora(tiny_bundle.params, LoraConfig(), jax.random.key(1))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32), lora)


@pytest.fixture(scope="module")
def batch(tiny_bundle):
    data = load_examples("shapes-mix", tiny_bundle.tokenizer, 6)
    out, _ = next(iterate_batches(data, 4, 24, tiny_bundle.tokenizer.pad_token_id, tiny_bundle.config.vision))
    return batch_arrays(out)


def test_factors_follow_the_paper_shapes_and_init(tiny_bundle):
    lora = init_lora(tiny_bundle.params, LoraConfig(), jax.random.key(0))
    flat = flatten(lora)
    q = "language/blocks_0/attn/q/kernel"
    fan_in, fan_out = flatten(tiny_bundle.params)[q].shape
    assert flat[f"{q}/a"].shape == (8, fan_in) and flat[f"{q}/b"].shape == (fan_out, 8)
    assert flat["vision/blocks_0/mlp/up/kernel/a"].shape[0] == 4 and flat["connector/up/kernel/a"].shape[0] == 2
    assert all((v == 0).all() for p, v in flat.items() if p.endswith("/b"))
    assert all(np.abs(v).max() <= 1 / np.sqrt(v.shape[1]) for p, v in flat.items() if p.endswith("/a"))
    targets = lora_targets(tiny_bundle.params, LoraConfig())
    assert not any("embed" in p or "lm_head" in p or "norm" in p for p in targets)


def test_sparselora_merge_keeps_exactly_the_mask(tiny_bundle, pruned, trained_lora):
    alpha = 16.0
    merged = flatten(merge(tiny_bundle.params, trained_lora, pruned.masks, alpha, "sparselora"))
    base, factors = flatten(tiny_bundle.params), flatten(trained_lora)
    masks = {p: m for p, m in flatten(pruned.masks).items() if m is not None}
    for path, mask in masks.items():
        a, b = factors[f"{path}/a"], factors[f"{path}/b"]
        want = base[path] + (alpha / a.shape[0]) * (b @ a).T
        assert (merged[path][~mask] == 0).all(), path
        np.testing.assert_allclose(merged[path][mask], want[mask], rtol=1e-6, atol=1e-6, err_msg=path)
    lora_merged = flatten(merge(tiny_bundle.params, trained_lora, pruned.masks, alpha, "lora"))
    lost = [(lora_merged[p][~m] != 0).mean() for p, m in masks.items()]
    assert min(lost) > 0.99  # the pruned positions are dense again


def test_scoped_forward_equals_the_merged_model(tiny_bundle, pruned, trained_lora, batch):
    model = VLM(tiny_bundle.config)
    args = (batch["images"], batch["tokens"], batch["text_mask"])
    for mode in ("lora", "sparselora"):
        with lora_scope(16.0, mode):
            scoped, _ = model.apply(adapter_variables(tiny_bundle.params, trained_lora, pruned.masks), *args)
        merged, _ = model.apply({"params": merge(tiny_bundle.params, trained_lora, pruned.masks, 16.0, mode)}, *args)
        np.testing.assert_allclose(np.asarray(scoped), np.asarray(merged), rtol=1e-5, atol=1e-5)


def test_training_moves_only_the_factors(tiny_bundle, pruned, batch):
    model = VLM(tiny_bundle.config)
    optimizer = optax.adamw(1e-2)
    lora = init_lora(tiny_bundle.params, LoraConfig(), jax.random.key(0))
    step = make_train_step(restoration_loss(model, 16.0, "sparselora", kl_weight=0.1, temperature=1.0), optimizer)
    params = jax.tree.map(np.array, tiny_bundle.params)
    masks = jax.tree.map(np.array, pruned.masks)
    before_params, before_masks = jax.tree.map(np.copy, params), jax.tree.map(np.copy, masks)
    state = TrainState(lora, optimizer.init(lora), jnp.zeros((), jnp.int32))
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch, params, masks)
        losses.append(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, params, before_params)
    jax.tree.map(np.testing.assert_array_equal, masks, before_masks)
    moved = [float(np.abs(v).max()) for p, v in flatten(state.params).items() if p.endswith("/b")]
    assert min(moved) > 0 and losses[-1] < losses[0]
    # The optimizer state holds moments for the LoRA factors only.
    leaves = jax.tree.leaves(state.opt_state)
    assert sum(x.size for x in leaves) == 1 + 2 * sum(x.size for x in jax.tree.leaves(state.params))


def test_zero_kl_weight_is_plain_cross_entropy(tiny_bundle, pruned, batch):
    model = VLM(tiny_bundle.config)
    optimizer = optax.sgd(0.0)
    lora = init_lora(tiny_bundle.params, LoraConfig(), jax.random.key(0))
    state = TrainState(lora, optimizer.init(lora), jnp.zeros((), jnp.int32))
    _, without = make_train_step(restoration_loss(model, 16.0, "sparselora", 0.0, 1.0), optimizer)(
        state, batch, tiny_bundle.params, pruned.masks)
    _, with_kl = make_train_step(restoration_loss(model, 16.0, "sparselora", 0.5, 2.0), optimizer)(
        state, batch, tiny_bundle.params, pruned.masks)
    assert float(without["loss"]) == float(without["ce"]) and float(without["kl"]) == 0.0
    assert float(with_kl["ce"]) == pytest.approx(float(without["ce"]), rel=1e-6)
    # The pruned student differs from the dense teacher, so the KL term is positive.
    assert float(with_kl["kl"]) > 0
    assert float(with_kl["loss"]) == pytest.approx(0.5 * float(with_kl["ce"]) + 0.5 * float(with_kl["kl"]), rel=1e-5)


def test_kl_matches_numpy():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 5, 7)), rng.normal(size=(2, 5, 7)) * 2
    mask = rng.random((2, 5)) > 0.3
    temperature = 1.7

    def log_softmax(x):
        x = x / temperature
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p_t = np.exp(log_softmax(teacher))
    want = (p_t * (log_softmax(teacher) - log_softmax(student))).sum(-1)[mask].sum()
    total, count = distillation_kl(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
                                   jnp.asarray(mask), temperature)
    assert float(total) == pytest.approx(want, rel=1e-5) and int(count) == mask.sum() and want > 0
    same, _ = distillation_kl(jnp.asarray(teacher), jnp.asarray(teacher), jnp.asarray(mask), temperature)
    assert abs(float(same)) < 1e-5


def test_bad_lora_input_is_a_clear_error(tiny_bundle, pruned):
    with pytest.raises(ValueError, match="LoRA rank 0 .* must be a positive integer"):
        LoraConfig(language_rank=0)
    with pytest.raises(ValueError, match=r"LoRA target pattern .*attn/qkv/kernel' matches no kernel"):
        init_lora(tiny_bundle.params, LoraConfig(targets=((r"language/blocks_\d+/attn/qkv/kernel", 8),)), jax.random.key(0))
    with pytest.raises(ValueError, match="mode 'dora'"):
        effective_kernel(jnp.ones((2, 2)), None, None, 16.0, "dora")
    flat = dict(flatten(pruned.masks))
    path = "language/blocks_0/attn/q/kernel"
    flat[path] = flat[path][:-1]
    with pytest.raises(ValueError, match=f"mask for {path} has shape"):
        restore(tiny_bundle.params, unflatten(flat), tiny_bundle.config, tiny_bundle.tokenizer, RestoreConfig(steps=2, warmup_steps=0), progress=False)


def test_non_finite_loss_stops_with_the_step(tiny_bundle, pruned):
    broken = dict(flatten(tiny_bundle.params))
    broken["language/norm/scale"] = np.full_like(broken["language/norm/scale"], np.nan)
    config = RestoreConfig(train_data="shapes-mix", steps=3, warmup_steps=0, batch_size=4, train_images=8)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 0 \(micro-batch 0\)"):
        restore(unflatten(broken), pruned.masks, tiny_bundle.config, tiny_bundle.tokenizer, config, progress=False)


def test_restore_config_rejects_bad_values():
    for kwargs, message in [
        ({"method": "dora"}, "method='dora'"),
        ({"kl_weight": 1.5}, "kl_weight=1.5"),
        ({"temperature": 0.0}, "temperature=0.0"),
    ]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(RestoreConfig(), **kwargs)
    with pytest.raises(ValueError, match="language_rank=-1"):
        dataclasses.replace(RestoreConfig(), lora=LoraConfig(language_rank=-1))


def test_bf16_and_gradient_accumulation_train_and_keep_the_pattern(tiny_bundle, pruned, tmp_path):
    config = RestoreConfig(train_data="shapes-mix", steps=2, warmup_steps=0, batch_size=4, grad_accum=2, train_images=8, bf16=True,
                           checkpoint_every=1)
    result = restore(tiny_bundle.params, pruned.masks, tiny_bundle.config, tiny_bundle.tokenizer, config,
                     checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert [h["micro_step"] for h in result.history] == [0, 3]  # 2 optimizer steps × 2 micro-batches
    assert all(np.isfinite(h["loss"]) for h in result.history)
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(result.lora))
    masks = {p: m for p, m in flatten(pruned.masks).items() if m is not None}
    merged = flatten(result.params)
    assert all((merged[p][~m] == 0).all() for p, m in masks.items())
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [1, 2]


def test_divergence_stops_training_and_keeps_only_finite_checkpoints(tiny_bundle, pruned, tmp_path):
    config = RestoreConfig(train_data="shapes-mix", steps=40, warmup_steps=0, batch_size=4, train_images=8, learning_rate=1e30,
                           grad_clip=1e30, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step \d+ .*the last good checkpoint is step \d+"):
        restore(tiny_bundle.params, pruned.masks, tiny_bundle.config, tiny_bundle.tokenizer, config,
                checkpoint_dir=tmp_path / "ckpt", progress=False)
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("state", "meta"))
    step = manager.latest_step()
    assert step is not None and step < 40
    saved = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(saved))
