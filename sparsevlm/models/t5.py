"""T5 / FlanT5 encoder–decoder language model (BLIP-2 and InstructBLIP's FlanT5 variants).

Params: `embed` (shared by both stacks), `encoder/{blocks_i, relative_bias, norm}`,
`decoder/{blocks_i, relative_bias, norm}` and `lm_head` when untied. Each stack computes its
relative position bias once from its own table (HF keeps it in layer 0) and hands it to every block.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsevlm.config import LanguageConfig
from sparsevlm.models.layers import Block, Dtype, KVCache, Linear, causal_mask, make_norm
from sparsevlm.models.stages import Call, Carry, Stage, block_stack, layer_cache, run_stages, with_layer_cache

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


def _t5_block(config: LanguageConfig, cross_attention: bool, dtype: Dtype, **module_kwargs: Any) -> Block:
    return Block(
        **module_kwargs,
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


def t5_encoder_block(config: LanguageConfig, dtype: Dtype = jnp.float32, **module_kwargs: Any) -> Block:
    """One encoder block; call it as `block(x, mask, score_bias=bias)`."""
    return _t5_block(config, False, dtype, **module_kwargs)


def t5_decoder_block(config: LanguageConfig, dtype: Dtype = jnp.float32, **module_kwargs: Any) -> Block:
    """One decoder block; call it as `block(x, mask, None, cache, index, bias, encoded, encoded_mask)`."""
    return _t5_block(config, True, dtype, **module_kwargs)


class T5Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, cross-attending) stack: blocks, position bias, final norm.

    Its forward pass is part of the T5 stage list (`t5_stages`): `position_bias` first, the blocks, then `finish`.
    """

    config: LanguageConfig
    causal: bool
    dtype: Dtype = jnp.float32
    scan_layers: bool = False  # blocks as one scanned module (params stacked: `stack_layers`)

    def setup(self) -> None:
        cfg = self.config
        if self.causal:
            self.blocks = block_stack(lambda: t5_decoder_block(cfg, self.dtype), cfg.num_decoder_layers,
                                      self.scan_layers)
        else:
            self.blocks = block_stack(lambda: t5_encoder_block(cfg, self.dtype), cfg.depth, self.scan_layers)
        self.relative_bias = nn.Embed(cfg.relative_buckets, cfg.num_heads, embedding_init=nn.initializers.normal(0.02))
        self.norm = make_norm(cfg.norm, cfg.norm_eps, "norm", self.dtype)

    def position_bias(self, query_slots: Array, key_slots: Array) -> Array:
        """This stack's relative position bias `[1, H, T, S]`."""
        return position_bias(self.config, self.relative_bias.embedding, query_slots, key_slots, self.causal)

    def finish(self, x: Array) -> Array:
        """The final norm after the last block."""
        return self.norm(x)


class T5(nn.Module):
    """Encoder over embeddings (so a VLM can splice image tokens in), decoder over tokens with a KV cache.

    The forward pass is `t5_stages`: `__call__`, `encode` and `decode` run all of it, its encoder
    part, or its decoder part.
    """

    config: LanguageConfig
    dtype: Dtype = jnp.float32
    scan_layers: bool = False

    def setup(self) -> None:
        cfg = self.config
        if cfg.arch != "t5":
            raise ValueError(f"T5 needs language.arch='t5', not {cfg.arch!r}")
        self.embed = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=nn.initializers.normal(1.0))
        self.encoder = T5Stack(cfg, causal=False, dtype=self.dtype, scan_layers=self.scan_layers)
        self.decoder = T5Stack(cfg, causal=True, dtype=self.dtype, scan_layers=self.scan_layers)
        if not cfg.tie_embeddings:
            self.lm_head = Linear(cfg.vocab_size, use_bias=False, dtype=self.dtype)

    def __call__(
        self, embeds: Array, valid: Array, tokens: Array, self_valid: Array
    ) -> tuple[Array, list[KVCache] | None]:
        """Encode, then decode `tokens` in one pass (training, scoring, `init`); logits `[B, T, V]`."""
        encoder, decoder = t5_stages(self.config, self.dtype)
        carry = {"x": embeds, "encoded_valid": valid, "decoder_tokens": tokens, "decoder_valid": self_valid}
        return run_stages(self, (*encoder, *decoder), carry)["logits"], None

    def embed_tokens(self, tokens: Array) -> Array:
        """Token ids `[B, T]` → embeddings `[B, T, width]`."""
        return self.embed(tokens).astype(self.dtype)

    def head(self, x: Array) -> Array:
        """The LM head on the decoder's output: logits `[B, T, V]` (float32)."""
        if self.config.tie_embeddings:
            # Original T5 rescales before its tied head; v1.1 / FlanT5 has an untied head and no rescale.
            logits = self.embed.attend((x * self.config.width**-0.5).astype(jnp.float32))
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32)

    def encode(self, embeds: Array, valid: Array) -> Array:
        """Embeddings `[B, S, E]` with `valid` `[B, S]` → encoder outputs `[B, S, E]`."""
        encoder, _ = t5_stages(self.config, self.dtype)
        return run_stages(self, encoder, {"x": embeds, "encoded_valid": valid})["encoded"]

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
        _, decoder = t5_stages(self.config, self.dtype)
        carry = {"decoder_tokens": tokens, "encoded": encoded, "encoded_valid": encoded_valid,
                 "decoder_valid": self_valid}
        if cache is not None:
            carry |= {"cache": cache, "cache_index": cache_index}
        carry = run_stages(self, decoder, carry)
        return carry["logits"], carry.get("cache")


