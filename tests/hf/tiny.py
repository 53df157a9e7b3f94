"""Tiny random HF checkpoints (PyTorch, saved locally) with a word-level processor — no network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = (
    "USER ASSISTANT Question Short answer : what color is the shape ? how many are there a red blue green "
    "square circle triangle one two three yes no left right of image describe picture"
).split()
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
IMAGE_SIZE = 32
PATCH = 8


def word_tokenizer(words: tuple[str, ...] = tuple(WORDS), image_token: bool = True) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer: ids 0–4 are pad, unk, BOS, EOS, image; then the words."""
    specials = SPECIALS if image_token else SPECIALS[:4]
    vocab = {token: i for i, token in enumerate(specials)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"extra_special_tokens": {"image_token": "<image>"}} if image_token else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        **extra,
    )


def vocab_size() -> int:
    """Size of `word_tokenizer()`'s vocabulary, padded to a multiple of 8."""
    return -(-len(word_tokenizer()) // 8) * 8


def _clip_image_processor() -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )


def save_llava(directory: Path, seed: int = 0, width: int = 32, depth: int = 2) -> Path:
    """A tiny `LlavaForConditionalGeneration` (CLIP + Llama) with its `LlavaProcessor`."""
    from transformers import (
        CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=width,
    )
    text = LlamaConfig(
        vocab_size=vocab_size(), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=depth,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(IMAGE_SIZE // PATCH) ** 2)
    model = LlavaForConditionalGeneration(config).eval()
    _perturb(model)
    model.save_pretrained(directory)
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(), tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template="{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                      "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                      "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}",
    )
    processor.save_pretrained(directory)
    return directory


def _perturb(model: torch.nn.Module) -> None:
    """Random norms and biases too (HF initialises them to 1 / 0, which would hide mapping mistakes)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))


def random_image(seed: int = 0) -> np.ndarray:
    """A uint8 RGB image of the tiny models' size."""
    return np.random.default_rng(seed).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
