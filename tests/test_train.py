"""Training pieces: CE against NumPy, decay mask, and a step that actually learns."""

from __future__ import annotations

import jax
import numpy as np

from sparsevlm.data import shapes
from sparsevlm.data.batch import encode_vqa, iterate_batches
from sparsevlm.losses import token_cross_entropy
from sparsevlm.models.vlm import VLM
from sparsevlm.train import TrainState, batch_arrays, lm_loss, make_optimizer, make_train_step, weight_decay_mask
from sparsevlm.tree import flatten


def test_token_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, size=(2, 5))
    mask = np.array([[0, 0, 1, 1, 0], [0, 1, 0, 0, 1]], bool)
    total, count = token_cross_entropy(logits, tokens, mask)
    want = 0.0
    for b in range(2):
        for t in range(1, 5):
            if mask[b, t]:
                z = logits[b, t - 1]
                want += np.log(np.exp(z - z.max()).sum()) + z.max() - z[tokens[b, t]]
    np.testing.assert_allclose(total, want, rtol=1e-5)
    assert float(count) == 4


def test_weight_decay_only_on_kernels(tiny_bundle):
    mask = flatten(weight_decay_mask(tiny_bundle.params))
    assert mask["language/blocks_0/attn/q/kernel"] and mask["connector/up/kernel"]
    assert not mask["language/embed/embedding"] and not mask["vision/blocks_0/norm1/scale"]
    assert not mask["vision/pos_embed"] and not mask["connector/up/bias"]


def test_train_step_overfits_a_batch(tiny_bundle, tokenizer):
    data = encode_vqa(shapes.build_split("train", 4), tokenizer, with_targets=True)
    batch, _ = next(iterate_batches(data, 8, 16, tokenizer.pad_token_id, tiny_bundle.config.vision))
    model = VLM(tiny_bundle.config)
    optimizer = make_optimizer(3e-3, 3e-3, 0, 60, 0.0, 1.0)
    params = jax.tree.map(np.array, tiny_bundle.params)
    state = TrainState(params, optimizer.init(params), np.zeros((), np.int32))
    step = make_train_step(lm_loss(model), optimizer)
    losses = []
    for _ in range(60):
        state, metrics = step(state, batch_arrays(batch))
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 60
    assert float(metrics["tokens"]) == batch.loss_mask[:, 1:].sum()
    assert losses[-1] < 0.2 * losses[0]
