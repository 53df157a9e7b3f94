"""OPT language model (BLIP-2 / InstructBLIP OPT variants): HF config → `LanguageConfig`, and name rules."""

from __future__ import annotations

from typing import Any

from sparsevlm.config import LanguageConfig
from sparsevlm.hf.rules import Rule, layer_rules, linear_rules, norm_rules, rule

_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "silu": "silu"}

# HF OPT's LayerNorms take no epsilon from the config: PyTorch's default.
OPT_NORM_EPS = 1e-5


def language_config(hf_config: Any) -> LanguageConfig:
    """An `OPTConfig` as our `LanguageConfig` (pre-norm OPT with an affine final LayerNorm only)."""
    act = hf_config.activation_function
    if act not in _ACTIVATIONS:
        raise ValueError(
            f"text_config.activation_function={act!r} is not supported; allowed: {', '.join(_ACTIVATIONS)}"
        )
    if hf_config.word_embed_proj_dim != hf_config.hidden_size:
        raise ValueError(
            f"text_config.word_embed_proj_dim={hf_config.word_embed_proj_dim} is not supported: it must equal "
            f"hidden_size={hf_config.hidden_size} (no project_in / project_out, as in OPT-350m)"
        )
    if not hf_config.do_layer_norm_before:
        raise ValueError("text_config.do_layer_norm_before=False (post-norm OPT-350m) is not supported")
    if getattr(hf_config, "_remove_final_layer_norm", False):
        raise ValueError("text_config._remove_final_layer_norm=True is not supported")
    if not getattr(hf_config, "layer_norm_elementwise_affine", True):
        raise ValueError("text_config.layer_norm_elementwise_affine=False is not supported")
    return LanguageConfig(
        arch="opt",
        vocab_size=hf_config.vocab_size,
        width=hf_config.hidden_size,
        depth=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_attention_heads,
        mlp_dim=hf_config.ffn_dim,
        act=_ACTIVATIONS[act],
        norm_eps=OPT_NORM_EPS,
        attention_bias=bool(getattr(hf_config, "enable_bias", True)),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
        max_seq_len=hf_config.max_position_embeddings,
    )


def language_rules(config: LanguageConfig, prefix: str) -> list[Rule]:
    """Names of a saved `OPTForCausalLM` under `prefix` (e.g. `language_model.`) ↔ `language/...`.

    A tied head has no rule: HF omits `lm_head.weight` from the file (or stores a copy we ignore).
    """
    bias = config.attention_bias
    decoder = f"{prefix}model.decoder"

    def block(i: int) -> list[Rule]:
        hf, ours = f"{decoder}.layers.{i}", f"language/blocks_{i}"
        return [
            *norm_rules(f"{hf}.self_attn_layer_norm", f"{ours}/norm1"),
            *linear_rules(f"{hf}.self_attn.q_proj", f"{ours}/attn/q", bias),
            *linear_rules(f"{hf}.self_attn.k_proj", f"{ours}/attn/k", bias),
            *linear_rules(f"{hf}.self_attn.v_proj", f"{ours}/attn/v", bias),
            *linear_rules(f"{hf}.self_attn.out_proj", f"{ours}/attn/o", bias),
            *norm_rules(f"{hf}.final_layer_norm", f"{ours}/norm2"),
            *linear_rules(f"{hf}.fc1", f"{ours}/mlp/up", bias),
            *linear_rules(f"{hf}.fc2", f"{ours}/mlp/down", bias),
        ]

    rules = [
        rule(f"{decoder}.embed_tokens.weight", "language/embed/embedding"),
        rule(f"{decoder}.embed_positions.weight", "language/pos_embed/embedding"),
        *layer_rules(config.depth, block),
        *norm_rules(f"{decoder}.final_layer_norm", "language/norm"),
    ]
    if not config.tie_embeddings:
        rules += linear_rules(f"{prefix}lm_head", "language/lm_head", bias=False)
    return rules
