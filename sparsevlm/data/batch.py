"""Examples → fixed-shape, left-padded numpy batches for the VLM."""

from __future__ import annotations

import dataclasses
import io
import json
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image
from transformers import PreTrainedTokenizerBase

from sparsevlm.config import VisionConfig
from sparsevlm.data.prompts import BUILTIN, PromptFormat, encode

if TYPE_CHECKING:  # imported where a dataset is read, so the library imports without `datasets`
    import datasets


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch. Text is left-padded: `[PAD … PAD BOS prompt (target EOS)]`.

    `loss_mask[b, t]` is True where `tokens[b, t]` is a target token (predicted from position t-1).
    """

    images: np.ndarray  # float32 [B, H, W, C], normalised
    tokens: np.ndarray  # int32 [B, T]
    text_mask: np.ndarray  # bool [B, T]
    loss_mask: np.ndarray  # bool [B, T]
    # InstructBLIP: the prompt in the Q-Former's own tokenizer, right-padded (its positions count from 0).
    instruction_tokens: np.ndarray | None = None  # int32 [B, Tq]
    instruction_mask: np.ndarray | None = None  # bool [B, Tq]
    # Shared-image packing (`PackedSet`): k >= 1 on a row's k-th text, 0 on padding; None: one text per row.
    segments: np.ndarray | None = None  # int32 [B, T]

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
    instructions: Sequence[list[int]] | None = None,
    instruction_length: int | None = None,
) -> Batch:
    """Left-pad encoded sequences to `length`; targets are the ids after each prompt.

    `instructions` (InstructBLIP's Q-Former prompt ids) are right-padded with 0 to `instruction_length`.
    """
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
    batch_images = preprocess_images(images, vision)
    if instructions is None:
        return Batch(batch_images, tokens, text_mask, loss_mask)
    width = instruction_length or max(len(ids) for ids in instructions)
    instruction_tokens = np.zeros((batch, width), np.int32)
    instruction_mask = np.zeros((batch, width), bool)
    for row, ids in enumerate(instructions):
        if len(ids) > width:
            raise ValueError(f"instruction of {len(ids)} tokens does not fit instruction_length={width}")
        instruction_tokens[row, : len(ids)] = ids
        instruction_mask[row, : len(ids)] = True
    return Batch(batch_images, tokens, text_mask, loss_mask, instruction_tokens, instruction_mask)


@dataclasses.dataclass(frozen=True)
class EncodedSet:
    """A dataset decoded once into arrays: unique images plus per-example token sequences."""

    images: np.ndarray  # uint8 [num_images, H, W, C]
    image_index: np.ndarray  # int [num_examples] → row of `images`
    sequences: list[tuple[list[int], int]]
    question_types: list[str]
    answers: list[str]
    questions: list[str]
    instructions: list[list[int]] | None = None  # InstructBLIP: Q-Former prompt ids per example

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def instruction_length(self) -> int | None:
        """Longest instruction rounded up to a multiple of 8 (one shape for every batch), if any."""
        if self.instructions is None:
            return None
        return -(-max(len(ids) for ids in self.instructions) // 8) * 8

    def collate(self, chosen: np.ndarray, length: int, pad_id: int, vision: VisionConfig) -> Batch:
        """The examples at `chosen` as one batch."""
        instructions = None if self.instructions is None else [self.instructions[i] for i in chosen]
        return collate(self.images[self.image_index[chosen]], [self.sequences[i] for i in chosen], length, pad_id,
                       vision, instructions, self.instruction_length)

    @property
    def max_length(self) -> int:
        """Longest encoded sequence."""
        return max(len(ids) for ids, _ in self.sequences)

    def image_rows(self, chosen: np.ndarray) -> np.ndarray:
        """The rows of `images` the examples at `chosen` show."""
        return self.image_index[np.asarray(chosen)]


@dataclasses.dataclass(frozen=True)
class PackedSet:
    """An `EncodedSet` seen image by image: example i is image i with all its texts in one row (`pack_by_image`)."""

    data: EncodedSet
    groups: tuple[np.ndarray, ...]  # per image row, its examples in order

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def max_length(self) -> int:
        """Longest packed row: an image's texts end to end."""
        return max(sum(len(self.data.sequences[i][0]) for i in group) for group in self.groups)

    def image_rows(self, chosen: np.ndarray) -> np.ndarray:
        """The rows of `images` the packed examples at `chosen` show (example i is image i)."""
        return np.asarray(chosen)

    def collate(self, chosen: np.ndarray, length: int, pad_id: int, vision: VisionConfig) -> Batch:
        """One row per chosen image, left-padded: `[PAD … text 1 | text 2 | …]`, `segments` numbering the texts."""
        tokens = np.full((len(chosen), length), pad_id, np.int32)
        text_mask = np.zeros((len(chosen), length), bool)
        loss_mask = np.zeros((len(chosen), length), bool)
        segments = np.zeros((len(chosen), length), np.int32)
        for row, image in enumerate(chosen):
            texts = [self.data.sequences[i] for i in self.groups[image]]
            used = sum(len(ids) for ids, _ in texts)
            if used > length:
                raise ValueError(f"image {image}'s {len(texts)} texts take {used} tokens and do not fit length={length}")
            start = length - used
            for k, (ids, n_prompt) in enumerate(texts, start=1):
                tokens[row, start:start + len(ids)] = ids
                loss_mask[row, start + n_prompt:start + len(ids)] = True
                segments[row, start:start + len(ids)] = k
                start += len(ids)
            text_mask[row, length - used:] = True
        images = preprocess_images(self.data.images[np.asarray(chosen)], vision)
        return Batch(images, tokens, text_mask, loss_mask, segments=segments)


def pack_by_image(data: EncodedSet) -> PackedSet:
    """`data` with each image's texts packed into one row that shares the image's tokens (shared-image packing).

    Each text attends only to the image and to itself, at the positions it would have alone
    (`models.vlm.packed_layout`), so a packed row trains as its texts would in rows of their own,
    while the image's tokens are computed once instead of once per text.
    """
    if data.instructions is not None:
        raise ValueError("texts with Q-Former instructions cannot share an image row (its Q-Former reads one "
                         "instruction per image)")
    order = np.argsort(data.image_index, kind="stable")
    counts = np.bincount(data.image_index, minlength=len(data.images))
    if not counts.all():
        raise ValueError(f"{int((counts == 0).sum())} images have no text to pack")
    return PackedSet(data, tuple(np.split(order, np.cumsum(counts)[:-1])))


def encode_vqa(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    with_targets: bool,
    prompt_column: str = "question",
    target_column: str = "answer",
    fmt: PromptFormat = BUILTIN,
    instruction_tokenizer: PreTrainedTokenizerBase | None = None,
    image_size: int | None = None,
    image_processor: Any = None,
) -> EncodedSet:
    """Decode each distinct image once and tokenize every row of a VQA-style dataset.

    With `instruction_tokenizer` (InstructBLIP's Q-Former tokenizer) the formatted prompt is also
    encoded with it, as the HF processor does. With `image_size` every image is fitted to that
    square size (`fit_image`), so datasets of mixed image sizes stack.
    """
    import datasets

    image_rows: dict[int, int] = {}
    decoded: list[np.ndarray] = []
    plain = dataset.cast_column("image", datasets.Image(decode=False))
    image_ids = plain["image_id"]
    image_cells = plain["image"]
    index = np.empty(len(plain), np.int64)
    for i, (image_id, cell) in enumerate(zip(image_ids, image_cells)):
        if image_id not in image_rows:
            image_rows[image_id] = len(decoded)
            image = decode_image(cell)
            decoded.append(image if image_size is None else fit_image(image, image_size, image_processor))
        index[i] = image_rows[image_id]
    prompts = plain[prompt_column]
    targets = plain[target_column]
    sequences = [encode(tokenizer, p, t if with_targets else None, fmt) for p, t in zip(prompts, targets)]
    types = plain["question_type"] if "question_type" in plain.column_names else ["vqa"] * len(plain)
    instructions = None
    if instruction_tokenizer is not None:
        instructions = [instruction_tokenizer(fmt.template.format(question=p))["input_ids"] for p in prompts]
    shapes = {image.shape for image in decoded}
    if len(shapes) > 1:
        raise ValueError(f"images have {len(shapes)} different shapes (e.g. {sorted(shapes)[:2]}): pass image_size")
    return EncodedSet(np.stack(decoded), index, sequences, list(types), list(targets), list(prompts), instructions)


def fit_image(image: np.ndarray, size: int, image_processor: Any = None) -> np.ndarray:
    """uint8 `[H, W, C]` → uint8 `[size, size, C]`: the HF image processor's resize and crop when given
    (its rescaling and normalisation happen later, from the config), else a bicubic resize."""
    if image_processor is not None:
        out = image_processor(image, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
        out = np.moveaxis(np.asarray(out), 0, -1) if out.shape[0] in (1, 3) else np.asarray(out)
        if out.shape[:2] != (size, size):
            raise ValueError(f"the image processor made {out.shape[0]}x{out.shape[1]} images, the model takes {size}")
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def iterate_batches(
    data: EncodedSet,
    batch_size: int,
    length: int,
    pad_id: int,
    vision: VisionConfig,
    rng: np.random.Generator | None = None,
    drop_remainder: bool = False,
    indices: np.ndarray | None = None,
) -> Iterator[tuple[Batch, np.ndarray]]:
    """Batches in order (or shuffled with `rng`) with their example indices; the last one is padded up.

    `indices` restricts the batches to those examples (e.g. one length bucket).
    """
    order = np.arange(len(data)) if indices is None else np.asarray(indices)
    if rng is not None:
        order = rng.permutation(order)
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
        yield data.collate(chosen, length, pad_id, vision), real


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= `value` (bucketed lengths → fewer compilations)."""
    return -(-value // multiple) * multiple


def length_buckets(lengths: Sequence[int], smallest: int = 8) -> dict[int, np.ndarray]:
    """Example indices grouped by padded length: the next power of two (at least `smallest`).

    Batching each group at its own length keeps padding small while the number of distinct
    shapes, and so of compilations, stays at most log2(longest / smallest) + 1.
    """
    lengths = np.asarray(lengths)
    padded = np.maximum(smallest, 2 ** np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64))
    return {int(size): np.flatnonzero(padded == size) for size in np.unique(padded)}


class BatchStream:
    """Shuffled full batches, epoch after epoch, whose position can be saved and restored exactly.

    Each epoch draws a permutation from `rng` when its first batch is needed; `state()` holds that
    permutation, the position in it and the generator's state (several streams may share one
    generator: restoring any of their states restores it). With `rows` only those rows of each
    batch are collated (a process's share of a global batch); which examples a batch holds, and the
    state, do not depend on it.
    """

    def __init__(self, data: EncodedSet | PackedSet, batch_size: int, length: int, pad_id: int, vision: VisionConfig,
                 rng: np.random.Generator, rows: slice | None = None) -> None:
        if batch_size > len(data):
            raise ValueError(f"batch size {batch_size} is larger than the {len(data)} examples")
        self.data, self.batch_size, self.length, self.pad_id, self.vision = data, batch_size, length, pad_id, vision
        self.rng, self.rows = rng, rows if rows is not None else slice(0, batch_size)
        self.order: np.ndarray | None = None
        self.position = 0

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Batch:
        if self.order is None or self.position + self.batch_size > len(self.order):
            self.order, self.position = self.rng.permutation(len(self.data)), 0
        chosen = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.data.collate(chosen[self.rows], self.length, self.pad_id, self.vision)

    def example(self) -> Batch:
        """A batch of the first examples, shaped like every batch of the stream (its position unmoved)."""
        return self.data.collate(np.arange(self.batch_size)[self.rows], self.length, self.pad_id, self.vision)

    def state(self) -> dict[str, Any]:
        """The current epoch's order, the position in it and the generator's state, JSON-serialisable."""
        return {"order": None if self.order is None else self.order.tolist(), "position": self.position,
                "rng": rng_state(self.rng)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state()`; a clear error if it does not fit this data."""
        order, position = state.get("order"), state.get("position")
        if order is not None:
            order = np.asarray(order, np.int64)
            if order.shape != (len(self.data),) or not np.array_equal(np.sort(order), np.arange(len(self.data))):
                raise ValueError(f"saved data order does not permute these {len(self.data)} examples")
        if not isinstance(position, int) or not 0 <= position <= (len(self.data) if order is not None else 0):
            raise ValueError(f"saved data position {position!r} is out of range")
        if "rng" not in state:
            raise ValueError("saved data position has no random-generator state")
        set_rng_state(self.rng, state["rng"])
        self.order, self.position = order, position


class MixedStream:
    """Each batch from one of several streams, drawn with the given probabilities from a shared generator."""

    def __init__(self, streams: Sequence[BatchStream], weights: Sequence[float], rng: np.random.Generator) -> None:
        weights = np.asarray(weights, float)
        if len(streams) != len(weights) or not len(streams) or (weights < 0).any() or not weights.sum() > 0:
            raise ValueError(f"stream weights {weights.tolist()} must be non-negative, one per stream, not all 0")
        self.streams, self.probabilities, self.rng = list(streams), weights / weights.sum(), rng

    def __iter__(self) -> "MixedStream":
        return self

    def __next__(self) -> Batch:
        return next(self.streams[int(self.rng.choice(len(self.streams), p=self.probabilities))])

    def state(self) -> dict[str, Any]:
        """Every stream's position and the shared generator's state."""
        return {"streams": [stream.state() for stream in self.streams], "rng": rng_state(self.rng)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state()`."""
        saved = state.get("streams")
        if not isinstance(saved, list) or len(saved) != len(self.streams):
            raise ValueError(f"saved data position holds {len(saved) if isinstance(saved, list) else 'no'} streams, "
                             f"this run has {len(self.streams)}")
        for stream, position in zip(self.streams, saved):
            stream.load_state(position)
        set_rng_state(self.rng, state["rng"])


class RandomRows:
    """Batches of rows drawn uniformly with replacement from aligned arrays (`{name: array}`).

    With `rows` only those rows of each drawn batch are returned (a process's share of a global batch).
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, rng: np.random.Generator,
                 rows: slice | None = None) -> None:
        sizes = {len(v) for v in arrays.values()}
        if len(sizes) != 1:
            raise ValueError(f"arrays have different lengths {sorted(sizes)}")
        self.arrays, self.batch_size, self.rng, self.size = dict(arrays), batch_size, rng, sizes.pop()
        self.rows = rows if rows is not None else slice(0, batch_size)

    def __iter__(self) -> "RandomRows":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        index = self.rng.integers(0, self.size, self.batch_size)[self.rows]
        return {name: value[index] for name, value in self.arrays.items()}

    def example(self) -> dict[str, np.ndarray]:
        """A batch shaped like every batch of the stream (its position unmoved)."""
        index = np.arange(self.batch_size)[self.rows] % self.size
        return {name: value[index] for name, value in self.arrays.items()}

    def state(self) -> dict[str, Any]:
        """The generator's state."""
        return {"rng": rng_state(self.rng)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state()`."""
        set_rng_state(self.rng, state["rng"])


def rng_state(rng: np.random.Generator) -> str:
    """A numpy generator's state as JSON text (its 128-bit integers kept exact)."""
    return json.dumps(rng.bit_generator.state)


def set_rng_state(rng: np.random.Generator, state: str) -> None:
    """Put a generator back in a state from `rng_state`."""
    try:
        rng.bit_generator.state = json.loads(state)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"saved random-generator state is unusable: {err}") from None
