"""Random-weight HF LLaVA checkpoints (CLIP + Llama) of named sizes, shared by the benchmarks.

`--config` in the benchmarks picks one of `SIZES` (or a JSON file with the same keys):

- `quick`: 7.5 MiB, for smoke tests;
- `small`: 247 MiB float32 (62M params): the weights dwarf allocator and tracing noise, yet a laptop
  or a CI runner trains it;
- `1b`: CLIP ViT-L/14-336 (303M) + a TinyLlama-shaped decoder (1.1B): ~1.4B params, for a GPU.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

# width/text_layers/mlp/heads/kv_heads/vocab: the Llama; vision_*: the CLIP tower; shard: save_pretrained's
# max_shard_size.
SIZES: dict[str, dict[str, Any]] = {
    "quick": {"width": 128, "text_layers": 2, "mlp": 352, "heads": 8, "kv_heads": 8, "vocab": 4000,
              "vision_width": 128, "vision_layers": 2, "vision_heads": 8, "image_size": 64, "patch": 16,
              "shard": "2MB"},
    "small": {"width": 640, "text_layers": 6, "mlp": 1792, "heads": 8, "kv_heads": 8, "vocab": 16000,
              "vision_width": 512, "vision_layers": 4, "vision_heads": 8, "image_size": 64, "patch": 16,
              "shard": "50MB"},
    "1b": {"width": 2048, "text_layers": 22, "mlp": 5632, "heads": 32, "kv_heads": 4, "vocab": 32000,
           "vision_width": 1024, "vision_layers": 24, "vision_heads": 16, "image_size": 336, "patch": 14,
           "shard": "2GB"},
}
IMAGE_TOKEN = "<image>"


def sizes(name_or_path: str) -> dict[str, Any]:
    """A preset from `SIZES`, or a JSON file of the same keys."""
    if name_or_path in SIZES:
        return dict(SIZES[name_or_path])
    path = Path(name_or_path)
    if not path.is_file():
        raise SystemExit(f"--config {name_or_path!r} is neither a preset ({', '.join(SIZES)}) nor a JSON file")
    loaded = json.loads(path.read_text())
    missing = set(SIZES["quick"]) - set(loaded)
    if missing:
        raise SystemExit(f"--config {name_or_path}: missing keys {', '.join(sorted(missing))}")
    return loaded


def hf_config(sizes: dict[str, Any]) -> Any:
    """The transformers `LlavaConfig` of these sizes (image token id 4, pad 0, bos 2, eos 3)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=sizes["vision_width"], intermediate_size=4 * sizes["vision_width"],
                              num_hidden_layers=sizes["vision_layers"], num_attention_heads=sizes["vision_heads"],
                              image_size=sizes["image_size"], patch_size=sizes["patch"],
                              projection_dim=sizes["vision_width"])
    text = LlamaConfig(vocab_size=sizes["vocab"], hidden_size=sizes["width"], intermediate_size=sizes["mlp"],
                       num_hidden_layers=sizes["text_layers"], num_attention_heads=sizes["heads"],
                       num_key_value_heads=sizes["kv_heads"], bos_token_id=2, eos_token_id=3, pad_token_id=0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=4,
                       image_seq_length=(sizes["image_size"] // sizes["patch"]) ** 2)


def build_checkpoint(directory: Path, sizes: dict[str, Any], seed: int = 0) -> Path:
    """Save a random float32 LLaVA of `sizes` and its processor to `directory`, sharded by transformers."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    # The loader reads the processor too; its vocabulary need not cover the embedding table.
    vocab = {token: i for i, token in enumerate(("<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN, "a", "picture"))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>",
                                        extra_special_tokens={"image_token": IMAGE_TOKEN})
    model = LlavaForConditionalGeneration(hf_config(sizes)).eval()
    model.save_pretrained(directory, max_shard_size=sizes["shard"])
    del model
    gc.collect()
    image = sizes["image_size"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=sizes["patch"],
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(directory)
    return directory
