"""Mask makers against their invariants: exact counts per group, lowest scores pruned, N:M validity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsevlm.config import Pattern, num_pruned
from sparsevlm.pruning.patterns import _lowest_device, lowest, lowest_in_groups, select

# Every new shape or sparsity is a fresh jit compile of `select`, so keep the example counts modest.
PROPERTY = settings(max_examples=30, deadline=None)

dims = st.integers(min_value=1, max_value=48)
sparsities = st.floats(min_value=0.0, max_value=0.95, allow_nan=False)
seeds = st.integers(min_value=0, max_value=2**32 - 1)


def _distinct_scores(seed: int, fan_in: int, fan_out: int) -> np.ndarray:
    # A permutation of 0..size-1: no ties, so "the lowest scores" names one set exactly.
    return np.random.default_rng(seed).permutation(fan_in * fan_out).reshape(fan_in, fan_out).astype(np.float32)


def _assert_lowest_pruned(scores: np.ndarray, keep: np.ndarray) -> None:
    """Within one comparison group, every kept score is above every pruned one."""
    kept, pruned = scores[keep], scores[~keep]
    if kept.size and pruned.size:
        assert kept.min() > pruned.max()


@PROPERTY
@given(count=st.integers(min_value=1, max_value=4096), data=st.data())
def test_num_pruned_is_exact_for_representable_fractions(count, data):
    # k / count * count can land just below k in floating point; the count must still be k.
    k = data.draw(st.integers(min_value=0, max_value=count - 1))
    assert num_pruned(count, k / count) == k


@PROPERTY
@given(fan_in=dims, fan_out=dims, sparsity=sparsities, seed=seeds)
def test_row_prunes_exact_count_per_output_and_lowest_scores(fan_in, fan_out, sparsity, seed):
    scores = _distinct_scores(seed, fan_in, fan_out)
    keep = np.asarray(select(scores, Pattern("unstructured"), sparsity))
    assert keep.shape == scores.shape and keep.dtype == np.bool_
    # Axis 0 is the input axis: each output unit (column) loses exactly its share of its inputs.
    np.testing.assert_array_equal((~keep).sum(axis=0), np.full(fan_out, num_pruned(fan_in, sparsity)))
    for column in range(fan_out):
        _assert_lowest_pruned(scores[:, column], keep[:, column])


@PROPERTY
@given(fan_in=dims, fan_out=dims, sparsity=sparsities, seed=seeds)
def test_layer_prunes_exact_count_overall_and_lowest_scores(fan_in, fan_out, sparsity, seed):
    scores = _distinct_scores(seed, fan_in, fan_out)
    keep = np.asarray(select(scores, Pattern("unstructured-layer"), sparsity))
    assert keep.shape == scores.shape and keep.dtype == np.bool_
    assert (~keep).sum() == num_pruned(scores.size, sparsity)
    _assert_lowest_pruned(scores, keep)


@st.composite
def n_of_m_cases(draw):
    m = draw(st.integers(min_value=2, max_value=8))
    n = draw(st.integers(min_value=1, max_value=m - 1))
    groups = draw(st.integers(min_value=1, max_value=6))
    return n, m, groups * m


@PROPERTY
@given(case=n_of_m_cases(), fan_out=dims, seed=seeds)
def test_n_of_m_keeps_n_of_every_m_consecutive_inputs(case, fan_out, seed):
    n, m, fan_in = case
    scores = _distinct_scores(seed, fan_in, fan_out)
    pattern = Pattern.n_of_m(n, m)
    # The sparsity argument is ignored by N:M, which fixes its own.
    keep = np.asarray(select(scores, pattern, pattern.fixed_sparsity))
    assert keep.shape == scores.shape and keep.dtype == np.bool_
    grouped_keep = keep.reshape(fan_in // m, m, fan_out)
    grouped_scores = scores.reshape(fan_in // m, m, fan_out)
    np.testing.assert_array_equal(grouped_keep.sum(axis=1), np.full((fan_in // m, fan_out), n))
    for group in range(fan_in // m):
        for column in range(fan_out):
            _assert_lowest_pruned(grouped_scores[group, :, column], grouped_keep[group, :, column])


def test_ties_are_broken_by_input_position():
    # Stable, like torch.sort(stable=True) in Wanda: among equal scores the earlier inputs go first.
    scores = np.ones((8, 3), np.float32)
    keep = np.asarray(select(scores, Pattern("unstructured"), 0.5))
    np.testing.assert_array_equal(keep, np.repeat(np.arange(8)[:, None] >= 4, 3, axis=1))
    keep = np.asarray(select(scores, Pattern.n_of_m(1, 4), 0.75))
    np.testing.assert_array_equal(keep[:, 0], [False, False, False, True] * 2)


def test_n_of_m_groups_run_along_inputs_not_outputs():
    # One output, eight inputs: a group of four inputs is one column slice, not a row slice.
    scores = np.array([[4, 3, 2, 1, 8, 7, 6, 5]], np.float32).T
    keep = np.asarray(select(scores, Pattern.parse("2:4"), 0.5))
    np.testing.assert_array_equal(keep[:, 0], [True, True, False, False, True, True, False, False])


@pytest.mark.parametrize("name", ["unstructured", "unstructured-layer", "2:4", "4:8"])
def test_parse_round_trips(name):
    assert Pattern.parse(name).name == name


def test_parse_meaning():
    assert Pattern.parse("unstructured") == Pattern("unstructured")
    assert Pattern.parse("unstructured-layer") == Pattern("unstructured-layer")
    assert Pattern.parse("2:4") == Pattern.n_of_m(2, 4)
    # N counts kept weights: 1:4 keeps a quarter, so it is 75% sparse.
    assert Pattern.parse("1:4").fixed_sparsity == 0.75
    assert Pattern.parse("unstructured").fixed_sparsity is None


@PROPERTY
@given(st.integers(min_value=2, max_value=64).flatmap(lambda m: st.tuples(st.integers(1, m - 1), st.just(m))))
def test_parse_round_trips_any_n_of_m(n_m):
    n, m = n_m
    pattern = Pattern.parse(f"{n}:{m}")
    assert pattern == Pattern.n_of_m(n, m)
    assert Pattern.parse(pattern.name) == pattern


@pytest.mark.parametrize("name", ["3:2", "4:4", "0:4", "a:b", "dense", "", "2:4:8", " 2:4"])
def test_parse_rejects_bad_names(name):
    with pytest.raises(ValueError) as error:
        Pattern.parse(name)
    assert name.strip() in str(error.value)


@pytest.mark.parametrize("fan_in,m", [(30, 4), (12, 8), (7, 2)])
def test_n_of_m_rejects_input_dim_not_divisible_by_m(fan_in, m):
    scores = np.zeros((fan_in, 5), np.float32)
    with pytest.raises(ValueError, match=rf"\b{fan_in}\b.*\bM={m}\b"):
        select(scores, Pattern.n_of_m(1, m), 1 - 1 / m)


def test_select_rejects_non_matrix_scores():
    with pytest.raises(ValueError, match="2-D"):
        select(np.zeros((4, 4, 4), np.float32), Pattern("unstructured"), 0.5)


def _stable_lowest(scores: np.ndarray, count: int, axis: int) -> np.ndarray:
    """The `count` lowest along `axis` by a stable argsort (the references' rule)."""
    order = np.argsort(scores, axis=axis, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(scores.shape[axis]).reshape([-1 if a == axis else 1
                                                                           for a in range(scores.ndim)]), axis=axis)
    return ranks < count


@PROPERTY
@given(rows=st.integers(1, 9), length=st.integers(1, 40), levels=st.integers(1, 6), axis=st.integers(0, 1),
       seed=seeds, data=st.data())
def test_lowest_on_both_backends_matches_a_stable_sort_with_heavy_ties(rows, length, levels, axis, seed, data):
    # Few distinct values: most rows have a tie straddling the budget, the case the threshold rule must split.
    scores = np.random.default_rng(seed).integers(0, levels, (rows, length) if axis else (length, rows))
    scores = scores.astype(np.float32)
    count = data.draw(st.integers(0, length))
    want = _stable_lowest(scores, count, axis)
    # The CPU path (NumPy partition in a host callback), with the count traced as SparseGPT passes it.
    got = jax.jit(lambda s, c: lowest(s, c, axis))(scores, jnp.int32(count))
    np.testing.assert_array_equal(np.asarray(got), want)
    # The GPU/TPU path (XLA sort), run here on the CPU.
    moved = np.moveaxis(scores, axis, -1)
    device = np.moveaxis(np.asarray(jax.jit(_lowest_device)(moved, jnp.int32(count))), -1, axis)
    np.testing.assert_array_equal(device, want)


def test_lowest_never_chooses_nan_and_groups_rank_like_a_stable_sort():
    scores = np.array([[np.nan, 1.0, 0.0, np.nan, 2.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(lowest(scores, 3, axis=1)), [[False, True, True, False, True]])
    groups = np.array([[3, 1, 1, 0], [2, 2, 2, 2], [0, 1, 2, 3]], np.float32)
    for count in range(5):
        np.testing.assert_array_equal(np.asarray(lowest_in_groups(groups, count, axis=1)),
                                      _stable_lowest(groups, count, axis=1))