@functools.lru_cache(maxsize=32)
def t5_stages(config: LanguageConfig, dtype: Dtype = jnp.float32) -> tuple[tuple[Stage, ...], tuple[Stage, ...]]:
    """The encoder's and the decoder's stages.

    Encoder: from embeddings `x` and their validity `encoded_valid` to `encoded` (masks and the
    position bias, blocks, final norm). Decoder: from `decoder_tokens` and `decoder_valid` (its usable
    slots; with a `cache`, the cache's) to `logits`, reading `encoded`; `weight` / `kv_weight` mark the
    real tokens of each sequence a decoder linear reads (calibration counts only those). The position
    bias rides in the carry with a leading axis of 1: every row shares it.
    """
    # parent=None: definitions only, even when first built inside a module's method.
    model = T5(config, dtype, parent=None)
    encoder, decoder = T5Stack(config, False, dtype, parent=None), T5Stack(config, True, dtype, parent=None)
    encoder_block = t5_encoder_block(config, dtype, parent=None)
    decoder_block = t5_decoder_block(config, dtype, parent=None)

    def encoder_start(call: Call, carry: Carry, layer: int | None) -> Carry:
        valid = carry["encoded_valid"]
        batch, length = valid.shape
        slots = jnp.arange(length)
        # As in HF, padding is masked only as a key; padded rows compute but are never read.
        mask = jnp.broadcast_to(valid.astype(bool)[:, None, :], (batch, length, length))
        return carry | {"x": carry["x"].astype(dtype), "mask": mask, "bias": call(slots, slots, method="position_bias")}

    def encoder_step(call: Call, carry: Carry, layer: int | None) -> Carry:
        return carry | {"x": call(carry["x"], carry["mask"], None, None, 0, carry["bias"])[0]}

    def encoder_end(call: Call, carry: Carry, layer: int | None) -> Carry:
        kept = {k: v for k, v in carry.items() if k in ("encoded_valid", "decoder_tokens", "decoder_valid")}
        return kept | {"encoded": call(carry["x"], method="finish")}

    def decoder_embed(call: Call, carry: Carry, layer: int | None) -> Carry:
        x = call(carry["decoder_tokens"], method="embed_tokens")
        return carry | {"x": x, "weight": carry["decoder_valid"].astype(jnp.float32),
                        "kv_weight": carry["encoded_valid"].astype(jnp.float32)}

    def decoder_start(call: Call, carry: Carry, layer: int | None) -> Carry:
        x, self_valid, encoded_valid = carry["x"], carry["decoder_valid"], carry["encoded_valid"]
        batch, length = x.shape[:2]
        query_slots = carry.get("cache_index", 0) + jnp.arange(length)
        cross = jnp.broadcast_to(encoded_valid.astype(bool)[:, None, :], (batch, length, encoded_valid.shape[1]))
        bias = call(query_slots, jnp.arange(self_valid.shape[1]), method="position_bias")
        return carry | {"mask": causal_mask(self_valid, query_slots), "bias": bias, "cross_mask": cross}

    def decoder_step(call: Call, carry: Carry, layer: int | None) -> Carry:
        x, cache = call(carry["x"], carry["mask"], None, layer_cache(carry, layer), carry.get("cache_index", 0),
                        carry["bias"], carry["encoded"], carry["cross_mask"])
        return with_layer_cache(carry | {"x": x}, layer, cache)

    def decoder_end(call: Call, carry: Carry, layer: int | None) -> Carry:
        return carry | {"x": call(carry["x"], method="finish")}

    def head(call: Call, carry: Carry, layer: int | None) -> Carry:
        return carry | {"logits": call(carry["x"], method="head")}

    encoder_stages = (
        Stage("encoder", encoder, encoder_start),
        *[Stage(f"encoder/blocks_{i}", encoder_block, encoder_step, i, scannable=True) for i in range(config.depth)],
        Stage("encoder", encoder, encoder_end),
    )
    decoder_stages = (
        Stage("", model, decoder_embed),
        Stage("decoder", decoder, decoder_start),
        *[Stage(f"decoder/blocks_{i}", decoder_block, decoder_step, i, scannable=True) for i in range(config.num_decoder_layers)],
        Stage("decoder", decoder, decoder_end),
        Stage("", model, head),
    )
    return encoder_stages, decoder_stages
