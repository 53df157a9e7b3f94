"""Examples → fixed-shape, left-padded numpy batches for the VLM."""

from __future__ import annotations

import dataclasses
import io
from typing import Iterator, Sequence

import datasets
import numpy as np
from PIL import Image
from transformers import PreTrainedTokenizerBase

from sparsevlm.config import VisionConfig
from sparsevlm.data.prompts import BUILTIN, PromptFormat, encode


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch. Text is left-padded: `[PAD … PAD BOS prompt (target EOS)]`.

    `loss_mask[b, t]` is True where `tokens[b, t]` is a target token (predicted from position t-1).
    """

    images: np.ndarray  # float32 [B, H, W, C], normalised
    tokens: np.ndarray  # int32 [B, T]
    text_mask: np.ndarray  # bool [B, T]
    loss_mask: np.ndarray  # bool [B, T]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def preprocess_images(images: np.ndarray, config: VisionConfig) -> np.ndarray:
    """uint8 `[B, H, W, C]` → float32 normalised with the config's mean/std (resized first if needed)."""
    if images.shape[1:3] != (config.image_size, config.image_size):
        # Bicubic, as the CLIP / BLIP image processors resize (square inputs: no crop needed).
        size = (config.image_size, config.image_size)
        images = np.stack([np.asarray(Image.fromarray(im).resize(size, Image.BICUBIC)) for im in images])
    mean = np.asarray(config.image_mean, np.float32)
    std = np.asarray(config.image_std, np.float32)
    return ((images.astype(np.float32) / 255.0) - mean) / std


def decode_image(value: object) -> np.ndarray:
    """A `datasets.Image` cell (PIL image or `{"bytes", "path"}`) → uint8 RGB array."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes") is not None:
        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        image = Image.open(value["path"])
    else:
        raise ValueError(f"cannot decode an image from {type(value).__name__}")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def collate(
    images: np.ndarray,
    sequences: Sequence[tuple[list[int], int]],
    length: int,
    pad_id: int,
    vision: VisionConfig,
) -> Batch:
    """Left-pad encoded sequences to `length`; targets are the ids after each prompt."""
    batch = len(sequences)
    tokens = np.full((batch, length), pad_id, np.int32)
    text_mask = np.zeros((batch, length), bool)
    loss_mask = np.zeros((batch, length), bool)
    for row, (ids, n_prompt) in enumerate(sequences):
        if len(ids) > length:
            raise ValueError(f"sequence of {len(ids)} tokens does not fit length={length}")
        start = length - len(ids)
        tokens[row, start:] = ids
        text_mask[row, start:] = True
        loss_mask[row, start + n_prompt :] = True
    return Batch(preprocess_images(images, vision), tokens, text_mask, loss_mask)


@dataclasses.dataclass(frozen=True)
class EncodedSet:
    """A dataset decoded once into arrays: unique images plus per-example token sequences."""

    images: np.ndarray  # uint8 [num_images, H, W, C]
    image_index: np.ndarray  # int [num_examples] → row of `images`
    sequences: list[tuple[list[int], int]]
    question_types: list[str]
    answers: list[str]
    questions: list[str]

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def max_length(self) -> int:
        """Longest encoded sequence."""
        return max(len(ids) for ids, _ in self.sequences)


def encode_vqa(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    with_targets: bool,
    prompt_column: str = "question",
    target_column: str = "answer",
    fmt: PromptFormat = BUILTIN,
) -> EncodedSet:
    """Decode each distinct image once and tokenize every row of a VQA-style dataset."""
    image_rows: dict[int, int] = {}
    decoded: list[np.ndarray] = []
    plain = dataset.cast_column("image", datasets.Image(decode=False))
    image_ids = plain["image_id"]
    image_cells = plain["image"]
    index = np.empty(len(plain), np.int64)
    for i, (image_id, cell) in enumerate(zip(image_ids, image_cells)):
        if image_id not in image_rows:
            image_rows[image_id] = len(decoded)
            decoded.append(decode_image(cell))
        index[i] = image_rows[image_id]
    prompts = plain[prompt_column]
    targets = plain[target_column]
    sequences = [encode(tokenizer, p, t if with_targets else None, fmt) for p, t in zip(prompts, targets)]
    types = plain["question_type"] if "question_type" in plain.column_names else ["vqa"] * len(plain)
    return EncodedSet(np.stack(decoded), index, sequences, list(types), list(targets), list(prompts))


def iterate_batches(
    data: EncodedSet,
    batch_size: int,
    length: int,
    pad_id: int,
    vision: VisionConfig,
    rng: np.random.Generator | None = None,
    drop_remainder: bool = False,
) -> Iterator[tuple[Batch, np.ndarray]]:
    """Batches in order (or shuffled with `rng`) with their example indices; the last one is padded up."""
    order = np.arange(len(data)) if rng is None else rng.permutation(len(data))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        if len(chosen) < batch_size:
            if drop_remainder:
                return
            # Pad the final batch with repeats so shapes stay fixed (one compilation).
            chosen = np.concatenate([chosen, np.repeat(chosen[-1:], batch_size - len(chosen))])
            real = order[start : start + batch_size]
        else:
            real = chosen
        batch = collate(data.images[data.image_index[chosen]], [data.sequences[i] for i in chosen], length, pad_id, vision)
        yield batch, real


def endless_batches(
    data: EncodedSet, batch_size: int, length: int, pad_id: int, vision: VisionConfig, rng: np.random.Generator
) -> Iterator[Batch]:
    """Shuffled full batches, epoch after epoch."""
    while True:
        for batch, _ in iterate_batches(data, batch_size, length, pad_id, vision, rng, drop_remainder=True):
            yield batch
