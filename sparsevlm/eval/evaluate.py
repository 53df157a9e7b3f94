"""Batched evaluation: generated answers scored per task (exact match, official VQA accuracy, GQA, CIDEr-D)."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from tqdm.auto import tqdm

from sparsevlm.bundle import ModelBundle
from sparsevlm.data.batch import EncodedSet, encode_vqa, iterate_batches, length_buckets
from sparsevlm.data.prompts import PromptFormat, bundle_format, caption_format
from sparsevlm.data.tasks import BUILTIN_TASKS, EVAL_TASKS, TASK_SPECS
from sparsevlm.eval.generate import compiled_generate, decode_text
from sparsevlm.eval.metrics import cider_d, gqa_accuracy, normalize_answer, vqa_accuracy, vqa_score
from sparsevlm.models.vlm import VLM

if TYPE_CHECKING:  # a type only, so the library imports without `datasets`
    import datasets


def generate_answers(
    bundle: ModelBundle,
    dataset: datasets.Dataset,
    batch_size: int = 128,
    max_new_tokens: int = 4,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    progress: bool = True,
    params: Any = None,
    fmt: PromptFormat | None = None,
) -> tuple[EncodedSet, list[str]]:
    """The model's answer to every row's prompt (greedy or beam search), batched by length bucket."""
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    tokenizer = bundle.tokenizer
    data = encode_vqa(dataset, tokenizer, with_targets=False, fmt=fmt or bundle_format(bundle.metadata),
                      instruction_tokenizer=bundle.instruction_tokenizer, image_size=bundle.config.vision.image_size,
                      image_processor=bundle.image_processor)
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
    return data, predictions


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
    data, predictions = generate_answers(bundle, dataset, batch_size, max_new_tokens, num_beams, length_penalty,
                                         progress, params)
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


# Paper: VQA answers with at most 10 new tokens; captions need room for a sentence.
DEFAULT_NEW_TOKENS = {"shapes": 4, "vqa": 10, "caption": 30}


def evaluate_task(
    bundle: ModelBundle,
    task: str,
    dataset: datasets.Dataset,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    progress: bool = True,
    params: Any = None,
) -> dict[str, Any]:
    """Score a model on an evaluation task: official VQA accuracy (VQAv2, OK-VQA), GQA accuracy, or CIDEr-D.

    `dataset` is in the common format of `sparsevlm.data.hf` (built-in shapes splits for `shapes`).
    The result has the score, its metric, the decoding setup and every row's prediction.
    """
    if task not in EVAL_TASKS:
        raise ValueError(f"task={task!r} is not one of {', '.join(EVAL_TASKS)}")
    if task in BUILTIN_TASKS:
        result = evaluate_vqa(bundle, dataset, batch_size, max_new_tokens or DEFAULT_NEW_TOKENS["shapes"],
                              num_beams, length_penalty, progress, params)
        return result | {"task": task, "metric": "exact_match", "score": result["accuracy"]}
    kind = TASK_SPECS[task].kind
    if kind == "caption" and len(set(dataset["image_id"])) < len(dataset):
        # CIDEr-D scores one caption per image against all of that image's references: rows must be images.
        raise ValueError(f"{task}: {len(dataset) - len(set(dataset['image_id']))} rows repeat another row's image id; "
                         "group each image's references into one row (sparsevlm.data.hf.group_references)")
    fmt = bundle_format(bundle.metadata)
    if kind == "caption":
        fmt = caption_format(fmt)
    new_tokens = max_new_tokens or DEFAULT_NEW_TOKENS[kind]
    data, predictions = generate_answers(bundle, dataset, batch_size, new_tokens, num_beams, length_penalty,
                                         progress, params, fmt)
    references = [list(a) for a in dataset["answers"]]
    if kind == "caption":
        metric = "cider_d"
        score, per_row = cider_d(dict(enumerate(predictions)), dict(enumerate(references)))
        row_scores = [per_row[i] for i in range(len(predictions))]
    elif task == "gqa":
        metric = "gqa_accuracy"
        score = gqa_accuracy(predictions, data.answers)
        row_scores = [gqa_accuracy([p], [a]) for p, a in zip(predictions, data.answers)]
    else:
        metric = "vqa_accuracy"
        score = vqa_score(predictions, references)
        row_scores = [vqa_accuracy(p, r) for p, r in zip(predictions, references)]
    return {
        "task": task,
        "metric": metric,
        "score": float(score),
        "n": len(predictions),
        "split": str(dataset.split) if dataset.split is not None else "unknown",
        "max_new_tokens": new_tokens,
        "num_beams": num_beams,
        "length_penalty": length_penalty,
        "predictions": [
            {"image_id": i, "prompt": q, "prediction": p, "references": r, "score": float(v)}
            for i, q, p, r, v in zip(dataset["image_id"], data.questions, predictions, references, row_scores)
        ],
    }
