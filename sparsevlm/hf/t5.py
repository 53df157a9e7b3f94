"""T5 / FlanT5 language model (BLIP-2 / InstructBLIP FlanT5 variants): HF config → `LanguageConfig`, name rules."""

from __future__ import annotations

from typing import Any, Callable

from sparsevlm.config import LanguageConfig
from sparsevlm.hf.rules import Rule, layer_rules, linear_rules, norm_rules, rule

# HF `dense_act_fn` (derived from `feed_forward_proj`; "gated-gelu" means the tanh GELU) → ours.
_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "silu": "silu"}


def language_config(hf_config: Any) -> LanguageConfig:
    """A `T5Config` as our `LanguageConfig`."""
    act = hf_config.dense_act_fn
    if act not in _ACTIVATIONS:
        raise ValueError(
            f"text_config.feed_forward_proj={hf_config.feed_forward_proj!r} (activation {act!r}) is not supported; "
            f"allowed activations: {', '.join(_ACTIVATIONS)}, optionally gated ('gated-gelu')"
        )
    # transformers v5 always ties in the config and keeps the v1.0/v1.1 distinction in
    # `scale_decoder_outputs`; v4 configs say it with `tie_word_embeddings` (False for FlanT5).
    tied = getattr(hf_config, "scale_decoder_outputs", None)
    if tied is None:
        tied = getattr(hf_config, "tie_word_embeddings", True)
    return LanguageConfig(
        arch="t5",
        vocab_size=hf_config.vocab_size,
        width=hf_config.d_model,
        depth=hf_config.num_layers,
        decoder_depth=hf_config.num_decoder_layers or hf_config.num_layers,
        num_heads=hf_config.num_heads,
        num_kv_heads=hf_config.num_heads,
        head_dim=hf_config.d_kv,
        mlp_dim=hf_config.d_ff,
        act=_ACTIVATIONS[act],
        gated_mlp=bool(hf_config.is_gated_act),
        norm_eps=hf_config.layer_norm_epsilon,
        tie_embeddings=bool(tied),
        relative_buckets=hf_config.relative_attention_num_buckets,
        relative_max_distance=hf_config.relative_attention_max_distance,
        decoder_start_id=int(getattr(hf_config, "decoder_start_token_id", None) or 0),
    )


def _attention_rules(hf: str, ours: str) -> list[Rule]:
    return [r for name in "qkvo" for r in linear_rules(f"{hf}.{name}", f"{ours}/{name}", bias=False)]


def _mlp_rules(config: LanguageConfig, hf: str, ours: str) -> list[Rule]:
    if config.resolved_gated_mlp:
        pairs = [("wi_0", "gate"), ("wi_1", "up"), ("wo", "down")]
    else:
        pairs = [("wi", "up"), ("wo", "down")]
    return [
        r for theirs, mine in pairs for r in linear_rules(f"{hf}.DenseReluDense.{theirs}", f"{ours}/mlp/{mine}", False)
    ]


def language_rules(config: LanguageConfig, prefix: str) -> list[Rule]:
    """Names of a saved `T5ForConditionalGeneration` under `prefix` (e.g. `language_model.`) ↔ `language/...`.

    HF keeps each stack's relative bias table in block 0's self-attention. A tied head has no rule:
    the file holds only `shared.weight` (any `embed_tokens` / `lm_head` copies are ignored).
    """

    def encoder_block(i: int) -> list[Rule]:
        hf, ours = f"{prefix}encoder.block.{i}.layer", f"language/encoder/blocks_{i}"
        return [
            *norm_rules(f"{hf}.0.layer_norm", f"{ours}/norm1", bias=False),
            *_attention_rules(f"{hf}.0.SelfAttention", f"{ours}/attn"),
            *norm_rules(f"{hf}.1.layer_norm", f"{ours}/norm2", bias=False),
            *_mlp_rules(config, f"{hf}.1", ours),
        ]

    def decoder_block(i: int) -> list[Rule]:
        hf, ours = f"{prefix}decoder.block.{i}.layer", f"language/decoder/blocks_{i}"
        return [
            *norm_rules(f"{hf}.0.layer_norm", f"{ours}/norm1", bias=False),
            *_attention_rules(f"{hf}.0.SelfAttention", f"{ours}/attn"),
            *norm_rules(f"{hf}.1.layer_norm", f"{ours}/norm_cross", bias=False),
            *_attention_rules(f"{hf}.1.EncDecAttention", f"{ours}/cross"),
            *norm_rules(f"{hf}.2.layer_norm", f"{ours}/norm2", bias=False),
            *_mlp_rules(config, f"{hf}.2", ours),
        ]

    def stack(name: str, depth: int, block: Callable[[int], list[Rule]]) -> list[Rule]:
        return [
            rule(
                f"{prefix}{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                f"language/{name}/relative_bias/embedding",
            ),
            *layer_rules(depth, block),
            *norm_rules(f"{prefix}{name}.final_layer_norm", f"language/{name}/norm", bias=False),
        ]

    rules = [
        rule(f"{prefix}shared.weight", "language/embed/embedding"),
        *stack("encoder", config.depth, encoder_block),
        *stack("decoder", config.num_decoder_layers, decoder_block),
    ]
    if not config.tie_embeddings:
        rules += linear_rules(f"{prefix}lm_head", "language/lm_head", bias=False)
    return rules
