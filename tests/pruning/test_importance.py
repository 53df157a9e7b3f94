"""ECoFLaP: the global allocation's budget and shape, and zeroth- against first-order importance."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsevlm.config import SparsitySpec
from sparsevlm.data.examples import load_examples
from sparsevlm.losses import task_loss
from sparsevlm.masks import measure_sparsity
from sparsevlm.models.vlm import VLM
from sparsevlm.pruning import prune, uniform_ratios
from sparsevlm.pruning.allocation import block_of, global_ratios
from sparsevlm.pruning.calibrate import calibration_carry
from sparsevlm.pruning.importance import (
    allocation_ratios,
    first_order_scores,
    loss_batches,
    zeroth_order_projections,
    zeroth_order_scores,
)
from sparsevlm.tree import flatten, unflatten


@pytest.fixture(scope="module")
def carry(tiny_bundle):
    data = load_examples("shapes-captions", tiny_bundle.tokenizer, 8, seed=2)
    return calibration_carry(data, 8, tiny_bundle.tokenizer.pad_token_id, tiny_bundle.config.vision)


def _sizes(params, ratios):
    flat = flatten(params)
    return {p: int(np.prod(np.shape(flat[p]))) for p in ratios}


def test_block_of_names_the_numbered_block_or_the_tower():
    assert block_of("language/blocks_3/attn/q/kernel") == "language/blocks_3"
    assert block_of("language/encoder/blocks_0/mlp/up/kernel") == "language/encoder/blocks_0"
    assert block_of("connector/up/kernel") == "connector"


@pytest.mark.parametrize("seed", range(4))
def test_allocation_spends_the_global_budget_within_one_weight(tiny_bundle, seed):
    params = tiny_bundle.params
    spec = SparsitySpec(vision=0.6, connector=0.3, language=0.7)
    uniform = uniform_ratios(params, spec)
    sizes = _sizes(params, uniform)
    rng = np.random.default_rng(seed)
    scores = {p: float(rng.uniform(0, 10)) for p in uniform}
    ratios = global_ratios(params, spec, scores, max_layer_sparsity=0.9)
    budget = sum(uniform[p] * sizes[p] for p in uniform)
    assert abs(sum(ratios[p] * sizes[p] for p in ratios) - budget) <= 1.0
    assert set(ratios) == set(uniform)
    assert max(ratios.values()) <= 0.9 + 1e-12
    # One ratio per block; a block with a higher score per weight is pruned less.
    by_block = {}
    for path, ratio in ratios.items():
        by_block.setdefault(block_of(path), set()).add(ratio)
    assert all(len(v) == 1 for v in by_block.values())


def test_uniform_scores_give_uniform_ratios(tiny_bundle):
    params = tiny_bundle.params
    spec = SparsitySpec.same(0.6)
    uniform = uniform_ratios(params, spec)
    sizes = _sizes(params, uniform)
    for scores in ({p: 3.0 * sizes[p] for p in uniform}, {p: 0.0 for p in uniform}):
        ratios = global_ratios(params, spec, scores)
        for path, ratio in ratios.items():
            block = sum(sizes[q] for q in ratios if block_of(q) == block_of(path))
            assert abs(ratio - 0.6) <= 1.0 / block, path


def test_more_important_blocks_are_pruned_less_and_the_cap_holds(tiny_bundle):
    params = tiny_bundle.params
    spec = SparsitySpec.same(0.5)
    uniform = uniform_ratios(params, spec)
    sizes = _sizes(params, uniform)
    favoured = "language/blocks_0"
    scores = {p: sizes[p] * (20.0 if block_of(p) == favoured else 1.0) for p in uniform}
    ratios = global_ratios(params, spec, scores, max_layer_sparsity=0.7)
    mine = {r for p, r in ratios.items() if block_of(p) == favoured}
    others = {r for p, r in ratios.items() if block_of(p) != favoured}
    assert max(mine) < 0.5 < min(others)
    assert max(others) <= 0.7 + 1e-12


@pytest.mark.parametrize("spec, scores, cap, message", [
    (SparsitySpec.same(0.5, "2:4"), None, 0.8, "unstructured pattern, not 2:4"),
    (SparsitySpec.same(0.7), None, 0.6, "max layer sparsity 0.6 is below the target sparsity 0.7"),
    (SparsitySpec.same(0.5), "nan", 0.8, "importance score nan of language"),
    (SparsitySpec.same(0.5), "missing", 0.8, "no importance score"),
])
def test_allocation_rejects_bad_input(tiny_bundle, spec, scores, cap, message):
    paths = sorted(uniform_ratios(tiny_bundle.params, SparsitySpec.same(0.5)))
    given = {p: 1.0 for p in paths}
    if scores == "nan":
        given[paths[0]] = float("nan")
    elif scores == "missing":
        del given[paths[0]]
    with pytest.raises(ValueError, match=message):
        global_ratios(tiny_bundle.params, spec, given, cap)


def test_loss_batches_split_the_calibration_examples(carry):
    batches = loss_batches(carry, 3)
    assert [b["tokens"].shape[0] for b in batches] == [3, 2, 3]
    assert len(loss_batches(carry)) == 8  # 32 asked, one example each
    np.testing.assert_array_equal(np.concatenate([b["loss_mask"] for b in batches]), carry["target_mask"])


def test_zeroth_order_agrees_with_the_first_order_directional_derivative(tiny_bundle, carry):
    """(L(W+εz) − L(W−εz)) / 2ε against ⟨∇W L, z⟩ from autodiff, for the same Gaussian z."""
    params, config = tiny_bundle.params, tiny_bundle.config
    # Every third matrix of all three towers, on two batches.
    paths = sorted(uniform_ratios(params, SparsitySpec(vision=0.5, connector=0.5, language=0.5)))[::3]
    batches = loss_batches(carry, 2)
    key = jax.random.key(7)
    g = zeroth_order_projections(params, config, batches, paths, key)
    model = VLM(config)
    gradient = jax.jit(jax.grad(lambda p, batch: task_loss(model, p, batch)[0]))
    flat = dict(flatten(params))
    significant = 0
    for b, batch in enumerate(batches):
        grads = flatten(gradient(params, batch))
        batch_key = jax.random.fold_in(key, b)
        for i, path in enumerate(paths):
            z = jax.random.normal(jax.random.fold_in(batch_key, i), np.shape(flat[path]), jnp.float32)
            exact = float(jnp.sum(grads[path] * z))
            # A float32 loss resolves a difference quotient at ε = 1e-3 to about ulp(L) / 2ε ≈ 2.4e-4 at L ≈ 4.
            assert abs(g[b, i] - exact) <= 0.05 * abs(exact) + 6e-4, (path, g[b, i], exact)
            if abs(exact) > 3e-3:
                significant += 1
                assert np.sign(g[b, i]) == np.sign(exact), (path, g[b, i], exact)
    assert significant >= len(paths)


def test_zeroth_and_first_order_block_scores_agree_in_size(tiny_bundle, carry):
    params, config = tiny_bundle.params, tiny_bundle.config
    spec = SparsitySpec.same(0.5)
    paths = sorted(uniform_ratios(params, spec))
    batches = loss_batches(carry)
    first = first_order_scores(params, config, batches, paths)
    zeroth = zeroth_order_scores(params, config, batches, paths, jax.random.key(0))
    blocks = sorted({block_of(p) for p in paths})
    ratio = [sum(zeroth[p] for p in paths if block_of(p) == blk) / sum(first[p] for p in paths if block_of(p) == blk)
             for blk in blocks]
    assert all(0.33 < r < 3.0 for r in ratio), dict(zip(blocks, ratio))
    # Per batch, |g| / sqrt(2n/π) estimates the RMS gradient, so the score is Σ|W| times it.
    assert all(v > 0 and math.isfinite(v) for v in zeroth.values())


def test_ecoflap_ratios_work_with_any_criterion(tiny_bundle, carry):
    params, config = tiny_bundle.params, tiny_bundle.config
    spec = SparsitySpec.same(0.6)
    ratios = allocation_ratios("ecoflap-first", params, config, spec, carry, max_layer_sparsity=0.8)
    result = prune(params, config, spec, "magnitude", ratios=ratios)
    layers = measure_sparsity(result.params)["layers"]
    flat = flatten(params)
    for path, ratio in ratios.items():
        fan_in = np.shape(flat[path])[0]
        assert abs(layers[path] - math.floor(fan_in * ratio + 1e-9) / fan_in) < 1e-6, path
    with pytest.raises(ValueError, match="'ecoflap-second'"):
        allocation_ratios("ecoflap-second", params, config, spec, carry)
    unflatten(flat)  # the params tree is untouched by scoring
