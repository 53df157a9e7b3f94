"""Mask pytrees on the tiny VLM: which leaves are prunable, `prune`'s mask tree, applying and measuring masks."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsevlm.config import Pattern, SparsitySpec, num_pruned
from sparsevlm.masks import apply_masks, check_masks, masks_from_flat, measure_sparsity, prunable_paths
from sparsevlm.pruning import prune
from sparsevlm.tree import flatten, unflatten

VISION_LINEARS = ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/up", "mlp/down")
LANGUAGE_LINEARS = ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/up", "mlp/gate", "mlp/down")


def _is_none(x) -> bool:
    return x is None


def _expected_prunable(config) -> set[str]:
    # Written out from the architecture, not from the rules under test.
    vision = {f"vision/blocks_{i}/{name}/kernel" for i in range(config.vision.depth) for name in VISION_LINEARS}
    language = {f"language/blocks_{i}/{name}/kernel" for i in range(config.language.depth) for name in LANGUAGE_LINEARS}
    return vision | language | {"connector/up/kernel", "connector/down/kernel"}


def test_prunable_paths_are_the_block_and_connector_linears(tiny_bundle):
    params, config = tiny_bundle.params, tiny_bundle.config
    paths = prunable_paths(params)
    assert set(paths) == _expected_prunable(config)
    assert len(paths) == len(set(paths))
    # Tree order, so callers iterate layers deterministically.
    assert paths == [p for p in flatten(params) if p in set(paths)]
    for path in paths:
        assert np.ndim(flatten(params)[path]) == 2


def test_prunable_paths_never_include_embeddings_heads_norms_biases_or_positions(tiny_bundle):
    flat = flatten(tiny_bundle.params)
    paths = set(prunable_paths(tiny_bundle.params))
    never = [p for p in flat if any(part in p for part in ("embed", "lm_head", "norm", "pos_embed", "patch_embed"))]
    never += [p for p in flat if p.endswith("/bias") or p.endswith("/scale")]
    assert {"language/embed/embedding", "language/lm_head/kernel", "vision/pos_embed",
            "vision/patch_embed/kernel"} <= set(never)
    assert not paths & set(never)


def test_prunable_paths_skip_non_matrix_leaves_under_matching_paths():
    params = {"vision": {"blocks_0": {"attn": {"q": {"kernel": np.zeros((4, 4, 2))}}}},
              "language": {"blocks_0": {"mlp": {"up": {"kernel": np.zeros((4, 8))}}}}}
    assert prunable_paths(params) == ["language/blocks_0/mlp/up/kernel"]


# Each (kernel shape, method, pattern, sparsity) is one jit compile; the specs below reuse a few
# sparsities (and other tests reuse these specs) to keep the file fast.
MIXED = SparsitySpec(vision=0.25, connector=0.5, language=0.75)
HALF_2_4 = SparsitySpec.same(0.5, "2:4")
RANDOM_SPEC = SparsitySpec(vision=0.5, language=0.25)
CASES = [
    (SparsitySpec(vision=0.5), "magnitude"),
    (SparsitySpec(connector=0.5, language=0.5), "magnitude"),
    (MIXED, "magnitude"),
    (HALF_2_4, "magnitude"),
    (SparsitySpec(connector=0.5, language=0.5, pattern="4:8"), "magnitude"),
    (SparsitySpec(vision=0.3, language=0.6, pattern="unstructured-layer"), "magnitude"),
    (RANDOM_SPEC, "random"),
]


@pytest.mark.parametrize("spec,method", CASES, ids=[f"{m}-{s.describe()}" for s, m in CASES])
def test_prune_mask_tree_matches_params(tiny_bundle, spec, method):
    params = tiny_bundle.params
    result = prune(params, tiny_bundle.config, spec, method, key=jax.random.key(7))
    masks = result.masks
    assert jax.tree.structure(masks, is_leaf=_is_none) == jax.tree.structure(params)

    expected = {p for p in prunable_paths(params) if spec.targets[p.split("/")[0]] > 0}
    flat_params = flatten(params)
    for path, mask in flatten(masks).items():
        if path not in expected:
            assert mask is None, path
            continue
        mask = np.asarray(mask)
        assert mask.dtype == np.bool_ and mask.shape == flat_params[path].shape, path
    assert set(result.ratios) == expected

    # The returned params are the originals with the masks written in, and the counts are exact.
    pattern = spec.parsed_pattern
    flat_new = flatten(result.params)
    for path, value in flat_params.items():
        if path not in expected:
            np.testing.assert_array_equal(flat_new[path], value)
            continue
        keep = np.asarray(flatten(masks)[path])
        np.testing.assert_array_equal(flat_new[path], np.where(keep, value, 0))
        target = spec.targets[path.split("/")[0]]
        fan_in = value.shape[0]
        if pattern.kind == "unstructured":
            np.testing.assert_array_equal((~keep).sum(0), num_pruned(fan_in, target))
        elif pattern.kind == "unstructured-layer":
            assert (~keep).sum() == num_pruned(keep.size, target)
        else:
            groups = keep.reshape(fan_in // pattern.m, pattern.m, -1).sum(1)
            np.testing.assert_array_equal(groups, pattern.n)


def test_prune_magnitude_keeps_the_largest_weights_per_output(tiny_bundle):
    params = tiny_bundle.params
    masks = flatten(prune(params, tiny_bundle.config, MIXED, "magnitude").masks)
    kernel = np.abs(flatten(params)["language/blocks_0/mlp/down/kernel"])
    keep = np.asarray(masks["language/blocks_0/mlp/down/kernel"])
    for column in range(kernel.shape[1]):
        assert kernel[keep[:, column], column].min() > kernel[~keep[:, column], column].max()


def test_random_masks_depend_on_key(tiny_bundle):
    args = (tiny_bundle.params, tiny_bundle.config, RANDOM_SPEC, "random")
    path = "vision/blocks_1/mlp/up/kernel"
    a = np.asarray(flatten(prune(*args, key=jax.random.key(1)).masks)[path])
    b = np.asarray(flatten(prune(*args, key=jax.random.key(1)).masks)[path])
    c = np.asarray(flatten(prune(*args, key=jax.random.key(2)).masks)[path])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_apply_masks_zeros_exactly_the_pruned_entries_and_is_idempotent(tiny_bundle):
    params = tiny_bundle.params
    masks = prune(params, tiny_bundle.config, RANDOM_SPEC, "random").masks
    once = apply_masks(params, masks)
    twice = apply_masks(once, masks)
    assert jax.tree.structure(once) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, twice, once)
    flat_masks, flat_params = flatten(masks), flatten(params)
    for path, value in flatten(once).items():
        mask, original = flat_masks[path], flat_params[path]
        if mask is None:
            np.testing.assert_array_equal(value, original)
        else:
            mask = np.asarray(mask)
            assert np.all(np.asarray(value)[~mask] == 0)
            np.testing.assert_array_equal(np.asarray(value)[mask], original[mask])
            assert np.all(original[mask] != 0)  # so "zero" above means "masked", not "was already zero"


def test_measure_sparsity_equals_targets(tiny_bundle):
    params = tiny_bundle.params
    # In-dims are 32, 48 and 64, so half of each output's inputs is an exact count.
    spec = MIXED
    pruned = prune(params, tiny_bundle.config, spec, "magnitude").params
    measured = measure_sparsity(pruned)
    assert measured["towers"] == spec.targets
    assert set(measured["layers"]) == set(prunable_paths(params))
    for path, value in measured["layers"].items():
        target = spec.targets[path.split("/")[0]]
        assert value == target
        assert measured["rows"][path] == (target, target)
    dense = measure_sparsity(params)
    assert dense["towers"] == {"vision": 0.0, "connector": 0.0, "language": 0.0}


def test_measure_sparsity_n_of_m(tiny_bundle):
    pruned = prune(tiny_bundle.params, tiny_bundle.config, HALF_2_4, "magnitude").params
    measured = measure_sparsity(pruned)
    assert measured["towers"] == {"vision": 0.5, "connector": 0.0, "language": 0.5}


@pytest.mark.parametrize("tower,value", [("vision", 1.0), ("language", -0.1), ("connector", 1.5)])
def test_spec_rejects_out_of_range_sparsity(tower, value):
    with pytest.raises(ValueError, match=rf"{tower}.*{value}"):
        SparsitySpec(**{tower: value})


def test_spec_n_of_m_needs_its_own_sparsity():
    with pytest.raises(ValueError, match=r"language.*0\.3.*2:4"):
        SparsitySpec(language=0.3, pattern="2:4")
    spec = SparsitySpec(vision=0.5, language=0.5, pattern="2:4")
    assert spec.parsed_pattern == Pattern.n_of_m(2, 4)
    assert SparsitySpec(language=0.75, pattern="1:4").targets["language"] == 0.75


def test_spec_rejects_bad_pattern():
    with pytest.raises(ValueError, match="dense"):
        SparsitySpec(language=0.5, pattern="dense")


def test_constant_sum_splits():
    specs = SparsitySpec.constant_sum(1.0, [0.1, 0.5, 0.9])
    assert [s.vision for s in specs] == [0.1, 0.5, 0.9]
    for spec in specs:
        assert spec.vision + spec.language == pytest.approx(1.0, abs=1e-12)
        assert spec.connector == 0.0


def _without_connector_kernels(params):
    flat = flatten(params)
    return unflatten({p: v for p, v in flat.items() if not (p.startswith("connector/") and p.endswith("/kernel"))})


def _without_connector(params):
    return {tower: subtree for tower, subtree in params.items() if tower != "connector"}


@pytest.mark.parametrize("strip", [_without_connector_kernels, _without_connector])
def test_prune_names_a_tower_without_prunable_weights(tiny_bundle, strip):
    params = strip(tiny_bundle.params)
    with pytest.raises(ValueError, match="connector"):
        prune(params, tiny_bundle.config, SparsitySpec(connector=0.5), "magnitude")
    # A tower that is not pruned need not exist.
    prune(params, tiny_bundle.config, SparsitySpec(language=0.5), "magnitude")


def test_prune_rejects_n_of_m_that_does_not_tile_a_kernel(tiny_bundle):
    # The tiny model's in-dims are 32, 48 and 64: M=5 tiles none of them.
    with pytest.raises(ValueError, match=r"input dimension \d+.*M=5"):
        prune(tiny_bundle.params, tiny_bundle.config, SparsitySpec(vision=0.8, pattern="1:5"), "magnitude")


_CANDIDATES = [
    ("vision/blocks_0/attn/q/kernel", True), ("vision/blocks_1/mlp/up/kernel", True),
    ("vision/blocks_0/attn/q/bias", False), ("vision/patch_embed/kernel", False), ("vision/pos_embed", False),
    ("vision/blocks_0/norm1/scale", False), ("connector/up/kernel", True), ("connector/down/bias", False),
    ("language/blocks_0/mlp/gate/kernel", True), ("language/blocks_2/attn/o/kernel", True),
    ("language/embed/embedding", False), ("language/lm_head/kernel", False), ("language/norm/scale", False),
]


@settings(max_examples=20, deadline=None)
@given(
    chosen=st.lists(st.sampled_from(_CANDIDATES), min_size=1, unique=True),
    fan_in=st.sampled_from([8, 12, 16]),
    fan_out=st.integers(1, 6),
    towers=st.fixed_dictionaries({t: st.sampled_from([0.0, 0.25, 0.5]) for t in ("vision", "connector", "language")}),
)
def test_masks_never_touch_a_leaf_outside_the_prunable_rule(chosen, fan_in, fan_out, towers):
    rng = np.random.default_rng(0)
    flat = {}
    for path, _ in chosen:
        shape = (fan_in, fan_out) if path.endswith("kernel") or path.endswith("embedding") else (fan_out,)
        if "patch_embed" in path:
            shape = (2, 2, 3, fan_out)  # a conv kernel: 4-D, never pruned
        flat[path] = rng.normal(size=shape).astype(np.float32) + 0.01
    params = unflatten(flat)
    prunable = {p for p, ok in chosen if ok}
    wanted = {p for p in prunable if towers[p.split("/")[0]] > 0}
    spec = SparsitySpec(**towers)
    if any(towers[t] > 0 and not any(p.startswith(t + "/") for p in prunable) for t in towers):
        with pytest.raises(ValueError, match="has no prunable"):
            prune(params, None, spec, "magnitude")
        return
    result = prune(params, None, spec, "magnitude")
    masks = {p: m for p, m in flatten(result.masks).items() if m is not None}
    assert set(masks) == wanted
    for path, value in flatten(result.params).items():
        if path not in wanted:
            np.testing.assert_array_equal(value, flat[path])
        else:
            pruned_per_row = (~masks[path]).sum(axis=0)
            assert (pruned_per_row == int(fan_in * towers[path.split("/")[0]])).all()


@pytest.fixture(scope="module")
def half_masks(tiny_bundle):
    return prune(tiny_bundle.params, None, SparsitySpec(vision=0.5, language=0.5), "magnitude").masks


def test_check_masks_accepts_a_pruned_mask_tree_and_the_all_none_tree(tiny_bundle, half_masks):
    check_masks(tiny_bundle.params, half_masks)
    check_masks(tiny_bundle.params, jax.tree.map(lambda _: None, tiny_bundle.params))
    # Sharded or jax-array masks are checked from their metadata alone.
    check_masks(tiny_bundle.params, jax.tree.map(jax.numpy.asarray, half_masks))


def test_check_masks_rejects_a_float_mask(tiny_bundle, half_masks):
    path = "language/blocks_0/mlp/up/kernel"
    flat = dict(flatten(half_masks))
    flat[path] = flat[path].astype(np.float32)  # right shape, 0/1 values, wrong dtype
    with pytest.raises(ValueError, match=rf"mask for {path} has dtype float32, expected bool"):
        check_masks(tiny_bundle.params, unflatten(flat))
    # masks_from_flat still turns 0/1 masks of any dtype into boolean ones.
    rebuilt = masks_from_flat(tiny_bundle.params, {p: m for p, m in flat.items() if m is not None})
    assert flatten(rebuilt)[path].dtype == np.bool_
    np.testing.assert_array_equal(flatten(rebuilt)[path], flatten(half_masks)[path])
    check_masks(tiny_bundle.params, rebuilt)


def test_check_masks_rejects_a_wrong_shape(tiny_bundle, half_masks):
    path = "vision/blocks_1/mlp/down/kernel"
    flat = dict(flatten(half_masks))
    flat[path] = flat[path].T  # [out, in]: the PyTorch layout, not the Flax kernel's
    with pytest.raises(ValueError, match=rf"mask for {path} has shape \(32, 64\), the kernel \(64, 32\)"):
        check_masks(tiny_bundle.params, unflatten(flat))
    # A mask that would broadcast against the kernel is still the wrong shape.
    flat[path] = np.ones((1, 32), bool)
    with pytest.raises(ValueError, match=rf"mask for {path} has shape \(1, 32\)"):
        check_masks(tiny_bundle.params, unflatten(flat))


def test_check_masks_rejects_a_tree_missing_a_subtree_or_naming_an_unknown_param(tiny_bundle, half_masks):
    without_connector = {tower: sub for tower, sub in half_masks.items() if tower != "connector"}
    with pytest.raises(ValueError, match=r"mask tree has no leaf for param 'connector/\S+' \(\d+ missing"):
        check_masks(tiny_bundle.params, without_connector)
    flat = dict(flatten(half_masks))
    del flat["language/blocks_1/attn/o/kernel"]
    with pytest.raises(ValueError, match=r"no leaf for param 'language/blocks_1/attn/o/kernel' \(1 missing"):
        check_masks(tiny_bundle.params, unflatten(flat))
    flat = dict(flatten(half_masks)) | {"language/blocks_9/attn/o/kernel": None}
    with pytest.raises(ValueError, match=r"mask for 'language/blocks_9/attn/o/kernel' names no param"):
        check_masks(tiny_bundle.params, unflatten(flat))
