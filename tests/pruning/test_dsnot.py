"""DSnoT: the prescribed swaps on a hand-built layer, and its invariants on real layers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from sparsevlm.config import DSnoTConfig, Pattern, SparsitySpec
from sparsevlm.data.examples import load_examples
from sparsevlm.models.vlm import forward_stages
from sparsevlm.pruning import prune, uniform_ratios
from sparsevlm.pruning.calibrate import calibration_carry, prune_blockwise
from sparsevlm.pruning.criteria import LayerStats
from sparsevlm.pruning.dsnot import dsnot, expected_error, squared_error
from sparsevlm.pruning.pruner import prune_layer
from sparsevlm.pruning.registry import method
from sparsevlm.tree import flatten


def _stats(mean, variance, tokens=10.0):
    """LayerStats with the given per-input mean and (population) variance over `tokens` tokens."""
    mean, variance = np.asarray(mean, np.float32), np.asarray(variance, np.float32)
    return LayerStats(jnp.asarray(tokens * (variance + mean**2)), None, jnp.float32(tokens), jnp.asarray(tokens * mean))


# One output unit, six inputs, three kept. Contributions W_j·E[x_j] = [-0.3, -0.1, 0.04, 0.9, 0.5, -0.2];
# the pruned ones (3, 4, 5) leave an expected error of 1.2.
W = np.array([-0.3, -0.1, 0.4, 0.9, 0.5, -0.2], np.float32)
MEAN = np.array([1.0, 1.0, 0.1, 1.0, 1.0, 1.0], np.float32)
VAR = np.array([1.0, 1.0, 0.01, 4.0, 1.0, 1.0], np.float32)
START = np.array([True, True, True, False, False, False])


def test_hand_built_layer_gets_the_prescribed_swap():
    # The second output unit is the first negated: its error is −1.2 and every choice mirrors.
    kernel = jnp.asarray(np.stack([W, -W], axis=1))
    keep = jnp.asarray(np.stack([START, START], axis=1))
    stats = _stats(MEAN, VAR)
    np.testing.assert_allclose(expected_error(kernel, keep, stats.mean), [1.2, -1.2], rtol=1e-5)

    one, cycles = dsnot(kernel, keep, stats, Pattern("unstructured"), DSnoTConfig(max_cycles=1))
    # Regrow input 4, not 3: 0.5 / Var 1 beats 0.9 / Var 4. Prune input 1, the lowest Wanda score whose
    # contribution has the opposite sign; input 2 has a lower Wanda score but pruning it would add to
    # the error. The error falls to 1.2 − 0.5 − 0.1 = 0.6.
    want = np.array([True, False, True, False, True, False])
    np.testing.assert_array_equal(np.asarray(one), np.stack([want, want], axis=1))
    np.testing.assert_allclose(expected_error(kernel, one, stats.mean), [0.6, -0.6], rtol=1e-5)
    assert int(cycles) == 1

    # The next best swap (regrow 3, prune 0) would overshoot to −0.6, so the row stops there.
    done, cycles = dsnot(kernel, keep, stats, Pattern("unstructured"), DSnoTConfig())
    np.testing.assert_array_equal(np.asarray(done), np.asarray(one))
    assert int(cycles) == 2


def test_rows_at_or_below_the_threshold_are_left_alone():
    kernel = jnp.asarray(W[:, None])
    keep = jnp.asarray(START[:, None])
    same, cycles = dsnot(kernel, keep, _stats(MEAN, VAR), Pattern("unstructured"), DSnoTConfig(threshold=1.5))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(keep))
    assert int(cycles) == 0


def test_n_of_m_swaps_stay_inside_the_regrown_weights_group():
    # Two groups of four, two kept in each. Input 6 (group 2) is the best regrowth by score, but group 2's
    # kept weights both add to the error, so the swap regrows input 1 and prunes input 0 in group 1.
    w = np.array([-0.2, 0.6, 0.3, 0.0, 0.1, 0.2, 0.8, 0.0], np.float32)
    keep = np.array([True, False, True, False, True, True, False, False])
    stats = _stats(np.ones(8), np.ones(8))
    new, _ = dsnot(jnp.asarray(w[:, None]), jnp.asarray(keep[:, None]), stats, Pattern.n_of_m(2, 4),
                   DSnoTConfig(max_cycles=1))
    want = np.array([False, True, True, False, True, True, False, False])
    np.testing.assert_array_equal(np.asarray(new)[:, 0], want)


def _random_layer(seed, fan_in=64, fan_out=24):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.4, 1.0, (200, fan_in)).astype(np.float32) * rng.uniform(0.2, 2.0, fan_in).astype(np.float32)
    kernel = jnp.asarray(rng.normal(0, 1, (fan_in, fan_out)).astype(np.float32))
    stats = LayerStats(jnp.asarray((x**2).sum(0)), jnp.asarray(x.T @ x), jnp.float32(len(x)), jnp.asarray(x.sum(0)))
    return kernel, stats


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.6), ("2:4", 0.5)])
def test_guard_keeps_every_rows_squared_error_from_rising(pattern, sparsity):
    kernel, stats = _random_layer(0)
    pattern = Pattern.parse(pattern)
    _, keep = prune_layer("wanda", kernel, stats, pattern, sparsity)
    start = np.asarray(squared_error(kernel, keep, stats.hessian))
    plain, _ = dsnot(kernel, keep, stats, pattern)
    guarded, _ = dsnot(kernel, keep, stats, pattern, DSnoTConfig(guard=True))
    # The published rule lowers |E[error]| but raises some rows' squared error; the guard never does.
    assert (np.asarray(squared_error(kernel, plain, stats.hessian)) > start * (1 + 1e-5)).any()
    after = np.asarray(squared_error(kernel, guarded, stats.hessian))
    assert (after <= start * (1 + 1e-5)).all() and after.sum() < start.sum()
    np.testing.assert_array_equal(np.sum(guarded, axis=0), np.sum(keep, axis=0))
    with pytest.raises(ValueError, match="Hessian"):
        dsnot(kernel, keep, stats._replace(hessian=None), pattern, DSnoTConfig(guard=True))


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.6), ("unstructured-layer", 0.5), ("2:4", 0.5),
                                                ("4:8", 0.5)])
@pytest.mark.parametrize("init", ["wanda", "magnitude"])
def test_swaps_keep_counts_and_never_raise_the_expected_error(pattern, sparsity, init):
    kernel, stats = _random_layer(0)
    pattern = Pattern.parse(pattern)
    _, keep = prune_layer(init, kernel, stats, pattern, sparsity)
    new, cycles = dsnot(kernel, keep, stats, pattern, DSnoTConfig(threshold=0.0))
    keep, new = np.asarray(keep), np.asarray(new)
    assert int(cycles) > 0 and (keep != new).any()
    np.testing.assert_array_equal(new.sum(axis=0), keep.sum(axis=0))
    if pattern.kind == "n:m":
        groups = new.reshape(-1, pattern.m, new.shape[1]).sum(axis=1)
        assert (groups == pattern.n).all()
    before = np.abs(np.asarray(expected_error(kernel, keep, stats.mean)))
    after = np.abs(np.asarray(expected_error(kernel, new, stats.mean)))
    assert (after <= before + 1e-5).all()
    assert after.sum() < before.sum()


@pytest.mark.slow
def test_dsnot_refines_real_default_model_layers(trained_bundle):
    """On the trained default architecture every layer keeps its counts and no row's expected error grows;
    with the guard, no row's squared reconstruction error grows either."""
    bundle = trained_bundle
    data = load_examples("shapes-captions", bundle.tokenizer, 16, seed=0)
    carry = calibration_carry(data, 16, bundle.tokenizer.pad_token_id, bundle.config.vision)
    checked, changed = [], []
    for spec in (SparsitySpec.same(0.7), SparsitySpec.same(0.5, "2:4")):
        pattern = spec.parsed_pattern
        ratios = uniform_ratios(bundle.params, spec)

        def layer(path, kernel, stats):
            _, start = prune_layer("wanda", kernel, stats, pattern, ratios[path])
            before = np.abs(np.asarray(expected_error(kernel, start, stats.mean)))
            squared = np.asarray(squared_error(kernel, start, stats.hessian))
            for guard in (False, True):
                keep, _ = dsnot(kernel, start, stats, pattern, DSnoTConfig(guard=guard))
                new = np.asarray(keep)
                np.testing.assert_array_equal(new.sum(axis=0), np.asarray(start).sum(axis=0), err_msg=path)
                if pattern.kind == "n:m":
                    assert (new.reshape(-1, pattern.m, new.shape[1]).sum(axis=1) == pattern.n).all(), path
                after = np.abs(np.asarray(expected_error(kernel, keep, stats.mean)))
                assert (after <= before + 1e-5).all(), path
                if guard:
                    assert (np.asarray(squared_error(kernel, keep, stats.hessian)) <= squared * (1 + 1e-5)).all(), path
                elif (np.asarray(start) != new).any():
                    changed.append(path)
                    assert after.sum() < before.sum(), path
            checked.append(path)
            return jnp.where(start, kernel, 0), start

        prune_blockwise(bundle.params, forward_stages(bundle.config), carry, ratios, layer, need_hessian=True)
    assert len(checked) == 2 * len(ratios)
    assert changed, "no layer of the trained model had a swap to make"


