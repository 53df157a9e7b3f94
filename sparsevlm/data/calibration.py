"""Text+image sets for calibration and restoration training: built-in by name, or `TASK=SOURCE` real data.

`TASK=SOURCE` loads a `sparsevlm.data.hf` task (e.g. `cc3m=/data/cc3m.jsonl` for the paper's
prefix-captioning calibration, `coco_caption_train=<hub name>` for restoration) from an HF dataset
name or a local imagefolder / parquet / JSON-lines path.
"""

from __future__ import annotations

from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from sparsevlm.data import shapes
from sparsevlm.data.batch import EncodedSet, encode_vqa
from sparsevlm.data.prompts import BUILTIN, PromptFormat, caption_format

# Captions stand in for the paper's CC3M captions; questions are the task's own data; mix is both.
CALIBRATION_SETS = ("shapes-captions", "shapes-vqa", "shapes-mix")
DATA_HELP = f"{', '.join(CALIBRATION_SETS)}, or TASK=SOURCE (TASK a sparsevlm.data.hf task, SOURCE a dataset name or path)"


def parse_data_spec(value: str) -> tuple[str, str | None]:
    """`(built-in name, None)` or `(task, source)` from a data flag; a clear error naming the value otherwise."""
    if value in CALIBRATION_SETS:
        return value, None
    task, sep, source = value.partition("=")
    from sparsevlm.data.hf import TASKS

    if not sep or not source or task not in TASKS:
        raise ValueError(f"data {value!r} is neither a built-in set nor TASK=SOURCE; allowed: {DATA_HELP} "
                         f"with TASK one of {', '.join(TASKS)}")
    return task, source


def data_flag(text: str) -> str:
    """argparse `type=` for `--calib-data` / `--train-data`: the value, or a usage error saying what is allowed."""
    import argparse

    try:
        parse_data_spec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def calibration_set(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    num_images: int,
    seed: int = 0,
    image_size: int = 48,
    fmt: PromptFormat = BUILTIN,
    instruction_tokenizer: PreTrainedTokenizerBase | None = None,
    image_processor: Any = None,
) -> EncodedSet:
    """Encoded examples (prompt + target text) from `num_images` training images (rows, for `TASK=SOURCE`).

    `shapes-captions` has one caption per image, `shapes-vqa` every question, `shapes-mix` both.
    Caption tasks are prompted with the family's captioning format, not its question template.
    """
    if num_images <= 0:
        raise ValueError(f"calibration samples {num_images} must be positive")
    task, source = parse_data_spec(name)
    if source is not None:
        from sparsevlm.data.hf import TASK_SPECS, load_task

        dataset = load_task(task, source, limit=num_images, seed=seed)
        if TASK_SPECS[task].kind != "vqa":
            fmt = caption_format(fmt)
        return encode_vqa(dataset, tokenizer, with_targets=True, fmt=fmt, instruction_tokenizer=instruction_tokenizer,
                          image_size=image_size, image_processor=image_processor)
    train = shapes.build_split("train", num_images, seed=seed, image_size=image_size)
    if name == "shapes-vqa":
        return encode_vqa(train, tokenizer, with_targets=True, fmt=fmt,
                          instruction_tokenizer=instruction_tokenizer)
    captions = shapes.captioning_view(train)
    if name == "shapes-captions":
        return encode_vqa(captions, tokenizer, with_targets=True, fmt=fmt,
                          instruction_tokenizer=instruction_tokenizer)
    return encode_vqa(datasets.concatenate_datasets([train, captions]), tokenizer, with_targets=True, fmt=fmt,
                          instruction_tokenizer=instruction_tokenizer)
