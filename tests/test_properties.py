"""Property tests over random kernels, patterns and masks: SparseLoRA merges keep the mask's zeros, apply_masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsevlm.config import LoraConfig, Pattern, num_pruned
from sparsevlm.lora import init_lora, merge
from sparsevlm.masks import apply_masks, check_masks, masks_from_flat
from sparsevlm.pruning.patterns import select
from sparsevlm.pruning.verify import n_of_m_valid
from sparsevlm.tree import flatten, unflatten

PATH = "language/blocks_0/mlp/up/kernel"
OTHER = "language/blocks_0/mlp/up/bias"  # never masked, never adapted
N_OF_M = ("1:4", "2:4", "3:4", "2:8", "4:8", "1:2")
# Few shapes and sparsities, so most examples reuse a compiled `select` (one per shape, pattern and
# sparsity, ~0.2 s each): every input dim tiles every M above, 64 is the largest.
FAN_INS = (8, 24, 64)
FAN_OUTS = (4, 12)
SPARSITIES = (0.0, 0.37, 0.95)
ALPHA = 16.0
# jit: one compile per shape instead of one per eager op.
merge_jit = jax.jit(merge, static_argnums=(3, 4))


@st.composite
def pruned_kernels(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, Pattern, float, int]:
    """A random `[in, out]` kernel, a pattern and sparsity, the real selection's keep-mask, and a seed."""
    pattern = Pattern.parse(draw(st.sampled_from(("unstructured", "unstructured-layer") + N_OF_M)))
    fan_in, fan_out = draw(st.sampled_from(FAN_INS)), draw(st.sampled_from(FAN_OUTS))
    sparsity = pattern.fixed_sparsity if pattern.kind == "n:m" else draw(st.sampled_from(SPARSITIES))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(fan_in, fan_out)).astype(np.float32)
    keep = np.asarray(select(jnp.asarray(rng.random((fan_in, fan_out), np.float32)), pattern, sparsity))
    return kernel, keep, pattern, sparsity, seed


def _factors(fan_in: int, fan_out: int, rank: int, rng: np.random.Generator) -> dict:
    """LoRA factors in init_lora's format, with A as init_lora draws it and a trained-looking nonzero B."""
    bound = 1.0 / np.sqrt(fan_in)
    a = rng.uniform(-bound, bound, (rank, fan_in)).astype(np.float32)
    # B bounded away from zero (init_lora's B is zero, which would test nothing).
    b = (rng.uniform(0.5, 1.5, (fan_out, rank)) * rng.choice([-1, 1], (fan_out, rank))).astype(np.float32)
    return unflatten({f"{PATH}/a": a, f"{PATH}/b": b})


def test_factors_have_init_lora_format():
    params = unflatten({PATH: np.ones((8, 4), np.float32), OTHER: np.ones(4, np.float32)})
    made = init_lora(params, LoraConfig(targets=((PATH, 3),)), jax.random.key(0))
    ours = _factors(8, 4, 3, np.random.default_rng(0))
    assert jax.tree.structure(ours) == jax.tree.structure(made)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(ours)] == [(x.shape, x.dtype) for x in jax.tree.leaves(made)]
    bound = 1 / np.sqrt(8)
    assert np.abs(flatten(made)[f"{PATH}/a"]).max() <= bound and np.abs(flatten(ours)[f"{PATH}/a"]).max() <= bound


def _tree(kernel: np.ndarray, keep: np.ndarray) -> tuple[dict, dict]:
    params = unflatten({PATH: kernel, OTHER: np.ones(kernel.shape[1], kernel.dtype)})
    masks = masks_from_flat(params, {PATH: keep})
    check_masks(params, masks)
    return params, masks


def _bits(x: np.ndarray) -> np.ndarray:
    # Bitwise view, so NaN == NaN and -0.0 != +0.0 when comparing arrays.
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


@settings(max_examples=25, deadline=None)
@given(case=pruned_kernels(), rank=st.sampled_from([1, 3]))
def test_sparselora_merge_is_zero_exactly_where_the_mask_prunes(case, rank):
    kernel, keep, pattern, sparsity, seed = case
    fan_in, fan_out = kernel.shape
    params, masks = _tree(kernel, keep)
    lora = _factors(fan_in, fan_out, rank, np.random.default_rng(seed + 1))
    a, b = flatten(lora)[f"{PATH}/a"], flatten(lora)[f"{PATH}/b"]

    merged = flatten(merge_jit(params, lora, masks, ALPHA, "sparselora"))
    got = np.asarray(merged[PATH])
    np.testing.assert_array_equal(merged[OTHER], flatten(params)[OTHER])
    # Exactly zero (+0.0) wherever the mask prunes, whatever W + s·(BA)ᵀ is there.
    assert np.all(_bits(got)[~keep] == 0)
    # Where kept: (W + s·(BA)ᵀ), restated in NumPy — nonzero for these continuous random values.
    want = kernel + (ALPHA / rank) * (b @ a).T
    np.testing.assert_allclose(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    assert np.all(got[keep] != 0)

    # So the merged kernel has exactly the pattern's zeros: N:M still holds, unstructured counts are exact.
    zeros = got == 0
    if pattern.kind == "n:m":
        assert n_of_m_valid(got, pattern)
        assert zeros.sum() == fan_out * (fan_in // pattern.m) * (pattern.m - pattern.n)
    elif pattern.kind == "unstructured":
        np.testing.assert_array_equal(zeros.sum(axis=0), num_pruned(fan_in, sparsity))
    else:
        assert zeros.sum() == num_pruned(kernel.size, sparsity)
    # Plain LoRA (the paper's baseline) densifies: wherever it prunes, the merge is s·(BA)ᵀ, not zero.
    dense = np.asarray(flatten(merge_jit(params, lora, masks, ALPHA, "lora"))[PATH])
    np.testing.assert_allclose(dense[~keep], (want - kernel)[~keep], rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    case=pruned_kernels(),
    dtype=st.sampled_from([np.float32, jnp.bfloat16]),
    specials=st.lists(st.sampled_from([np.nan, np.inf, -np.inf, -0.0]), max_size=8),
)
def test_apply_masks_zeros_exactly_the_pruned_positions_and_is_idempotent(case, dtype, specials):
    kernel, keep, _, _, seed = case
    kernel = kernel.astype(dtype)
    rng = np.random.default_rng(seed + 2)
    # Non-finite values (and -0.0) at random positions, pruned or kept.
    flat_index = rng.choice(kernel.size, size=len(specials), replace=False)
    kernel.reshape(-1)[flat_index] = np.asarray(specials, np.float32).astype(dtype)
    params, masks = _tree(kernel, keep)

    once = flatten(apply_masks(params, masks))
    twice = flatten(apply_masks(unflatten(once), masks))
    got = np.asarray(once[PATH])
    assert got.dtype == kernel.dtype
    np.testing.assert_array_equal(_bits(twice[PATH]), _bits(got))  # idempotent, bit for bit
    assert np.all(_bits(got)[~keep] == 0)  # +0.0 even where the weight was NaN, ±inf or -0.0
    np.testing.assert_array_equal(_bits(got)[keep], _bits(kernel)[keep])  # kept weights untouched, NaN too
    np.testing.assert_array_equal(once[OTHER], flatten(params)[OTHER])
