"""SparseGPT against a NumPy re-statement of the reference loop, and against Wanda/magnitude on real layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsevlm.config import Pattern, SparsitySpec
from sparsevlm.data.examples import load_examples
from sparsevlm.models.vlm import forward_stages
from sparsevlm.pruning import prune_layer, uniform_ratios
from sparsevlm.pruning.calibrate import calibration_carry, prune_blockwise
from sparsevlm.pruning.sparsegpt import sparsegpt
from sparsevlm.tree import flatten


def reference_sparsegpt(W, H, sparsity, prune_n=0, prune_m=0, blocksize=128, percdamp=0.01):
    """The reference `fasterprune` loop on W `[out, in]`, in float64 NumPy.

    `prune_n` counts weights *pruned* per group of `prune_m`, as the reference does. The
    unstructured branch prunes exactly `int(numel * sparsity)` per block (the reference's
    `tmp <= thresh` prunes one more when the threshold element itself is included).
    """
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    rows, columns = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * np.mean(np.diag(H)) * np.eye(columns)
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper factor of H^-1
    mask = np.zeros_like(W, bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prune_n == 0:
            tmp = W1**2 / np.diag(Hinv1)[None] ** 2
            order = np.argsort(tmp.reshape(-1), kind="stable")
            mask1 = np.zeros(tmp.size, bool)
            mask1[order[: int(tmp.size * sparsity)]] = True
            mask1 = mask1.reshape(tmp.shape)
        else:
            mask1 = np.zeros_like(W1, bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune_n != 0 and i % prune_m == 0:
                tmp = W1[:, i : i + prune_m] ** 2 / np.diag(Hinv1)[i : i + prune_m][None] ** 2
                idx = np.argsort(tmp, axis=1, kind="stable")[:, :prune_n]
                np.put_along_axis(mask1[:, i : i + prune_m], idx, True, axis=1)
            q = w.copy()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, ~mask


@pytest.fixture(scope="module")
def layer_problem():
    rng = np.random.default_rng(0)
    fan_in, fan_out, tokens = 64, 24, 400
    mixing = rng.normal(size=(fan_in, fan_in)) / np.sqrt(fan_in)
    x = (rng.normal(size=(tokens, fan_in)) @ mixing + rng.normal(size=fan_in)).astype(np.float32)
    kernel = rng.normal(size=(fan_in, fan_out)).astype(np.float32)
    return kernel, x.T @ x


@pytest.mark.parametrize("block_size", [16, 48])  # 48: three in-block tiles; 64 inputs end in a part-block
@pytest.mark.parametrize(
    ("pattern", "prune_n", "prune_m"),
    [(Pattern.n_of_m(2, 4), 2, 4), (Pattern.n_of_m(1, 4), 3, 4), (Pattern.n_of_m(4, 8), 4, 8), (Pattern("unstructured-layer"), 0, 0)],
)
def test_matches_the_reference_loop(layer_problem, pattern, prune_n, prune_m, block_size):
    kernel, hessian = layer_problem
    want_w, want_keep = reference_sparsegpt(kernel.T, hessian, 0.5, prune_n, prune_m, blocksize=block_size)
    got_kernel, got_keep = sparsegpt(kernel, hessian, pattern, 0.5, block_size=block_size)
    np.testing.assert_array_equal(np.asarray(got_keep), want_keep.T)
    np.testing.assert_allclose(np.asarray(got_kernel), want_w.T, rtol=2e-3, atol=2e-3)


def test_lazy_block_updates_do_not_change_the_result(layer_problem):
    # For N:M the block size only changes when the error is propagated, not what is computed.
    kernel, hessian = layer_problem
    small = sparsegpt(kernel, hessian, Pattern.n_of_m(2, 4), 0.5, block_size=8)
    whole = sparsegpt(kernel, hessian, Pattern.n_of_m(2, 4), 0.5, block_size=64)
    np.testing.assert_array_equal(np.asarray(small[1]), np.asarray(whole[1]))
    np.testing.assert_allclose(np.asarray(small[0]), np.asarray(whole[0]), rtol=1e-4, atol=1e-4)


def test_zero_sparsity_keeps_weights_and_dead_inputs_are_zeroed(layer_problem):
    kernel, hessian = layer_problem
    same, keep = sparsegpt(kernel, hessian, Pattern("unstructured"), 0.0)
    assert np.asarray(keep).all()
    np.testing.assert_allclose(np.asarray(same), kernel, atol=1e-5)
    dead = hessian.copy()
    dead[3, :] = dead[:, 3] = 0
    pruned, _ = sparsegpt(kernel, dead, Pattern("unstructured"), 0.5)
    assert (np.asarray(pruned)[3] == 0).all()


def test_per_row_counts_are_exact_across_blocks(layer_problem):
    kernel, hessian = layer_problem
    for sparsity in (0.3, 0.5, 0.7):
        new, keep = sparsegpt(kernel, hessian, Pattern("unstructured"), sparsity, block_size=16)
        pruned_per_row = (~np.asarray(keep)).sum(axis=0)
        assert (pruned_per_row == int(64 * sparsity)).all()
        assert (np.asarray(new)[~np.asarray(keep)] == 0).all()


def test_input_errors_name_the_problem(layer_problem):
    kernel, hessian = layer_problem
    with pytest.raises(ValueError, match="hessian shape"):
        sparsegpt(kernel, hessian[:10, :10], Pattern("unstructured"), 0.5)
    with pytest.raises(ValueError, match="sparsity=1.0"):
        sparsegpt(kernel, hessian, Pattern("unstructured"), 1.0)
    with pytest.raises(ValueError, match="input dimension 62, which is not divisible by M=4"):
        sparsegpt(kernel[:62], hessian[:62, :62], Pattern.n_of_m(2, 4), 0.5)


@pytest.mark.slow
def test_sparsegpt_reconstructs_real_layers_better_than_wanda_and_magnitude(trained_bundle):
    """‖XW − XŴ‖ on the calibration inputs of every prunable layer of a trained default-architecture model."""
    bundle = trained_bundle
    data = load_examples("shapes-captions", bundle.tokenizer, 64)
    calib = calibration_carry(data, 64, bundle.tokenizer.pad_token_id, bundle.config.vision)
    stats = {}

    def record(path, kernel, layer_stats):
        stats[path] = layer_stats
        return kernel, jnp.ones(kernel.shape, bool)

    spec = SparsitySpec(vision=0.5, connector=0.5, language=0.5)
    prune_blockwise(bundle.params, forward_stages(bundle.config), calib, uniform_ratios(bundle.params, spec),
                    record, need_hessian=True, mode="dense")
    flat = flatten(bundle.params)
    assert len(stats) == 3 * 6 + 2 + 4 * 7  # vision blocks, connector, language blocks
    # Every kind of layer once: the first and last block of each tower (inputs at both ends of the
    # sequential hand-off) and the connector.
    last = {tower: max(int(p.split("/")[1].split("_")[1]) for p in stats if p.startswith(f"{tower}/blocks_"))
            for tower in ("vision", "language")}
    chosen = {p: s for p, s in stats.items() if p.startswith("connector/")
              or any(p.startswith(f"{t}/blocks_{b}/") for t, n in last.items() for b in (0, n))}
    assert len(chosen) == 2 * 6 + 2 + 2 * 7
    for pattern in (Pattern("unstructured"), Pattern.n_of_m(2, 4)):
        for path, layer_stats in chosen.items():
            kernel = jnp.asarray(flat[path])
            errors = {}
            for method in ("magnitude", "wanda", "sparsegpt"):
                pruned, _ = prune_layer(method, kernel, layer_stats, pattern, 0.5, jax.random.key(0))
                delta = kernel - pruned
                errors[method] = float(jnp.sqrt(jnp.trace(delta.T @ layer_stats.hessian @ delta)))
            assert errors["sparsegpt"] < errors["wanda"], (path, pattern, errors)
            assert errors["sparsegpt"] < errors["magnitude"], (path, pattern, errors)
