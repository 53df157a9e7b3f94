"""Vision towers: CLIP (LLaVA) and the BLIP-2 / InstructBLIP ViT — HF config → `VisionConfig`, and name rules."""

from __future__ import annotations

from typing import Any, Sequence

from sparsevlm.config import VisionConfig
from sparsevlm.hf.rules import Rule, layer_rules, linear_rules, norm_rules, rule, unused_rules

_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def _act(hf_config: Any) -> str:
    if hf_config.hidden_act not in _ACTIVATIONS:
        raise ValueError(
            f"vision_config.hidden_act={hf_config.hidden_act!r} is not supported; allowed: {', '.join(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[hf_config.hidden_act]


def _shared_fields(hf_config: Any, image_mean: Sequence[float], image_std: Sequence[float]) -> dict[str, Any]:
    """The ViT fields CLIP and BLIP-2 configs spell the same way, plus the processor's normalisation."""
    return dict(
        image_size=hf_config.image_size,
        patch_size=hf_config.patch_size,
        num_channels=getattr(hf_config, "num_channels", 3),
        width=hf_config.hidden_size,
        depth=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        mlp_dim=hf_config.intermediate_size,
        act=_act(hf_config),
        norm_eps=hf_config.layer_norm_eps,
        image_mean=tuple(float(v) for v in image_mean),
        image_std=tuple(float(v) for v in image_std),
    )


def clip_config(
    hf_config: Any,
    feature_layer: int,
    select_strategy: str,
    image_mean: Sequence[float],
    image_std: Sequence[float],
) -> VisionConfig:
    """A `CLIPVisionConfig` plus LLaVA's feature-layer choice as our `VisionConfig`."""
    if not isinstance(feature_layer, int):
        raise ValueError(f"vision_feature_layer={feature_layer!r} is not supported; only a single layer index is")
    if select_strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy={select_strategy!r} is not supported; allowed: default, full")
    return VisionConfig(
        **_shared_fields(hf_config, image_mean, image_std),
        patch_bias=False,
        qkv_bias=True,
        use_cls_token=True,
        pre_norm=True,
        final_norm=True,
        feature_layer=feature_layer,
        drop_cls_token=select_strategy == "default",
    )


def blip_config(hf_config: Any, image_mean: Sequence[float], image_std: Sequence[float]) -> VisionConfig:
    """A `Blip2VisionConfig` / `InstructBlipVisionConfig` as our `VisionConfig` (all tokens, post-norm)."""
    return VisionConfig(
        **_shared_fields(hf_config, image_mean, image_std),
        patch_bias=True,
        qkv_bias=bool(getattr(hf_config, "qkv_bias", True)),
        use_cls_token=True,
        pre_norm=False,
        final_norm=True,
        feature_layer=-1,
        drop_cls_token=False,
    )


def _unused_tail(config: VisionConfig, prefix: str, block: Any) -> list[Rule]:
    """Layers after the feature layer (and the final norm then) are kept for export only."""
    names = [r.hf for i in range(config.blocks_used, config.depth) for r in block(i)]
    if config.blocks_used < config.depth:
        names += [f"{prefix}post_layernorm.weight", f"{prefix}post_layernorm.bias"]
    return unused_rules(names)


def clip_rules(config: VisionConfig, prefix: str) -> list[Rule]:
    """Names of a saved `CLIPVisionModel` under `prefix` (e.g. `vision_tower.`) ↔ `vision/...`."""

    def block(i: int) -> list[Rule]:
        hf, ours = f"{prefix}encoder.layers.{i}", f"vision/blocks_{i}"
        return [
            *norm_rules(f"{hf}.layer_norm1", f"{ours}/norm1"),
            *linear_rules(f"{hf}.self_attn.q_proj", f"{ours}/attn/q"),
            *linear_rules(f"{hf}.self_attn.k_proj", f"{ours}/attn/k"),
            *linear_rules(f"{hf}.self_attn.v_proj", f"{ours}/attn/v"),
            *linear_rules(f"{hf}.self_attn.out_proj", f"{ours}/attn/o"),
            *norm_rules(f"{hf}.layer_norm2", f"{ours}/norm2"),
            *linear_rules(f"{hf}.mlp.fc1", f"{ours}/mlp/up"),
            *linear_rules(f"{hf}.mlp.fc2", f"{ours}/mlp/down"),
        ]

    rules = [
        rule(f"{prefix}embeddings.class_embedding", "vision/cls_token"),
        rule(f"{prefix}embeddings.patch_embedding.weight", "vision/patch_embed/kernel", "conv"),
        rule(f"{prefix}embeddings.position_embedding.weight", "vision/pos_embed"),
        *norm_rules(f"{prefix}pre_layrnorm", "vision/pre_norm"),
        *layer_rules(config.blocks_used, block),
    ]
    if config.blocks_used == config.depth:
        rules += norm_rules(f"{prefix}post_layernorm", "vision/final_norm")
    return rules + _unused_tail(config, prefix, block)


def blip_rules(config: VisionConfig, prefix: str, split_qv_bias: bool) -> list[Rule]:
    """Names of a saved BLIP-2 vision model under `prefix` (e.g. `vision_model.`) ↔ `vision/...`.

    HF fuses q, k, v into one `qkv` linear. Hub checkpoints store its bias as `q_bias` and
    `v_bias` (no k bias: ours is zeros); transformers v5 saves one fused `qkv.bias`.
    """

    def block(i: int) -> list[Rule]:
        hf, ours = f"{prefix}encoder.layers.{i}", f"vision/blocks_{i}"
        qkv = tuple(f"{ours}/attn/{p}" for p in "qkv")
        attention = linear_rules(f"{hf}.self_attn.qkv", qkv, bias=config.qkv_bias and not split_qv_bias)
        if config.qkv_bias and split_qv_bias:
            attention += [
                rule(f"{hf}.self_attn.q_bias", f"{ours}/attn/q/bias"),
                Rule("", (f"{ours}/attn/k/bias",), "zeros"),
                rule(f"{hf}.self_attn.v_bias", f"{ours}/attn/v/bias"),
            ]
        return [
            *norm_rules(f"{hf}.layer_norm1", f"{ours}/norm1"),
            *attention,
            *linear_rules(f"{hf}.self_attn.projection", f"{ours}/attn/o"),
            *norm_rules(f"{hf}.layer_norm2", f"{ours}/norm2"),
            *linear_rules(f"{hf}.mlp.fc1", f"{ours}/mlp/up"),
            *linear_rules(f"{hf}.mlp.fc2", f"{ours}/mlp/down"),
        ]

    return [
        rule(f"{prefix}embeddings.class_embedding", "vision/cls_token", "squeeze", lead=2),
        rule(f"{prefix}embeddings.patch_embedding.weight", "vision/patch_embed/kernel", "conv"),
        rule(f"{prefix}embeddings.patch_embedding.bias", "vision/patch_embed/bias"),
        rule(f"{prefix}embeddings.position_embedding", "vision/pos_embed", "squeeze"),
        *layer_rules(config.blocks_used, block),
        *norm_rules(f"{prefix}post_layernorm", "vision/final_norm"),
    ]
