"""Llama / Vicuna language model: HF config → `LanguageConfig`, and name rules."""

from __future__ import annotations

from typing import Any

from sparsevlm.config import LanguageConfig
from sparsevlm.hf.rules import Rule, layer_rules, linear_rules, norm_rules, rule

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}


def rope_theta(hf_config: Any) -> float:
    """Rotary base from a v5 `rope_parameters` dict (or a v4 `rope_theta`); only plain RoPE is supported."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"text_config.rope_parameters.rope_type={kind!r} is not supported; allowed: default")
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def language_config(hf_config: Any) -> LanguageConfig:
    """A `LlamaConfig` as our `LanguageConfig`."""
    act = hf_config.hidden_act
    if act not in _ACTIVATIONS:
        raise ValueError(f"text_config.hidden_act={act!r} is not supported; allowed: {', '.join(_ACTIVATIONS)}")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("text_config.mlp_bias=True is not supported")
    return LanguageConfig(
        arch="llama",
        vocab_size=hf_config.vocab_size,
        width=hf_config.hidden_size,
        depth=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        head_dim=getattr(hf_config, "head_dim", None),
        mlp_dim=hf_config.intermediate_size,
        act=_ACTIVATIONS[act],
        rope_theta=rope_theta(hf_config),
        norm_eps=hf_config.rms_norm_eps,
        attention_bias=bool(getattr(hf_config, "attention_bias", False)),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        max_seq_len=hf_config.max_position_embeddings,
    )


def language_rules(config: LanguageConfig, prefix: str) -> list[Rule]:
    """Names of a saved `LlamaForCausalLM` under `prefix` (e.g. `language_model.`) ↔ `language/...`."""
    bias = config.attention_bias

    def block(i: int) -> list[Rule]:
        hf, ours = f"{prefix}model.layers.{i}", f"language/blocks_{i}"
        return [
            *norm_rules(f"{hf}.input_layernorm", f"{ours}/norm1", bias=False),
            *linear_rules(f"{hf}.self_attn.q_proj", f"{ours}/attn/q", bias),
            *linear_rules(f"{hf}.self_attn.k_proj", f"{ours}/attn/k", bias),
            *linear_rules(f"{hf}.self_attn.v_proj", f"{ours}/attn/v", bias),
            *linear_rules(f"{hf}.self_attn.o_proj", f"{ours}/attn/o", bias),
            *norm_rules(f"{hf}.post_attention_layernorm", f"{ours}/norm2", bias=False),
            *linear_rules(f"{hf}.mlp.gate_proj", f"{ours}/mlp/gate", bias=False),
            *linear_rules(f"{hf}.mlp.up_proj", f"{ours}/mlp/up", bias=False),
            *linear_rules(f"{hf}.mlp.down_proj", f"{ours}/mlp/down", bias=False),
        ]

    rules = [
        rule(f"{prefix}model.embed_tokens.weight", "language/embed/embedding"),
        *layer_rules(config.depth, block),
        *norm_rules(f"{prefix}model.norm", "language/norm", bias=False),
    ]
    if not config.tie_embeddings:
        rules += linear_rules(f"{prefix}lm_head", "language/lm_head", bias=False)
    return rules