def test_prune_with_dsnot_differs_from_its_starting_wanda_mask(tiny_bundle):
    data = load_examples("shapes-captions", tiny_bundle.tokenizer, 12, seed=1)
    carry = calibration_carry(data, 12, tiny_bundle.tokenizer.pad_token_id, tiny_bundle.config.vision)
    spec = SparsitySpec.same(0.5)
    args = (tiny_bundle.params, tiny_bundle.config, spec)
    wanda = prune(*args, "wanda", carry)
    refined = prune(*args, "dsnot", carry, options=DSnoTConfig(threshold=0.0))
    start, new = flatten(wanda.masks), flatten(refined.masks)
    moved = 0
    for path, keep in new.items():
        if keep is None:
            continue
        np.testing.assert_array_equal(np.sum(keep, axis=0), np.sum(start[path], axis=0), err_msg=path)
        moved += int((np.asarray(keep) != np.asarray(start[path])).sum())
        # The kernel is the dense one with the new mask's zeros (no weight update).
        dense = np.asarray(flatten(tiny_bundle.params)[path])
        np.testing.assert_array_equal(np.asarray(flatten(refined.params)[path]), np.where(keep, dense, 0))
    assert moved > 0


def test_dsnot_config_rejects_bad_values():
    with pytest.raises(ValueError, match="'obd'"):
        DSnoTConfig(init="obd")
    with pytest.raises(ValueError, match="-1"):
        DSnoTConfig(max_cycles=-1)
    with pytest.raises(ValueError, match="nan"):
        DSnoTConfig(threshold=float("nan"))


def test_only_sparsegpt_starts_and_the_guard_need_the_hessian(tiny_bundle):
    assert not method("dsnot").hessian(DSnoTConfig()) and not method("wanda").hessian() and method("sparsegpt").hessian()
    assert method("dsnot").hessian(DSnoTConfig(init="sparsegpt")) and method("dsnot").hessian(DSnoTConfig(guard=True))
    # Through `prune`, the guard gets its Hessian and every output unit keeps Wanda's count.
    data = load_examples("shapes-captions", tiny_bundle.tokenizer, 12, seed=1)
    carry = calibration_carry(data, 12, tiny_bundle.tokenizer.pad_token_id, tiny_bundle.config.vision)
    args = (tiny_bundle.params, tiny_bundle.config, SparsitySpec.same(0.5))
    wanda = flatten(prune(*args, "wanda", carry).masks)
    guarded = flatten(prune(*args, "dsnot", carry, options=DSnoTConfig(threshold=0.0, guard=True)).masks)
    for path, keep in guarded.items():
        if keep is not None:
            np.testing.assert_array_equal(np.sum(keep, axis=0), np.sum(wanda[path], axis=0), err_msg=path)
