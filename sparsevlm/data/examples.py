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
from sparsevlm.data.tasks import BUILTIN_TASKS, TASK_SPECS, builtin_set, parse_data_spec
from sparsevlm.data.tokenize import SPECIAL_TOKENS

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
    _check_task_matches(name, task, tokenizer)
    data = task_module(task)
    train = data.build_split("train", num_images, seed=seed, image_size=image_size)
    if view == "vqa":
        rows = train
    elif view == "captions":
        rows = data.captioning_view(train)
    else:
        import datasets  # here, not at the top, so the library imports without `datasets`

        rows = datasets.concatenate_datasets([train, data.captioning_view(train)])
    return encode_vqa(rows, tokenizer, with_targets=True, fmt=fmt, instruction_tokenizer=instruction_tokenizer)


def _check_task_matches(name: str, task: str, tokenizer: PreTrainedTokenizerBase) -> None:
    """A clear error when a built-in model (its tokenizer: a built-in task's vocabulary) is given another task's set."""
    words = set(tokenizer.get_vocab()) - set(SPECIAL_TOKENS)
    owner = next((t for t in BUILTIN_TASKS if set(task_module(t).vocabulary()) == words), None)
    if owner is not None and owner != task:
        raise ValueError(f"data {name!r} is {task} VQA, but the model was pretrained on {owner} VQA and its tokenizer "
                         f"lacks the {task} words: use {owner}-captions, {owner}-vqa or {owner}-mix")
