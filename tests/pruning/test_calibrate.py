"""Block-wise calibration against the whole-model forward pass it decomposes."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsevlm.config import SparsitySpec
from sparsevlm.data.examples import load_examples
from sparsevlm.models.layers import Linear
from sparsevlm.models.stages import subtree
from sparsevlm.models.vlm import VLM, forward_stages
from sparsevlm.pruning import prune, uniform_ratios
from sparsevlm.pruning.calibrate import _jit, calibration_carry, own_params, prune_blockwise, read_params
from sparsevlm.tree import flatten
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def calib(tiny_bundle):
    data = load_examples("shapes-captions", tiny_bundle.tokenizer, 12, seed=1)
    return calibration_carry(data, 12, tiny_bundle.tokenizer.pad_token_id, tiny_bundle.config.vision)


def _recorded_stats(params, config, calib, mode="sequential", batch_size=32, spec=None, method="magnitude"):
    """Run the driver with a layer function that records statistics and prunes by magnitude."""
    recorded = {}
    spec = spec or SparsitySpec(vision=0.5, connector=0.5, language=0.5)

    def layer(path, kernel, stats):
        recorded[path] = jax.tree.map(np.asarray, stats)
        keep = jnp.abs(kernel) >= jnp.median(jnp.abs(kernel), axis=0, keepdims=True)
        return kernel * keep, keep

    new_params, masks = prune_blockwise(
        params, forward_stages(config), calib, uniform_ratios(params, spec), layer,
        need_hessian=True, mode=mode, batch_size=batch_size,
    )
    return recorded, new_params, masks


def _whole_model_inputs(params, config, calib):
    """Every Linear's input captured from one whole-model forward pass, with the valid-token weights."""
    captured = {}

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, Linear) and context.method_name == "__call__":
            captured["/".join(context.module.path) + "/kernel"] = np.asarray(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        VLM(config).apply({"params": params}, calib["images"], calib["tokens"], calib["text_mask"])
    n_image = config.vision.num_features
    valid = np.concatenate([np.ones((calib["tokens"].shape[0], n_image), bool), calib["text_mask"]], axis=1)
    return captured, valid


def _numpy_stats(x, valid):
    features = x.reshape(-1, x.shape[-1]).astype(np.float64)
    weight = np.ones(len(features)) if valid is None else valid.reshape(-1).astype(np.float64)
    return (weight[:, None] * features**2).sum(0), (features * weight[:, None]).T @ features, (weight[:, None] * features).sum(0)


def test_stage_chain_reproduces_the_whole_forward(tiny_bundle, calib):
    params, config = tiny_bundle.params, tiny_bundle.config
    carry = dict(calib)
    *stages, head = forward_stages(config)
    assert head.prefix == "language"  # the head, restated below
    for stage in stages:
        carry = stage.apply(subtree(params, stage.prefix), carry)
    logits = VLM(config).apply(
        {"params": params}, carry["x"], method=lambda m, x: m.language.lm_head(m.language.norm(x))
    )
    want, _ = VLM(config).apply({"params": params}, calib["images"], calib["tokens"], calib["text_mask"])
    valid = np.asarray(carry["valid"])
    np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(want)[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["dense", "sequential"])
def test_statistics_match_the_whole_model_inputs(tiny_bundle, calib, mode):
    params, config = tiny_bundle.params, tiny_bundle.config
    recorded, new_params, _ = _recorded_stats(params, config, calib, mode)
    # Dense mode sees the dense model's inputs. Sequential mode sees the final pruned model's block
    # inputs (they depend only on the blocks before, final by then); the sublayers inside a block are
    # all captured in one pass of the still-dense block, as Wanda and SparseGPT do.
    reference = params if mode == "dense" else new_params
    inputs, valid = _whole_model_inputs(reference, config, calib)
    block_inputs = ("/attn/q/", "/attn/k/", "/attn/v/", "connector/up/")
    checked = [p for p in recorded if mode == "dense" or any(b in p for b in block_inputs)]
    assert len(checked) >= 13
    for path in checked:
        stats, x = recorded[path], inputs[path]
        token_valid = valid if path.startswith("language") else None
        sq_norm, hessian, total = _numpy_stats(x, token_valid)
        np.testing.assert_allclose(stats.sq_norm, sq_norm, rtol=2e-4, atol=1e-3, err_msg=path)
        np.testing.assert_allclose(stats.total, total, rtol=2e-4, atol=1e-3, err_msg=path)
        np.testing.assert_allclose(stats.hessian, hessian, rtol=2e-4, atol=1e-3, err_msg=path)
        assert int(stats.tokens) == (int(token_valid.sum()) if token_valid is not None else x.shape[0] * x.shape[1])


def test_sequential_and_dense_modes_differ_only_after_the_first_pruned_block(tiny_bundle, calib):
    params, config = tiny_bundle.params, tiny_bundle.config
    spec = SparsitySpec.language_only(0.5)
    sequential, *_ = _recorded_stats(params, config, calib, "sequential", spec=spec)
    dense, *_ = _recorded_stats(params, config, calib, "dense", spec=spec)
    first = "language/blocks_0/attn/q/kernel"
    later = "language/blocks_1/attn/q/kernel"
    np.testing.assert_allclose(sequential[first].hessian, dense[first].hessian, rtol=1e-6)
    assert not np.allclose(sequential[later].hessian, dense[later].hessian, rtol=1e-3)


def test_chunking_and_padding_do_not_change_the_statistics(tiny_bundle, calib):
    params, config = tiny_bundle.params, tiny_bundle.config
    whole, *_ = _recorded_stats(params, config, calib, batch_size=64)
    chunked, *_ = _recorded_stats(params, config, calib, batch_size=5)
    extra = 7  # more left padding: masked out, and rotary positions ignore it
    padded = dict(calib)
    padded["tokens"] = np.pad(calib["tokens"], ((0, 0), (extra, 0)))
    padded["text_mask"] = np.pad(calib["text_mask"], ((0, 0), (extra, 0)))
    repadded, *_ = _recorded_stats(params, config, padded)
    for path in whole:
        for other in (chunked, repadded):
            np.testing.assert_allclose(other[path].sq_norm, whole[path].sq_norm, rtol=1e-4, err_msg=path)
            np.testing.assert_allclose(other[path].hessian, whole[path].hessian, rtol=1e-4, atol=1e-4, err_msg=path)


def test_wanda_and_sparsegpt_need_calibration(tiny_bundle):
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(ValueError, match=f"{method} needs calibration data"):
            prune(tiny_bundle.params, tiny_bundle.config, SparsitySpec.same(0.5), method)


def test_calibration_modes_and_counts_are_validated(tiny_bundle, calib):
    with pytest.raises(ValueError, match="calibration mode 'both'"):
        prune(tiny_bundle.params, tiny_bundle.config, SparsitySpec.same(0.5), "wanda", calib, "both")
    data = load_examples("shapes-captions", tiny_bundle.tokenizer, 4)
    with pytest.raises(ValueError, match="calibration samples 9 exceed the 4"):
        calibration_carry(data, 9, 0, tiny_bundle.config.vision)
    with pytest.raises(ValueError, match="data 'cc3m' is neither a built-in set nor TASK=SOURCE"):
        load_examples("cc3m", tiny_bundle.tokenizer, 4)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_methods_prune_to_the_exact_target(tiny_bundle, calib, method):
    spec = SparsitySpec(vision=0.5, connector=0.25, language=0.75)
    result = prune(tiny_bundle.params, tiny_bundle.config, spec, method, calib)
    flat = flatten(result.params)
    masks = {p: m for p, m in flatten(result.masks).items() if m is not None}
    assert set(masks) == set(result.ratios)
    for path, mask in masks.items():
        target = spec.targets[path.split("/")[0]]
        per_row_kept = mask.sum(axis=0)
        assert (per_row_kept == mask.shape[0] - int(mask.shape[0] * target)).all(), path
        assert (np.asarray(flat[path])[~mask] == 0).all(), path


def test_prune_reports_where_its_time_goes(tiny_bundle):
    data = load_examples("shapes-captions", tiny_bundle.tokenizer, 8)
    carry = calibration_carry(data, 8, tiny_bundle.tokenizer.pad_token_id, tiny_bundle.config.vision)
    result = prune(tiny_bundle.params, tiny_bundle.config, SparsitySpec.same(0.5), "wanda", carry)
    assert set(result.phases) == {"capture", "solve", "refresh", "to_host"} | ({"pass_through"} & set(result.phases))
    assert all(seconds >= 0 for seconds in result.phases.values())
    assert sum(result.phases.values()) <= result.seconds + 1e-3
    magnitude = prune(tiny_bundle.params, tiny_bundle.config, SparsitySpec.same(0.5), "magnitude")
    assert set(magnitude.phases) == {"solve", "to_host"}


def _peak_device_bytes_while_pruning(tokenizer, depth: int, calib, on_host: bool) -> tuple[int, int]:
    """(peak growth of live device bytes seen by the layer solves, one language block's param bytes)."""
    config = tiny_config(len(tokenizer))
    config = dataclasses.replace(config, language=dataclasses.replace(config.language, width=64, mlp_dim=256,
                                                                       depth=depth))
    params = VLM(config).init(jax.random.key(0), np.zeros((1, 48, 48, 3), np.float32), np.ones((1, 4), np.int32),
                              np.ones((1, 4), bool))["params"]
    params = jax.tree.map(np.asarray, params) if on_host else params
    block = sum(x.nbytes for x in jax.tree.leaves(params["language"]["blocks_0"]))
    live = lambda: sum(x.nbytes for x in jax.live_arrays())  # noqa: E731
    base, peak = live(), [0]

    def layer(path, kernel, stats):
        peak[0] = max(peak[0], live() - base)
        keep = jnp.abs(kernel) >= jnp.median(jnp.abs(kernel), axis=0, keepdims=True)
        return kernel * keep, keep

    spec = SparsitySpec.language_only(0.5)
    new_params, masks = prune_blockwise(params, forward_stages(config), calib, uniform_ratios(params, spec), layer,
                                        need_hessian=True)
    assert len(masks) == 7 * depth
    # The results live where the params did.
    kind = np.ndarray if on_host else jax.Array
    assert all(isinstance(m, kind) for m in masks.values())
    assert all(isinstance(new_params["language"][f"blocks_{i}"]["mlp"]["up"]["kernel"], kind) for i in range(depth))
    return peak[0], block


def test_host_params_go_to_the_device_one_block_at_a_time(tokenizer, calib):
    # Device memory while pruning must not grow with depth: one block's weights, its statistics and the
    # activations, not the tower. With the params already on the device, all of them are there.
    shallow, block = _peak_device_bytes_while_pruning(tokenizer, 2, calib, on_host=True)
    deep, _ = _peak_device_bytes_while_pruning(tokenizer, 10, calib, on_host=True)
    assert deep - shallow < block, (shallow, deep, block)
    # Params already on the device stay there, and so do the results.
    _peak_device_bytes_while_pruning(tokenizer, 2, calib, on_host=False)


def test_each_stage_receives_only_the_params_it_reads(tiny_bundle, calib):
    # The splice stage at `language` owns the embedding and the LM head but runs the embedding only:
    # handing it the head too put a vocabulary-sized matrix (twice, for a 7B) on the device for nothing.
    params, stages = tiny_bundle.params, forward_stages(tiny_bundle.config)
    carry = jax.device_put(dict(calib))
    read = {}
    for index, stage in enumerate(stages[:-1]):  # the head stage needs no run
        own = own_params(params, stages, index)
        sub, absent = read_params(stage, own, carry)
        read[(stage.prefix, stage.fn.__name__)] = set(flatten(sub))
        assert set(flatten(sub)) | {path for path, _, _ in absent} == set(flatten(own))
        expected = _jit(stage.module, stage.fn)(own, carry)
        carry = _jit(stage.module, stage.fn, absent)(sub, carry)  # zeros stand in for the leaves not sent
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), carry, expected)
    assert read[("language", "splice")] == {"embed/embedding"}
    assert read[("language", "positions")] == set()  # rotary: no params
    assert read[("language/blocks_0", "layer_step")] == set(flatten(params["language"]["blocks_0"]))
