"""Batched VQA evaluation: greedy answers, exact match overall and per question type."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import datasets
import jax
import numpy as np
from tqdm.auto import tqdm

from sparsevlm.checkpoint import ModelBundle
from sparsevlm.data.batch import encode_vqa, iterate_batches, length_buckets
from sparsevlm.data.prompts import bundle_format
from sparsevlm.eval.generate import compiled_generate, decode_text
from sparsevlm.eval.metrics import normalize_answer
from sparsevlm.models.vlm import VLM


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= `value` (bucketed lengths → fewer compilations)."""
    return -(-value // multiple) * multiple


def evaluate_vqa(
    bundle: ModelBundle,
    dataset: datasets.Dataset,
    batch_size: int = 128,
    max_new_tokens: int = 4,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    progress: bool = True,
    params: Any = None,
) -> dict[str, Any]:
    """Exact-match accuracy of greedy (`num_beams=1`) or beam-search answers on a VQA dataset, with per-type scores."""
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    tokenizer = bundle.tokenizer
    data = encode_vqa(dataset, tokenizer, with_targets=False, fmt=bundle_format(bundle.metadata),
                      instruction_tokenizer=bundle.instruction_tokenizer)
    buckets = length_buckets([len(ids) for ids, _ in data.sequences])
    model = VLM(bundle.config)
    generate = compiled_generate(model, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                 num_beams, length_penalty)
    params = jax.device_put(bundle.params if params is None else params)
    predictions: list[str] = [""] * len(data)
    batches = (
        batch
        for length, members in buckets.items()
        for batch in iterate_batches(data, batch_size, length, tokenizer.pad_token_id, bundle.config.vision,
                                     indices=members)
    )
    total = sum(-(-len(members) // batch_size) for members in buckets.values())
    for batch, indices in tqdm(batches, total=total, desc="evaluate", disable=not progress, leave=False):
        instruction = None if batch.instruction_tokens is None else (batch.instruction_tokens, batch.instruction_mask)
        out = np.asarray(generate(params, batch.images, batch.tokens, batch.text_mask, instruction=instruction))
        for row, index in enumerate(indices):
            predictions[index] = decode_text(tokenizer, out[row], tokenizer.eos_token_id)
    correct = [normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, data.answers)]
    by_type: dict[str, list[bool]] = defaultdict(list)
    for qtype, hit in zip(data.question_types, correct):
        by_type[qtype].append(hit)
    split = str(dataset.split) if dataset.split is not None else "unknown"
    return {
        "accuracy": float(np.mean(correct)),
        "n": len(correct),
        "split": split,
        "by_type": {t: float(np.mean(v)) for t, v in sorted(by_type.items())},
        "num_beams": num_beams,
        "length_penalty": length_penalty,
        "predictions": [
            {"question": q, "answer": a, "prediction": p, "type": t}
            for q, a, p, t in zip(data.questions, data.answers, predictions, data.question_types)
        ],
    }
