"""Calibration sets for pruning, by name."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from sparsevlm.data import shapes
from sparsevlm.data.batch import EncodedSet, encode_vqa

# Captions stand in for the paper's CC3M calibration captions; questions are the task's own data.
CALIBRATION_SETS = ("shapes-captions", "shapes-vqa")


def calibration_set(
    name: str, tokenizer: PreTrainedTokenizerBase, num_images: int, seed: int = 0, image_size: int = 48
) -> EncodedSet:
    """Encoded calibration examples (prompt + target text) from `num_images` training images."""
    if name not in CALIBRATION_SETS:
        raise ValueError(f"calibration data {name!r} is not one of {', '.join(CALIBRATION_SETS)}")
    if num_images <= 0:
        raise ValueError(f"calibration samples {num_images} must be positive")
    train = shapes.build_split("train", num_images, seed=seed, image_size=image_size)
    if name == "shapes-captions":
        train = shapes.captioning_view(train)
    return encode_vqa(train, tokenizer, with_targets=True)
