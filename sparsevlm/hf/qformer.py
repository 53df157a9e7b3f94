"""BLIP-2 / InstructBLIP Q-Former: HF config → `ConnectorConfig`, and HF tensor names ↔ `connector/...`.

HF names as saved by `Blip2ForConditionalGeneration` / `InstructBlipForConditionalGeneration`
(transformers v5 saves them exactly as `state_dict()` shows them):

- `query_tokens` `[1, Q, W]`, `language_projection.{weight,bias}`;
- BLIP-2: `qformer.layernorm.*` (no text embeddings); InstructBLIP: `qformer.embeddings.{word_embeddings,
  position_embeddings,layernorm}.*`;
- per layer `qformer.encoder.layer.{i}.`: `attention.attention.{query,key,value}`, `attention.output.{dense,
  LayerNorm}`, (every `cross_attention_frequency` layers) `crossattention.*` likewise,
  `intermediate_query.dense`, `output_query.{dense,LayerNorm}`, and for InstructBLIP also the text FFN
  `intermediate.dense`, `output.{dense,LayerNorm}`.
"""

from __future__ import annotations

from typing import Any

from sparsevlm.config import ConnectorConfig
from sparsevlm.hf.rules import Rule, layer_rules, linear_rules, norm_rules, rule

FAMILIES = {"blip-2": False, "instructblip": True}  # HF model_type → whether the Q-Former reads text

# HF `hidden_act` → our activation name (HF "gelu" is the exact erf GELU).
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}


def connector_config(hf_config: Any) -> ConnectorConfig:
    """The Q-Former connector of a `Blip2Config` / `InstructBlipConfig`."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type={model_type!r} has no Q-Former connector; allowed: {', '.join(FAMILIES)}")
    q = hf_config.qformer_config
    position_type = getattr(q, "position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(
            f"qformer_config.position_embedding_type={position_type!r} is not supported; allowed: absolute"
        )
    if not isinstance(q.hidden_act, str) or q.hidden_act not in HF_ACTIVATIONS:
        raise ValueError(
            f"qformer_config.hidden_act={q.hidden_act!r} is not supported; allowed: {', '.join(HF_ACTIVATIONS)}"
        )
    reads_text = FAMILIES[model_type]
    if not reads_text and getattr(q, "use_qformer_text_input", False):
        # Such a checkpoint (made for image-text retrieval) also holds text embeddings and a text FFN
        # that BLIP-2 generation never runs; ConnectorConfig has no field to keep them for export.
        raise ValueError(
            "qformer_config.use_qformer_text_input=True is not supported for BLIP-2 generation; allowed: False"
        )
    return ConnectorConfig(
        kind="qformer",
        act=HF_ACTIVATIONS[q.hidden_act],
        num_query_tokens=hf_config.num_query_tokens,
        width=q.hidden_size,
        depth=q.num_hidden_layers,
        num_heads=q.num_attention_heads,
        mlp_dim=q.intermediate_size,
        cross_attention_frequency=q.cross_attention_frequency,
        norm_eps=q.layer_norm_eps,
        reads_text=reads_text,
        text_vocab_size=q.vocab_size,
        text_max_positions=q.max_position_embeddings,
        text_pad_id=q.pad_token_id if q.pad_token_id is not None else 0,
    )


def _attention_rules(hf: str, ours: str) -> list[Rule]:
    # BERT layout: `{hf}.attention.{query,key,value}` and the post-norm `{hf}.output.{dense,LayerNorm}`.
    return [
        *linear_rules(f"{hf}.attention.query", f"{ours}/q"),
        *linear_rules(f"{hf}.attention.key", f"{ours}/k"),
        *linear_rules(f"{hf}.attention.value", f"{ours}/v"),
        *linear_rules(f"{hf}.output.dense", f"{ours}/o"),
    ]


def _ffn_rules(intermediate: str, output: str, ours: str) -> list[Rule]:
    return [
        *linear_rules(f"{intermediate}.dense", f"{ours}/up"),
        *linear_rules(f"{output}.dense", f"{ours}/down"),
        *norm_rules(f"{output}.LayerNorm", f"{ours}_norm"),
    ]


def connector_rules(config: ConnectorConfig, prefix: str = "connector") -> list[Rule]:
    """Rules for `query_tokens`, `qformer.*` and `language_projection.*` ↔ `{prefix}/...`."""
    if config.kind != "qformer":
        raise ValueError(f"connector.kind={config.kind!r}: Q-Former rules need kind='qformer'")

    def layer(i: int) -> list[Rule]:
        hf, ours = f"qformer.encoder.layer.{i}", f"{prefix}/blocks_{i}"
        rules = [
            *_attention_rules(f"{hf}.attention", f"{ours}/attn"),
            *norm_rules(f"{hf}.attention.output.LayerNorm", f"{ours}/attn_norm"),
        ]
        if i % config.cross_attention_frequency == 0:
            rules += _attention_rules(f"{hf}.crossattention", f"{ours}/cross")
            rules += norm_rules(f"{hf}.crossattention.output.LayerNorm", f"{ours}/cross_norm")
        rules += _ffn_rules(f"{hf}.intermediate_query", f"{hf}.output_query", f"{ours}/mlp")
        if config.reads_text:
            rules += _ffn_rules(f"{hf}.intermediate", f"{hf}.output", f"{ours}/text_mlp")
        return rules

    if config.reads_text:
        embeddings = [
            rule("qformer.embeddings.word_embeddings.weight", f"{prefix}/word_embed/embedding"),
            rule("qformer.embeddings.position_embeddings.weight", f"{prefix}/pos_embed/embedding"),
            *norm_rules("qformer.embeddings.layernorm", f"{prefix}/embed_norm"),
        ]
    else:
        embeddings = norm_rules("qformer.layernorm", f"{prefix}/embed_norm")
    return [
        rule("query_tokens", f"{prefix}/query_tokens", "squeeze"),
        *embeddings,
        *layer_rules(config.depth, layer),
        *linear_rules("language_projection", f"{prefix}/projection"),
    ]
