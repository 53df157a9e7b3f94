"""Decoder-only language models with a KV cache: Llama-style (rotary, SwiGLU) and OPT (learned positions)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsevlm.config import LanguageConfig
from sparsevlm.models.layers import Block, Dtype, KVCache, Linear, make_norm
from sparsevlm.models.stages import Call, Carry, Stage, block_stack, layer_cache, run_stages, with_layer_cache

Array = jax.Array

# HF OPT reserves the first two rows of its position table (a fairseq padding-index relic).
OPT_POSITION_OFFSET = 2


def init_cache(config: LanguageConfig, batch: int, length: int, dtype: Dtype = jnp.float32) -> list[KVCache]:
    """Zeroed per-layer KV cache for `length` positions (T5: the decoder's self-attention)."""
    shape = (batch, length, config.num_kv_heads, config.resolved_head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_decoder_layers)]


def decoder_block(config: LanguageConfig, dtype: Dtype = jnp.float32, **module_kwargs: Any) -> Block:
    """One decoder block as a standalone module (the decoder and block-wise calibration share it)."""
    opt = config.arch == "opt"
    return Block(
        **module_kwargs,
        width=config.width,
        num_heads=config.num_heads,
        head_dim=config.resolved_head_dim,
        mlp_dim=config.mlp_dim,
        act=config.act,
        norm=config.norm,
        norm_eps=config.norm_eps,
        num_kv_heads=config.num_kv_heads,
        gated_mlp=config.resolved_gated_mlp,
        qkv_bias=config.attention_bias,
        out_bias=config.attention_bias,
        mlp_bias=opt and config.attention_bias,
        rope_theta=None if opt else config.rope_theta,
        dtype=dtype,
    )


class Decoder(nn.Module):
    """Token embeddings in, next-token logits out; `embed` and `__call__` are separate so a VLM can splice."""

    config: LanguageConfig
    dtype: Dtype = jnp.float32
    scan_layers: bool = False  # blocks as one scanned module (params stacked: `stack_layers`)

    def setup(self) -> None:
        cfg = self.config
        if cfg.arch == "t5":
            raise ValueError("language.arch='t5' is an encoder–decoder: use sparsevlm.models.t5.T5")
        self.embed = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=nn.initializers.normal(0.02))
        if cfg.arch == "opt":
            self.pos_embed = nn.Embed(
                cfg.max_seq_len + OPT_POSITION_OFFSET, cfg.width, embedding_init=nn.initializers.normal(0.02)
            )
        self.blocks = block_stack(lambda: decoder_block(cfg, self.dtype), cfg.depth, self.scan_layers)
        self.norm = make_norm(cfg.norm, cfg.norm_eps, "norm", self.dtype)
        if not cfg.tie_embeddings:
            self.lm_head = Linear(cfg.vocab_size, use_bias=False, dtype=self.dtype)

    def embed_tokens(self, tokens: Array) -> Array:
        """Token ids `[B, T]` → embeddings `[B, T, width]`."""
        return self.embed(tokens).astype(self.dtype)

    def add_positions(self, embeds: Array, positions: Array) -> Array:
        """Add absolute position embeddings (OPT) to the block input; rotary models are unchanged."""
        if self.config.arch != "opt":
            return embeds
        return embeds + self.pos_embed(positions + OPT_POSITION_OFFSET).astype(embeds.dtype)

    def head(self, x: Array) -> Array:
        """Final norm and the LM head: hidden states → logits `[B, T, V]` (float32)."""
        x = self.norm(x)
        if self.config.tie_embeddings:
            logits = self.embed.attend(x.astype(jnp.float32))
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32)

    def __call__(
        self,
        embeds: Array,
        positions: Array,
        mask: Array,
        cache: list[KVCache] | None = None,
        cache_index: Array | int = 0,
    ) -> tuple[Array, list[KVCache] | None]:
        """Embeddings `[B, T, E]`, positions `[B, T]`, mask `[B, T, S]` → logits `[B, T, V]` (float32), through `decoder_stages`."""
        carry = {"x": embeds, "positions": positions, "mask": mask}
        if cache is not None:
            carry |= {"cache": cache, "cache_index": cache_index}
        carry = run_stages(self, decoder_stages(self.config, self.dtype), carry)
        return carry["logits"], carry.get("cache")


@functools.lru_cache(maxsize=32)
def decoder_stages(config: LanguageConfig, dtype: Dtype = jnp.float32) -> tuple[Stage, ...]:
    """The language model's forward pass from its input embeddings `x` (with `positions`, attention `mask`
    and optionally a KV `cache` at `cache_index`): position embeddings, blocks, head → `logits`."""
    # parent=None: definitions only, even when first built inside a module's method.
    decoder, block = Decoder(config, dtype, parent=None), decoder_block(config, dtype, parent=None)

    def positions(call: Call, carry: Carry, layer: int | None) -> Carry:
        return carry | {"x": call(carry["x"], carry["positions"], method="add_positions")}

    def layer_step(call: Call, carry: Carry, layer: int | None) -> Carry:
        x, cache = call(carry["x"], carry["mask"], carry["positions"], layer_cache(carry, layer),
                        carry.get("cache_index", 0))
        return with_layer_cache(carry | {"x": x}, layer, cache)

    def head(call: Call, carry: Carry, layer: int | None) -> Carry:
        return carry | {"logits": call(carry["x"], method="head")}

    blocks = [Stage(f"blocks_{i}", block, layer_step, i, scannable=True) for i in range(config.depth)]
    return (Stage("", decoder, positions), *blocks, Stage("", decoder, head))
