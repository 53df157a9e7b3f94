"""T5 / FlanT5 encoder–decoder language model (BLIP-2 and InstructBLIP's FlanT5 variants).

Params: `embed` (shared by both stacks), `encoder/{blocks_i, relative_bias, norm}`,
`decoder/{blocks_i, relative_bias, norm}` and `lm_head` when untied. Each stack computes its
relative position bias once from its own table (HF keeps it in layer 0) and hands it to every block.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsevlm.config import LanguageConfig
from sparsevlm.eval.beam import Decoding
from sparsevlm.models.decoder import init_cache
from sparsevlm.models.layers import Block, Dtype, KVCache, Linear, causal_mask, make_norm

Array = jax.Array


def relative_position_bucket(relative: Array, bidirectional: bool, num_buckets: int, max_distance: int) -> Array:
    """T5's bucket of each `key - query` distance: exact for small distances, log-spaced up to `max_distance`."""
    bucket = jnp.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative > 0).astype(relative.dtype) * num_buckets
        distance = jnp.abs(relative)
    else:
        # A causal decoder only looks back; later keys are masked anyway.
        distance = -jnp.minimum(relative, 0)
    max_exact = num_buckets // 2
    # float32 and truncation as in HF, so that bucket edges agree; max(., 1) keeps log finite where unused.
    scaled = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = jnp.minimum(max_exact + (scaled * (num_buckets - max_exact)).astype(relative.dtype), num_buckets - 1)
    return bucket + jnp.where(distance < max_exact, distance, large)


def position_bias(config: LanguageConfig, table: Array, query_slots: Array, key_slots: Array, causal: bool) -> Array:
    """Relative position bias `[1, H, T, S]` from a stack's `relative_bias/embedding` table `[buckets, H]`."""
    relative = key_slots[None, :].astype(jnp.int32) - query_slots[:, None].astype(jnp.int32)
    buckets = relative_position_bucket(relative, not causal, config.relative_buckets, config.relative_max_distance)
    return jnp.transpose(jnp.asarray(table)[buckets], (2, 0, 1))[None].astype(jnp.float32)


def _t5_block(config: LanguageConfig, cross_attention: bool, dtype: Dtype) -> Block:
    return Block(
        width=config.width,
        num_heads=config.num_heads,
        head_dim=config.resolved_head_dim,
        mlp_dim=config.mlp_dim,
        act=config.act,
        norm=config.norm,
        norm_eps=config.norm_eps,
        gated_mlp=config.resolved_gated_mlp,
        qkv_bias=False,
        out_bias=False,
        mlp_bias=False,
        rope_theta=None,
        dtype=dtype,
        scale_scores=False,
        cross_attention=cross_attention,
    )


def t5_encoder_block(config: LanguageConfig, dtype: Dtype = jnp.float32) -> Block:
    """One encoder block; call it as `block(x, mask, score_bias=bias)`."""
    return _t5_block(config, False, dtype)


def t5_decoder_block(config: LanguageConfig, dtype: Dtype = jnp.float32) -> Block:
    """One decoder block; call it as `block(x, mask, None, cache, index, bias, encoded, encoded_mask)`."""
    return _t5_block(config, True, dtype)


class T5Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, cross-attending) stack with its final norm."""

    config: LanguageConfig
    causal: bool
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        if self.causal:
            self.blocks = [t5_decoder_block(cfg, self.dtype) for _ in range(cfg.num_decoder_layers)]
        else:
            self.blocks = [t5_encoder_block(cfg, self.dtype) for _ in range(cfg.depth)]
        self.relative_bias = nn.Embed(cfg.relative_buckets, cfg.num_heads, embedding_init=nn.initializers.normal(0.02))
        self.norm = make_norm(cfg.norm, cfg.norm_eps, "norm", self.dtype)

    def position_bias(self, query_slots: Array, key_slots: Array) -> Array:
        """This stack's relative position bias `[1, H, T, S]`."""
        return position_bias(self.config, self.relative_bias.embedding, query_slots, key_slots, self.causal)

    def __call__(
        self,
        x: Array,
        mask: Array,
        bias: Array,
        encoded: Array | None = None,
        encoded_mask: Array | None = None,
        cache: list[KVCache] | None = None,
        cache_index: Array | int = 0,
    ) -> tuple[Array, list[KVCache] | None]:
        """All blocks, then the final norm."""
        new_cache: list[KVCache] | None = [] if cache is not None else None
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[i]
            x, layer_cache = block(x, mask, None, layer_cache, cache_index, bias, encoded, encoded_mask)
            if new_cache is not None:
                new_cache.append(layer_cache)
        return self.norm(x), new_cache


