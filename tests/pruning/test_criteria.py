"""Criteria against references: Wanda's masks against a PyTorch re-statement of locuslab/wanda's `prune_wanda`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sparsevlm.config import Pattern, num_pruned
from sparsevlm.pruning.criteria import LayerStats, magnitude, random, wanda
from sparsevlm.pruning.patterns import select


class _WandaReferenceStats:
    """Wanda's `WrappedGPT.add_batch` for an `nn.Linear`: a running mean of ‖X_j‖₂² per input feature.

    `nsamples` counts sequences (the batch axis), not tokens, as in the reference; the result is the
    sum of squares over every token divided by the number of sequences.
    """

    def __init__(self, columns: int):
        self.scaler_row = torch.zeros(columns)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if inp.dim() == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()  # [in, tokens]
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def _wanda_reference_mask(weight: torch.Tensor, scaler_row: torch.Tensor, sparsity: float,
                          prune_n: int = 0, prune_m: int = 0) -> torch.Tensor:
    """`prune_wanda`'s W_mask for a PyTorch `[out, in]` weight: True = pruned; `prune_n` counts PRUNED weights."""
    w_metric = torch.abs(weight) * torch.sqrt(scaler_row.reshape((1, -1)))
    w_mask = torch.zeros_like(w_metric) == 1
    if prune_n != 0:
        for ii in range(w_metric.shape[1]):
            if ii % prune_m == 0:
                tmp = w_metric[:, ii:(ii + prune_m)].float()
                w_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        sort_res = torch.sort(w_metric, dim=-1, stable=True)
        indices = sort_res[1][:, :int(w_metric.shape[1] * sparsity)]
        w_mask.scatter_(1, indices, True)
    return w_mask


def _calibration(seed: int, fan_out: int, fan_in: int, batches: int = 3, seq: int = 7):
    """Random `[out, in]` weights and a few `[batch, seq, in]` activation batches of varying size."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(fan_out, fan_in)).astype(np.float32)
    # Per-feature scales spread the norms, so the activation term really changes the ranking.
    scale = np.exp(rng.normal(size=fan_in)).astype(np.float32)
    acts = [(rng.normal(size=(b + 1, seq, fan_in)) * scale).astype(np.float32) for b in range(batches)]
    return weight, acts


def _masks(weight: np.ndarray, acts: list[np.ndarray], pattern: Pattern, sparsity: float,
           prune_n: int = 0, prune_m: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(reference keep-mask, our keep-mask), both in PyTorch `[out, in]` layout."""
    reference = _WandaReferenceStats(weight.shape[1])
    for batch in acts:
        reference.add_batch(torch.from_numpy(batch))
    pruned = _wanda_reference_mask(torch.from_numpy(weight), reference.scaler_row, sparsity, prune_n, prune_m)

    # Ours: the plain sum of squares over all tokens, on the Flax [in, out] kernel.
    tokens = np.concatenate([a.reshape(-1, a.shape[-1]) for a in acts])
    stats = LayerStats(jnp.asarray((tokens.astype(np.float64) ** 2).sum(0), jnp.float32), None,
                       jnp.asarray(tokens.shape[0]))
    keep = select(wanda(jnp.asarray(weight.T), stats, None), pattern, sparsity)
    return ~pruned.numpy(), np.asarray(keep).T


@pytest.mark.parametrize("fan_out,fan_in", [(48, 64), (96, 128)])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_wanda_unstructured_matches_reference(fan_out, fan_in, sparsity):
    # The reference's int(in * s) and our num_pruned agree on these sizes (no float round-off at stake).
    assert int(fan_in * sparsity) == num_pruned(fan_in, sparsity)
    weight, acts = _calibration(fan_in + int(sparsity * 10), fan_out, fan_in)
    reference, ours = _masks(weight, acts, Pattern("unstructured"), sparsity)
    np.testing.assert_array_equal(ours, reference)
    # Activations matter: the same data without them (magnitude) gives a different mask.
    assert not np.array_equal(np.asarray(select(jnp.abs(weight.T), Pattern("unstructured"), sparsity)).T, reference)


@pytest.mark.parametrize("fan_out,fan_in", [(48, 64), (96, 128)])
@pytest.mark.parametrize("n_kept,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_wanda_n_of_m_matches_reference(fan_out, fan_in, n_kept, m):
    # Ours counts KEPT weights (`n_of_m(n_kept, m)`), the reference counts PRUNED ones (`prune_n`).
    pattern = Pattern.n_of_m(n_kept, m)
    weight, acts = _calibration(fan_in + 10 * m + n_kept, fan_out, fan_in)
    reference, ours = _masks(weight, acts, pattern, pattern.fixed_sparsity, prune_n=m - n_kept, prune_m=m)
    np.testing.assert_array_equal(ours, reference)
    assert ours.reshape(fan_out, fan_in // m, m).sum(-1).min() == n_kept


def test_wanda_score_formula():
    kernel = jnp.array([[1.0, -2.0], [-3.0, 4.0], [0.5, 0.0]])  # [in=3, out=2]
    stats = LayerStats(jnp.array([4.0, 1.0, 9.0]), None, jnp.asarray(5))
    expected = np.array([[2.0, 4.0], [3.0, 4.0], [1.5, 0.0]])  # |W_ij| * ‖X_i‖₂
    np.testing.assert_allclose(wanda(kernel, stats, None), expected)
    with pytest.raises(ValueError, match="calibration"):
        wanda(kernel, None, None)


def test_magnitude_is_absolute_value():
    kernel = jax.random.normal(jax.random.key(3), (16, 8))
    np.testing.assert_array_equal(magnitude(kernel, None, None), np.abs(np.asarray(kernel)))


def test_random_is_reproducible_per_key_and_exact_after_select():
    kernel = jnp.zeros((64, 24))
    first = random(kernel, None, jax.random.key(1))
    assert first.shape == kernel.shape
    np.testing.assert_array_equal(first, random(kernel, None, jax.random.key(1)))
    assert not np.array_equal(first, random(kernel, None, jax.random.key(2)))
    # Scores ignore the weights: the same key gives the same scores for any kernel values.
    np.testing.assert_array_equal(first, random(jnp.ones((64, 24)), None, jax.random.key(1)))
    keep = np.asarray(select(first, Pattern("unstructured"), 0.4))
    np.testing.assert_array_equal((~keep).sum(0), np.full(24, num_pruned(64, 0.4)))
    other = np.asarray(select(random(kernel, None, jax.random.key(2)), Pattern("unstructured"), 0.4))
    assert not np.array_equal(keep, other)
    with pytest.raises(ValueError, match="key"):
        random(kernel, None, None)
