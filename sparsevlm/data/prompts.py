"""How a question becomes prompt token ids for each model family (template, image tokens, BOS)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from transformers import PreTrainedTokenizerBase

IMAGE_MARKER = "<image>"
IMAGE_PLACEMENTS = ("model", "prefix", "marker")


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """Prompt template (with `{question}`) and where the image placeholder tokens go.

    `image`: `model` — the model puts image tokens before the text itself (the built-in model);
    `prefix` — placeholders before everything, BOS included (HF BLIP-2 / InstructBLIP processors);
    `marker` — placeholders where the template says `<image>` (HF LLaVA).
    """

    template: str = "{question}"
    image: str = "model"
    image_token_id: int | None = None
    num_image_tokens: int = 0
    add_bos: bool = True
    add_eos_to_prompt: bool = False  # T5 encoders read `prompt </s>`

    def __post_init__(self) -> None:
        if self.image not in IMAGE_PLACEMENTS:
            raise ValueError(f"prompt image placement {self.image!r} is not one of {', '.join(IMAGE_PLACEMENTS)}")
        if "{question}" not in self.template:
            raise ValueError(f"prompt template {self.template!r} has no {{question}} field")
        if self.image != "model" and self.image_token_id is None:
            raise ValueError(f"prompt image placement {self.image!r} needs an image_token_id")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PromptFormat":
        """Inverse of `dataclasses.asdict`."""
        return cls(**data)


BUILTIN = PromptFormat()
VQA_TEMPLATES = {
    "llava": "USER: <image>\n{question} ASSISTANT:",
    "blip2": "Question: {question} Short answer:",  # the paper's (and LAVIS's) VQA prompt
    "instructblip": "Question: {question} Short answer:",
}


def bundle_format(metadata: Mapping[str, Any]) -> PromptFormat:
    """A model's prompt format from its metadata (the built-in one when none is recorded)."""
    stored = metadata.get("prompt_format")
    return PromptFormat.from_dict(stored) if stored else BUILTIN


def caption_format(fmt: PromptFormat) -> PromptFormat:
    """The format for captioning prompts: a chat template (LLaVA) stays, a question template is dropped."""
    return fmt if fmt.image in ("model", "marker") else dataclasses.replace(fmt, template="{question}")


def family_format(family: str, image_token_id: int, num_image_tokens: int, encoder_decoder: bool) -> PromptFormat:
    """The VQA prompt format of an HF family, as its processor lays the tokens out."""
    return PromptFormat(
        template=VQA_TEMPLATES[family],
        image="marker" if family == "llava" else "prefix",
        image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
        add_bos=not encoder_decoder,
        add_eos_to_prompt=encoder_decoder,
    )


def encode(
    tokenizer: PreTrainedTokenizerBase, prompt: str, target: str | None, fmt: PromptFormat = BUILTIN
) -> tuple[list[int], int]:
    """Prompt ids (image placeholders, BOS and template included) `[+ target EOS]`, and the prompt length."""
    text = fmt.template.format(question=prompt)
    before, marker, after = text.partition(IMAGE_MARKER)
    images = [fmt.image_token_id] * fmt.num_image_tokens if fmt.image != "model" else []
    ids: list[int] = list(images) if fmt.image == "prefix" else []
    if fmt.add_bos:
        ids.append(tokenizer.bos_token_id)
    ids += tokenizer.encode(before, add_special_tokens=False)
    if marker:
        ids += images if fmt.image == "marker" else []
        ids += tokenizer.encode(after, add_special_tokens=False)
    if fmt.add_eos_to_prompt:
        ids.append(tokenizer.eos_token_id)
    n_prompt = len(ids)
    if target is not None:
        ids += tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]
    return ids, n_prompt
