"""Scale features of the restoration step: scanned stacks, block remat, packed masks, chunked vocabulary losses."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsevlm.config import REMAT_MODES, LoraConfig, SparsitySpec
from sparsevlm.data.batch import iterate_batches
from sparsevlm.data.examples import load_examples
from sparsevlm.lora import init_lora
from sparsevlm.losses import distillation_kl, token_cross_entropy, vocab_losses
from sparsevlm.masks import pack_mask, pack_masks, unpack_mask
from sparsevlm.models.stages import stack_layers, unstack_layers
from sparsevlm.models.vlm import VLM, scan_stacks
from sparsevlm.pruning import prune
from sparsevlm.restoration import step_inputs
from sparsevlm.train import batch_arrays, restoration_loss
from sparsevlm.tree import flatten


@pytest.fixture(scope="module")
def setup(tiny_bundle):
    pruned = prune(tiny_bundle.params, tiny_bundle.config, SparsitySpec.same(0.5), "magnitude")
    lora = init_lora(tiny_bundle.params, LoraConfig(), jax.random.key(1))
    rng = np.random.default_rng(0)
    lora = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32), lora)
    data = load_examples("shapes-mix", tiny_bundle.tokenizer, 6)
    batch, _ = next(iterate_batches(data, 4, 24, tiny_bundle.tokenizer.pad_token_id, tiny_bundle.config.vision))
    return tiny_bundle, pruned.masks, lora, batch_arrays(batch)


def _rel(got, want):
    """Relative difference of two trees, as one vector each."""
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(got)])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(want)])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def loss_and_grads(model, lora, batch, params, masks, **kwargs):
    loss_fn = restoration_loss(model, 16.0, "sparselora", 0.1, 1.0, **kwargs)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(lora, batch, params, masks)
    return float(loss), metrics, grads


@pytest.mark.parametrize("remat", REMAT_MODES)
@pytest.mark.parametrize("scan", [False, True])
def test_scan_and_remat_give_todays_loss_and_gradients(setup, scan, remat):
    bundle, masks, lora, batch = setup
    want_loss, want_metrics, want_grads = loss_and_grads(VLM(bundle.config), lora, batch, bundle.params, masks)
    stacks = scan_stacks(bundle.config) if scan else {}
    params, packed, stacked_lora = step_inputs(bundle.params, masks, lora, stacks)
    model = VLM(bundle.config, scan_layers=scan, remat=remat)
    loss, metrics, grads = loss_and_grads(model, stacked_lora, batch, params, packed)
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
    assert abs(float(metrics["kl"]) - float(want_metrics["kl"])) <= 1e-5 * abs(float(want_metrics["kl"])) + 1e-7
    grads = unstack_layers(grads, stacks)
    assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
    assert _rel(grads, want_grads) <= 1e-5


def test_scanned_model_initialises_to_the_stacked_layout(tiny_bundle):
    config = tiny_bundle.config
    stacks = scan_stacks(config)
    assert stacks == {"vision/blocks": config.vision.blocks_used, "language/blocks": config.language.depth}
    args = (np.zeros((1, 48, 48, 3), np.float32), np.ones((1, 4), np.int32), np.ones((1, 4), bool))
    scanned = jax.eval_shape(lambda: VLM(config, scan_layers=True).init(jax.random.key(0), *args)["params"])
    want = jax.tree.map(lambda x: (x.shape, x.dtype), stack_layers(tiny_bundle.params, stacks))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), scanned) == want
    assert flatten(unstack_layers(stack_layers(tiny_bundle.params, stacks), stacks)).keys() == \
        flatten(tiny_bundle.params).keys()


def test_stacking_refuses_uneven_layers_and_fills_masks(tiny_bundle):
    stacks = scan_stacks(tiny_bundle.config)
    lora = init_lora(tiny_bundle.params, LoraConfig(targets=((r"language/blocks_0/attn/q/kernel", 2),)),
                     jax.random.key(0))
    with pytest.raises(ValueError, match=r"cannot stack language/blocks_N/attn/q/kernel/a: layers \[1\]"):
        stack_layers(lora, stacks)
    kernel = np.ones((3, 5), np.float32)
    masks = {"language": {"blocks_0": {"k": kernel > 0}, "blocks_1": {"k": None}}}
    with pytest.raises(ValueError, match="some layers have it as None"):
        stack_layers(masks, {"language/blocks": 2})
    filled = stack_layers(masks, {"language/blocks": 2}, fill=lambda m: np.ones(m.shape, bool))
    assert filled["language"]["blocks"]["k"].shape == (2, 3, 5) and filled["language"]["blocks"]["k"].all()


def test_a_scanned_model_refuses_a_kv_cache(tiny_bundle):
    stacked = stack_layers(tiny_bundle.params, scan_stacks(tiny_bundle.config))
    model = VLM(tiny_bundle.config, scan_layers=True)
    cache = [{"k": jnp.zeros((1, 30, 2, 8)), "v": jnp.zeros((1, 30, 2, 8))}] * tiny_bundle.config.language.depth
    with pytest.raises(ValueError, match="scan_layers has no KV cache"):
        model.apply({"params": stacked}, np.zeros((1, 48, 48, 3), np.float32), np.ones((1, 4), np.int32),
                    np.ones((1, 4), bool), cache)


@pytest.mark.parametrize("shape", [(3, 8), (2, 7, 13), (5, 1)])
def test_packed_masks_are_one_bit_per_weight_and_round_trip(shape):
    mask = np.random.default_rng(0).random(shape) < 0.5
    packed = pack_mask(mask)
    assert packed.dtype == np.uint8 and packed.shape == (*shape[:-1], -(-shape[-1] // 8))
    np.testing.assert_array_equal(np.asarray(unpack_mask(jnp.asarray(packed), shape[-1])), mask)
    assert unpack_mask(jnp.asarray(mask), shape[-1]).dtype == jnp.bool_


def test_restoration_holds_masks_at_an_eighth_of_a_byte_per_weight(setup):
    bundle, masks, lora, _ = setup
    _, packed, _ = step_inputs(bundle.params, masks, lora, scan_stacks(bundle.config))
    weights = sum(int(np.size(m)) for m in jax.tree.leaves(masks))
    held = sum(int(np.size(m)) * np.dtype(m.dtype).itemsize for m in jax.tree.leaves(packed))
    assert all(m.dtype == np.uint8 for m in jax.tree.leaves(packed))
    assert held <= weights / 8 + 8 * len(jax.tree.leaves(packed))  # ≤ 1 byte of padding per output row group
    assert pack_masks({"a": None})["a"] is None


def test_chunked_vocabulary_losses_equal_one_pass():
    rng = np.random.default_rng(0)
    batch, length, width, vocab = 3, 11, 6, 17
    head = jnp.asarray(rng.normal(size=(width, vocab)), jnp.float32)
    teacher_head = jnp.asarray(rng.normal(size=(width, vocab)), jnp.float32)
    hidden = jnp.asarray(rng.normal(size=(batch, length, width)), jnp.float32)
    teacher_hidden = jnp.asarray(rng.normal(size=(batch, length, width)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, vocab, (batch, length)))
    loss_mask = jnp.asarray(rng.random((batch, length)) < 0.6)
    kl_mask = jnp.asarray(rng.random((batch, length - 1)) < 0.8)

    def losses(h, w, chunk):
        sums = vocab_losses(lambda x: x @ w, h, tokens, loss_mask, lambda x: x @ teacher_head, teacher_hidden,
                            kl_mask, 2.0, chunk)
        return sums[0] / sums[1] + sums[2] / sums[3], sums

    one_pass = losses(hidden, head, 64)[1]
    student, teacher = hidden @ head, teacher_hidden @ teacher_head
    want = (*token_cross_entropy(student, tokens, loss_mask),
            *distillation_kl(student[:, :-1], teacher[:, :-1], kl_mask, 2.0))
    np.testing.assert_allclose(np.asarray(one_pass), np.asarray(want), rtol=1e-6)
    grad = jax.grad(lambda h, w: losses(h, w, 64)[0], argnums=(0, 1))(hidden, head)
    for chunk in (1, 3, 4):
        np.testing.assert_allclose(np.asarray(losses(hidden, head, chunk)[1]), np.asarray(want), rtol=1e-5)
        chunked = jax.grad(lambda h, w: losses(h, w, chunk)[0], argnums=(0, 1))(hidden, head)
        assert _rel(chunked, grad) <= 1e-5


def test_restoration_loss_with_small_chunks_equals_one_pass(setup):
    bundle, masks, lora, batch = setup
    model = VLM(bundle.config)
    want_loss, _, want_grads = loss_and_grads(model, lora, batch, bundle.params, masks)
    loss, _, grads = loss_and_grads(model, lora, batch, bundle.params, masks, loss_chunk=5)
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss) and _rel(grads, want_grads) <= 1e-5


@pytest.mark.parametrize("chunk", [64, 4])
def test_a_shared_head_equals_the_teacher_head_called_apart(chunk):
    rng = np.random.default_rng(1)
    batch, length, width, vocab = 2, 9, 5, 13
    head = jnp.asarray(rng.normal(size=(width, vocab)), jnp.float32)
    hidden, teacher_hidden = (jnp.asarray(rng.normal(size=(batch, length, width)), jnp.float32) for _ in range(2))
    tokens = jnp.asarray(rng.integers(0, vocab, (batch, length)))
    loss_mask = jnp.asarray(rng.random((batch, length)) < 0.7)
    kl_mask = jnp.asarray(rng.random((batch, length - 1)) < 0.8)

    def losses(h, w, shared):
        sums = vocab_losses(lambda x: x @ w, h, tokens, loss_mask, lambda x: jax.lax.stop_gradient(x @ w),
                            teacher_hidden, kl_mask, 2.0, chunk, shared_head=shared)
        return sums[0] / sums[1] + sums[2] / sums[3], sums

    apart, shared = losses(hidden, head, False)[1], losses(hidden, head, True)[1]
    np.testing.assert_allclose(np.asarray(shared), np.asarray(apart), rtol=1e-6)
    grads = [jax.grad(lambda h, w: losses(h, w, s)[0], argnums=(0, 1))(hidden, head) for s in (False, True)]
    assert _rel(grads[1], grads[0]) <= 1e-6


def _linear_case(mask_kind, seed=0, rows=4, fan_in=16, features=24, rank=3):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(rows, 5, fan_in)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(fan_in, features)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(features,)), jnp.float32)
    factors = (jnp.asarray(rng.normal(size=(rank, fan_in)), jnp.float32),
               jnp.asarray(rng.normal(size=(features, rank)), jnp.float32))
    keep = rng.random((fan_in, features)) < 0.5
    mask = {"none": None, "bool": jnp.asarray(keep), "packed": jnp.asarray(pack_mask(keep))}[mask_kind]
    return x, kernel, bias, mask, factors


@pytest.mark.parametrize("mode", ["sparselora", "lora"])
@pytest.mark.parametrize("mask_kind", ["packed", "bool", "none"])
def test_the_adapted_linears_own_backward_pass_equals_autodiff(mode, mask_kind, monkeypatch):
    from sparsevlm import lora as lora_module

    # Blocks of G of 4 columns (packed masks: 8), so the blockwise factor gradients are exercised.
    monkeypatch.setattr(lora_module, "_GRAD_BLOCK_BYTES", 16 * 8 * 4)
    x, kernel, bias, mask, factors = _linear_case(mask_kind)
    cotangent = jnp.asarray(np.random.default_rng(5).normal(size=(4, 5, 24)), jnp.float32)

    def ours(x, kernel, bias, factors):
        y = lora_module._adapted_linear(x, kernel, bias, mask, factors, "language/blocks_0/mlp/up/kernel", 8.0,
                                        mode, jnp.float32)
        return jnp.sum(y * cotangent)

    def reference(x, kernel, bias, factors):
        return jnp.sum(lora_module._linear_output(x, kernel, bias, mask, factors, 8.0, mode, jnp.float32) * cotangent)

    np.testing.assert_allclose(float(ours(x, kernel, bias, factors)), float(reference(x, kernel, bias, factors)),
                               rtol=1e-6)
    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2, 3)))(x, kernel, bias, factors)
    want = jax.grad(reference, argnums=(0, 1, 2, 3))(x, kernel, bias, factors)
    for name, g, w in zip(("x", "kernel", "bias", "factors"), got, want):
        assert _rel(g, w) <= 1e-6, name


@pytest.mark.parametrize("mesh_spec", ["fsdp=4", "data=2,fsdp=2", "data=2,fsdp=2,tensor=2"])
def test_the_adapted_linears_backward_pass_on_a_mesh_equals_one_device(mesh_spec):
    from jax.sharding import NamedSharding, PartitionSpec

    from sparsevlm import sharding
    from sparsevlm.lora import _adapted_linear

    mesh = sharding.make_mesh(mesh_spec, jax.devices()[:math.prod(int(p.split("=")[1]) for p in mesh_spec.split(","))])
    x, kernel, bias, mask, factors = _linear_case("packed", rows=8, fan_in=32, features=48)
    path = "language/blocks_0/mlp/up/kernel"

    def loss(factors, x, kernel):
        return jnp.sum(jnp.sin(_adapted_linear(x, kernel, bias, mask, factors, path, 8.0, "sparselora", jnp.float32)))

    want = jax.grad(loss, argnums=(0, 1))(factors, x, kernel)

    def on_mesh(factors, x, kernel):
        with sharding.activation_mesh(mesh):
            return jax.grad(loss, argnums=(0, 1))(factors, x, kernel)

    put = lambda v, spec: jax.device_put(v, NamedSharding(mesh, spec))  # noqa: E731
    batch = sharding.logical_to_spec(("batch",), mesh)[0]
    kernel_spec = sharding.logical_to_spec(sharding.logical_axes(path, 2), mesh)
    got = jax.jit(on_mesh)(factors, put(x, PartitionSpec(batch)), put(kernel, kernel_spec))
    assert _rel(got, want) <= 1e-5


def test_masking_clears_pruned_weights_even_when_they_are_not_finite():
    from sparsevlm.masks import mask_weights

    keep = jnp.asarray([[True, False, False], [False, True, True]])
    for dtype in (jnp.float32, jnp.bfloat16):
        weights = jnp.asarray([[1.5, jnp.nan, jnp.inf], [-jnp.inf, -2.0, -0.0]], dtype)
        got = np.asarray(mask_weights(weights, keep).astype(jnp.float32))
        np.testing.assert_array_equal(got, [[1.5, 0.0, 0.0], [0.0, -2.0, -0.0]])
        assert not np.signbit(got[0, 1:]).any() and np.signbit(got[1, 2])  # cleared to +0, kept -0 stays -0
        assert mask_weights(weights, keep).dtype == dtype
    weights = jnp.asarray([[1.5, 2.0, 3.0], [4.0, -2.0, 0.5]])
    grad = jax.grad(lambda w: jnp.sum(mask_weights(w, keep) * jnp.arange(6.0).reshape(2, 3)))(weights)
    np.testing.assert_array_equal(np.asarray(grad), np.where(np.asarray(keep), np.arange(6.0).reshape(2, 3), 0.0))


def test_gather_late_tie_to_and_batch_shard_sums_change_no_value_on_a_mesh():
    from jax.sharding import NamedSharding, PartitionSpec

    from sparsevlm import sharding

    mesh = sharding.make_mesh("data=2,fsdp=2", jax.devices()[:4])
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(8, 3, 16)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(16, 24)), jnp.float32).at[0, 0].set(jnp.nan)
    path = "language/blocks_0/mlp/up/kernel"
    assert not sharding.gathers_weights() and sharding.gather_late(x, path, kernel) is kernel

    def traced(x, kernel):
        with sharding.activation_mesh(mesh):
            assert sharding.gathers_weights()
            late = sharding.gather_late((x, x[:, 0]), path, kernel)
            sums = sharding.sum_over_batch_shards(lambda r, w: jnp.einsum("bti,io->o", r, w), (x,), (late,))
            return late, sums, sharding.tie_to(x, tied)

    tied = {"f32": kernel.at[1, 1].set(-jnp.inf), "bf16": kernel.astype(jnp.bfloat16),
            "u8": jnp.asarray(rng.integers(0, 256, (4, 5)), jnp.uint8), "none": None}
    assert sharding.tie_to(x, tied) is tied
    x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    late, sums, after = jax.jit(traced)(x_sharded, kernel)
    np.testing.assert_array_equal(np.asarray(late), np.asarray(kernel))  # exactly, NaN included
    assert after["none"] is None
    for name in ("f32", "bf16", "u8"):
        assert after[name].dtype == tied[name].dtype
        np.testing.assert_array_equal(np.asarray(after[name]), np.asarray(tied[name]))
    np.testing.assert_allclose(np.asarray(sums), np.asarray(jnp.einsum("bti,io->o", x, kernel)), rtol=1e-5)