class T5(nn.Module):
    """Encoder over embeddings (so a VLM can splice image tokens in), decoder over tokens with a KV cache."""

    config: LanguageConfig
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        if cfg.arch != "t5":
            raise ValueError(f"T5 needs language.arch='t5', not {cfg.arch!r}")
        self.embed = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=nn.initializers.normal(1.0))
        self.encoder = T5Stack(cfg, causal=False, dtype=self.dtype)
        self.decoder = T5Stack(cfg, causal=True, dtype=self.dtype)
        if not cfg.tie_embeddings:
            self.lm_head = Linear(cfg.vocab_size, use_bias=False, dtype=self.dtype)

    def __call__(
        self, embeds: Array, valid: Array, tokens: Array, self_valid: Array
    ) -> tuple[Array, list[KVCache] | None]:
        """Encode, then decode `tokens` in one pass (training, scoring, `init`); logits `[B, T, V]`."""
        encoded = self.encode(embeds, valid)
        return self.decode(tokens, encoded, valid, self_valid)

    def embed_tokens(self, tokens: Array) -> Array:
        """Token ids `[B, T]` → embeddings `[B, T, width]`."""
        return self.embed(tokens).astype(self.dtype)

    def encode(self, embeds: Array, valid: Array) -> Array:
        """Embeddings `[B, S, E]` with `valid` `[B, S]` → encoder outputs `[B, S, E]`."""
        batch, length = valid.shape
        slots = jnp.arange(length)
        # As in HF, padding is masked only as a key; padded rows compute but are never read.
        mask = jnp.broadcast_to(valid.astype(bool)[:, None, :], (batch, length, length))
        x, _ = self.encoder(embeds.astype(self.dtype), mask, self.encoder.position_bias(slots, slots))
        return x

    def decode(
        self,
        tokens: Array,
        encoded: Array,
        encoded_valid: Array,
        self_valid: Array,
        cache: list[KVCache] | None = None,
        cache_index: Array | int = 0,
    ) -> tuple[Array, list[KVCache] | None]:
        """Decoder tokens `[B, T]` at slots `cache_index + t` → logits `[B, T, V]` (float32) and the cache.

        `self_valid` `[B, S]` marks usable decoder slots (S = T without a cache, the cache length
        with one); relative positions are slot distances, so cached steps equal the full pass.
        """
        batch, length = tokens.shape
        query_slots = cache_index + jnp.arange(length)
        mask = causal_mask(self_valid, query_slots)
        bias = self.decoder.position_bias(query_slots, jnp.arange(self_valid.shape[1]))
        cross_mask = jnp.broadcast_to(
            encoded_valid.astype(bool)[:, None, :], (batch, length, encoded_valid.shape[1])
        )
        x, cache = self.decoder(self.embed_tokens(tokens), mask, bias, encoded, cross_mask, cache, cache_index)
        if self.config.tie_embeddings:
            # Original T5 rescales before its tied head; v1.1 / FlanT5 has an untied head and no rescale.
            logits = self.embed.attend((x * self.config.width**-0.5).astype(jnp.float32))
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32), cache


def start_decoding(language: T5, params: Any, embeds: Array, valid: Array, max_new_tokens: int) -> Decoding:
    """Encoder outputs, and the decoder's start token at slot 0; new token `i` is fed at slot `i + 1`."""
    batch = embeds.shape[0]
    variables = {"params": params}
    encoded = language.apply(variables, embeds, valid, method=T5.encode)

    def step(state: dict, tokens: Array, step: Array) -> tuple[Array, dict]:
        # Every slot counts as usable: the causal mask hides the ones not yet written.
        self_valid = jnp.ones((tokens.shape[0], max_new_tokens), bool)
        logits, cache = language.apply(
            variables, tokens[:, None], state["encoded"], state["encoded_valid"], self_valid, state["cache"],
            step + 1, method=T5.decode,
        )
        return logits[:, 0], state | {"cache": cache}

    state = {"cache": init_cache(language.config, batch, max_new_tokens, language.dtype), "encoded": encoded,
             "encoded_valid": valid}
    start = jnp.full((batch,), language.config.decoder_start_id, jnp.int32)
    # The start token precedes new token 0, so it is step -1 (slot 0).
    first_logits, state = step(state, start, jnp.int32(-1))
    return Decoding(first_logits, state, step)
