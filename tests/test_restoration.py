"""Restoration's base params: the pruned model's kept weights, the dense model's where it pruned."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sparsevlm.config import SparsitySpec
from sparsevlm.masks import apply_masks
from sparsevlm.pruning import prune
from sparsevlm.restoration import dense_where_pruned
from sparsevlm.tree import flatten


def test_a_hand_worked_case():
    dense = {"w": {"kernel": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)}, "n": {"scale": np.ones(2, np.float32)}}
    masks = {"w": {"kernel": np.array([[True, False], [False, True]])}, "n": {"scale": None}}
    # SparseGPT-like: the kept weights were updated, and a pruned slot holds garbage (NaN), not the dense value.
    pruned = {"w": {"kernel": np.array([[1.5, np.nan], [0.0, 4.5]], np.float32)},
              "n": {"scale": np.full(2, 7.0, np.float32)}}
    base = dense_where_pruned(pruned, masks, dense)
    np.testing.assert_array_equal(base["w"]["kernel"], [[1.5, 2.0], [3.0, 4.5]])
    np.testing.assert_array_equal(base["n"]["scale"], [7.0, 7.0])  # unmasked leaves: the pruned model's
    # Masking the base gives the pruned model back (its zeros where it pruned).
    np.testing.assert_array_equal(apply_masks(base, masks)["w"]["kernel"], [[1.5, 0.0], [0.0, 4.5]])
    assert isinstance(base["w"]["kernel"], np.ndarray)  # host arrays stay on the host


def test_the_teacher_is_the_dense_model_when_pruning_does_not_update_weights(tiny_bundle):
    pruned = prune(tiny_bundle.params, tiny_bundle.config, SparsitySpec.same(0.5), "magnitude")
    base = flatten(dense_where_pruned(pruned.params, pruned.masks, tiny_bundle.params))
    dense = flatten(tiny_bundle.params)
    assert base.keys() == dense.keys()
    for path, value in dense.items():
        np.testing.assert_array_equal(base[path], value, err_msg=path)
    # ... and the student (the base, masked) is the pruned model exactly.
    masked = flatten(apply_masks(dense_where_pruned(pruned.params, pruned.masks, tiny_bundle.params), pruned.masks))
    for path, value in flatten(pruned.params).items():
        np.testing.assert_array_equal(masked[path], value, err_msg=path)


def test_masks_that_do_not_fit_the_dense_model_are_an_error(tiny_bundle):
    pruned = prune(tiny_bundle.params, tiny_bundle.config, SparsitySpec.same(0.5), "magnitude")
    masks = jax.tree.map(lambda m: m, pruned.masks, is_leaf=lambda x: x is None)
    masks["language"]["blocks_0"]["attn"]["q"]["kernel"] = masks["language"]["blocks_0"]["attn"]["q"]["kernel"][:-1]
    with pytest.raises(ValueError, match="mask for language/blocks_0/attn/q/kernel has shape"):
        dense_where_pruned(pruned.params, masks, tiny_bundle.params)
