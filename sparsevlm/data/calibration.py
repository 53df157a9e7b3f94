"""Built-in text+image sets for calibration and restoration training, by name."""

from __future__ import annotations

import datasets
from transformers import PreTrainedTokenizerBase

from sparsevlm.data import shapes
from sparsevlm.data.batch import EncodedSet, encode_vqa
from sparsevlm.data.prompts import BUILTIN, PromptFormat

# Captions stand in for the paper's CC3M captions; questions are the task's own data; mix is both.
CALIBRATION_SETS = ("shapes-captions", "shapes-vqa", "shapes-mix")


def calibration_set(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    num_images: int,
    seed: int = 0,
    image_size: int = 48,
    fmt: PromptFormat = BUILTIN,
    instruction_tokenizer: PreTrainedTokenizerBase | None = None,
) -> EncodedSet:
    """Encoded examples (prompt + target text) from `num_images` training images.

    `shapes-captions` has one caption per image, `shapes-vqa` every question, `shapes-mix` both.
    """
    if name not in CALIBRATION_SETS:
        raise ValueError(f"calibration data {name!r} is not one of {', '.join(CALIBRATION_SETS)}")
    if num_images <= 0:
        raise ValueError(f"calibration samples {num_images} must be positive")
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
