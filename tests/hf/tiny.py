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


LLAVA_PROMPTS = ["USER: <image> what color is the shape ? ASSISTANT:", "USER: <image> how many ? ASSISTANT:"]
BLIP_PROMPTS = ["Question: what color is the shape ? Short answer:", "Question: how many ? Short answer:"]
FAMILIES = {
    # name: (HF class, prompts, the paper's LoRA modules)
    "llava-llama": ("LlavaForConditionalGeneration", LLAVA_PROMPTS, ("clip", "mlp", "llama")),
    "blip2-opt": ("Blip2ForConditionalGeneration", BLIP_PROMPTS, ("blip_vit", "qformer", "opt")),
    "instructblip-llama": ("InstructBlipForConditionalGeneration", BLIP_PROMPTS, ("blip_vit", "qformer", "llama")),
    "blip2-flant5": ("Blip2ForConditionalGeneration", BLIP_PROMPTS, ("blip_vit", "qformer", "t5")),
    "instructblip-flant5": ("InstructBlipForConditionalGeneration", BLIP_PROMPTS, ("blip_vit", "qformer", "t5")),
}


def word_tokenizer(
    words: tuple[str, ...] = tuple(WORDS), image_token: bool = True, declare_image_token: bool = True
) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer: ids 0–4 are pad, unk, BOS, EOS, image; then the words."""
    specials = SPECIALS if image_token else SPECIALS[:4]
    vocab = {token: i for i, token in enumerate(specials)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # InstructBlipProcessor wants to declare the image token itself (it needs an AddedToken).
    extra = {"extra_special_tokens": {"image_token": "<image>"}} if image_token and declare_image_token else {}
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


def _blip_image_processor() -> Any:
    from transformers import BlipImageProcessor

    return BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def _blip_vision_and_qformer(width: int, reads_text: bool) -> tuple[Any, Any]:
    from transformers import Blip2QFormerConfig, Blip2VisionConfig, InstructBlipQFormerConfig, InstructBlipVisionConfig

    vision_cls, qformer_cls = (InstructBlipVisionConfig, InstructBlipQFormerConfig) if reads_text else (
        Blip2VisionConfig, Blip2QFormerConfig)
    vision = vision_cls(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                        image_size=IMAGE_SIZE, patch_size=PATCH)
    extra = {"vocab_size": len(word_tokenizer(image_token=False)), "pad_token_id": 0} if reads_text else {}
    qformer = qformer_cls(hidden_size=width, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * width,
                          encoder_hidden_size=width, **extra)
    return vision, qformer


def _language_config(text: str, width: int) -> Any:
    """A tiny OPT, Llama or FlanT5 config sharing the word tokenizer's ids."""
    from transformers import LlamaConfig, OPTConfig, T5Config

    ids = {"vocab_size": vocab_size(), "eos_token_id": 3, "pad_token_id": 0}
    if text == "opt":
        return OPTConfig(hidden_size=width, ffn_dim=2 * width, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=width, bos_token_id=2, max_position_embeddings=128, **ids)
    if text == "llama":
        return LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, bos_token_id=2, **ids)
    if text == "flant5":
        return T5Config(d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_decoder_layers=2, num_heads=4,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, **ids)
    raise ValueError(f"text={text!r} is not one of opt, llama, flant5")


def _untie_t5_head(model: Any) -> None:
    # A fresh v5 T5 is always tied; FlanT5 checkpoints have their own head (see hf/t5.py).
    language = model.language_model
    language.lm_head.weight = torch.nn.Parameter(torch.randn_like(language.lm_head.weight) * 0.05)
    language.config.tie_word_embeddings = False


def _save_blip(directory: Path, instruct: bool, text: str, seed: int, width: int, queries: int) -> Path:
    """A tiny BLIP-2 / InstructBLIP (BLIP ViT + Q-Former + `text` language model) with its processor."""
    import transformers

    kind = "InstructBlip" if instruct else "Blip2"
    torch.manual_seed(seed)
    # The BLIP processors declare the image token themselves (they need an AddedToken).
    tokenizer = word_tokenizer(declare_image_token=False)
    vision, qformer = _blip_vision_and_qformer(width, reads_text=instruct)
    config = getattr(transformers, f"{kind}Config")(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
        text_config=_language_config(text, width).to_dict(), num_query_tokens=queries,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = getattr(transformers, f"{kind}ForConditionalGeneration")(config).eval()
    if text == "flant5":
        _untie_t5_head(model)
    _perturb(model)
    model.save_pretrained(directory)
    extra = {"qformer_tokenizer": word_tokenizer(image_token=False)} if instruct else {}
    getattr(transformers, f"{kind}Processor")(
        image_processor=_blip_image_processor(), tokenizer=tokenizer, num_query_tokens=queries, **extra
    ).save_pretrained(directory)
    return directory


def save_blip2(directory: Path, text: str = "opt", seed: int = 0, width: int = 32, queries: int = 4) -> Path:
    """A tiny `Blip2ForConditionalGeneration` (language model `text`: opt or flant5) with its `Blip2Processor`."""
    return _save_blip(directory, False, text, seed, width, queries)


def save_instructblip(directory: Path, text: str = "llama", seed: int = 0, width: int = 32, queries: int = 4) -> Path:
    """A tiny `InstructBlipForConditionalGeneration` (language `text`: llama or flant5) with its processor."""
    return _save_blip(directory, True, text, seed, width, queries)


def bare_language_params(rules: Any, tensors: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> dict:
    """A saved language model's tensors as params of the bare language module (the `language/` prefix dropped)."""
    from sparsevlm import tree
    from sparsevlm.hf.rules import to_ours

    flat = dict(to_ours(rules, tensors.__getitem__, expected, np.float32))
    return tree.unflatten({k.removeprefix("language/"): v for k, v in flat.items()})


def saved_tensors(model: torch.nn.Module, directory: Path) -> dict[str, np.ndarray]:
    """`save_pretrained` a model and read back every tensor of its single safetensors file."""
    import safetensors

    model.save_pretrained(directory)
    with safetensors.safe_open(str(directory / "model.safetensors"), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
