"""Batched evaluation: length buckets bound the compilations; bucketing does not change the answers."""

from __future__ import annotations

import numpy as np

from sparsevlm.data.batch import length_buckets
from sparsevlm.eval.evaluate import evaluate_vqa
from sparsevlm.eval.generate import compiled_generate
from sparsevlm.models.vlm import VLM


def test_length_buckets_are_powers_of_two_covering_every_example():
    lengths = [1, 7, 8, 9, 16, 17, 40, 3]
    buckets = length_buckets(lengths)
    assert sorted(buckets) == [8, 16, 32, 64]
    assert sorted(np.concatenate(list(buckets.values())).tolist()) == list(range(len(lengths)))
    for size, members in buckets.items():
        assert all(lengths[i] <= size for i in members)
        assert size == 8 or all(lengths[i] > size // 2 for i in members)


def test_varied_prompt_lengths_compile_once_per_bucket(tiny_bundle, test_split):
    # Questions from 2 to ~40 words: four buckets (8, 16, 32, 64 tokens with BOS).
    rng = np.random.default_rng(0)
    questions = [" ".join(["what"] * int(n)) + " ?" for n in rng.integers(1, 40, len(test_split))]
    dataset = test_split.remove_columns("question").add_column("question", questions)
    lengths = [len(q.split()) + 1 for q in questions]
    tokenizer = tiny_bundle.tokenizer
    generate = compiled_generate(VLM(tiny_bundle.config), 2, tokenizer.eos_token_id, tokenizer.pad_token_id, 1, 1.0)
    before = generate._cache_size()
    result = evaluate_vqa(tiny_bundle, dataset, batch_size=8, max_new_tokens=2, progress=False)
    compiled = generate._cache_size() - before
    assert result["n"] == len(dataset)
    assert 1 <= compiled <= len(length_buckets(lengths)) <= 4
    # A second pass over the same data compiles nothing new.
    again = evaluate_vqa(tiny_bundle, dataset, batch_size=8, max_new_tokens=2, progress=False)
    assert generate._cache_size() - before == compiled
    assert [p["prediction"] for p in again["predictions"]] == [p["prediction"] for p in result["predictions"]]
