"""Examples (prompt + target text) to calibrate pruning or train restoration: a built-in set by name,
or `TASK=SOURCE` real data.

`TASK=SOURCE` loads a `sparsevlm.data.hf` task (e.g. `cc3m=/data/cc3m.jsonl` for the paper's
prefix-captioning calibration, `coco_caption_train=<hub name>` for restoration) from an HF dataset
name or a local imagefolder / parquet / JSON-lines path (`sparsevlm.data.tasks` lists the names).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from sparsevlm.data.builtin import task_module
from sparsevlm.data.batch import EncodedSet, encode_vqa
from sparsevlm.data.prompts import BUILTIN, PromptFormat, caption_format
from sparsevlm.data.tasks import TASK_SPECS, builtin_set, parse_data_spec

if TYPE_CHECKING:
    from sparsevlm.config import DataSource


def load_examples(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    num_images: int,
    seed: int = 0,
    image_size: int = 48,
    fmt: PromptFormat = BUILTIN,
    instruction_tokenizer: PreTrainedTokenizerBase | None = None,
    image_processor: Any = None,
    source: DataSource | None = None,
) -> EncodedSet:
    """Encoded examples (prompt + target text) from `num_images` training images (rows, for `TASK=SOURCE`).

    `shapes-captions` has one caption per image, `shapes-vqa` every question, `shapes-mix` both (`scenes-*`
    the same for scenes VQA).
    Caption tasks are prompted with the family's captioning format, not its question template; `source` says how
    `TASK=SOURCE` is read (configuration, streaming, image folder).
    """
    if num_images <= 0:
        raise ValueError(f"calibration samples {num_images} must be positive")
    task, location = parse_data_spec(name)
    if location is not None:
        from sparsevlm.data.hf import load_task

        dataset = load_task(task, location, limit=num_images, seed=seed, **(source.load_kwargs() if source else {}))
        if TASK_SPECS[task].kind != "vqa":
            fmt = caption_format(fmt)
        return encode_vqa(dataset, tokenizer, with_targets=True, fmt=fmt, instruction_tokenizer=instruction_tokenizer,
                          image_size=image_size, image_processor=image_processor)
    task, view = builtin_set(name)
    data = task_module(task)
    train = data.build_split("train", num_images, seed=seed, image_size=image_size)
    if view == "vqa":
        rows = train
    elif view == "captions":
        rows = data.captioning_view(train)
    else:
        import datasets  # here, not at the top, so the library imports without `datasets`

        rows = datasets.concatenate_datasets([train, data.captioning_view(train)])
    _check_words_known(name, rows, tokenizer)
    return encode_vqa(rows, tokenizer, with_targets=True, fmt=fmt, instruction_tokenizer=instruction_tokenizer)


def _check_words_known(name: str, rows: Any, tokenizer: PreTrainedTokenizerBase) -> None:
    """A clear error when a word-level tokenizer lacks words of a built-in set (a shapes model given scenes data)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "WordLevel":  # subword tokenizers spell any word
        return
    vocab = tokenizer.get_vocab()
    unknown = sorted({w for text in (*rows["question"], *rows["answer"]) for w in text.split()} - set(vocab))
    if unknown:
        raise ValueError(f"data {name!r} has words the model's tokenizer does not know ({', '.join(unknown[:5])}): "
                         "a built-in model reads only its own task's sets (shapes-* for default, scenes-* for scenes)")
