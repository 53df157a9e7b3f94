"""BLIP-2 / InstructBLIP Q-Former connector: learned queries read the image (and the instruction)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsevlm.config import ConnectorConfig
from sparsevlm.models.layers import MLP, Attention, Dtype, Linear, make_norm
from sparsevlm.models.stages import Call, Carry, Stage, run_stages

Array = jax.Array


def self_attention_mask(num_queries: int, text_mask: Array | None, batch: int) -> Array:
    """Self-attention mask `[B, Q+T, Q+T]` over `[queries; text]`: every position sees the queries and real text.

    As in HF, padding is masked only as a key; padded text positions still compute (their outputs are
    never read by the queries).
    """
    valid = jnp.ones((batch, num_queries), bool)
    if text_mask is not None:
        valid = jnp.concatenate([valid, text_mask.astype(bool)], axis=1)
    return jnp.broadcast_to(valid[:, None, :], (batch, valid.shape[1], valid.shape[1]))


class QFormerBlock(nn.Module):
    """One BERT-style post-norm Q-Former layer: self-attention, optional cross-attention, split FFNs.

    Params: `attn`, `attn_norm`, [`cross`, `cross_norm`], `mlp`, `mlp_norm`, [`text_mlp`, `text_mlp_norm`].
    """

    width: int
    num_heads: int
    mlp_dim: int
    act: str
    norm_eps: float
    has_cross_attention: bool
    reads_text: bool
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        head_dim = self.width // self.num_heads
        self.attn = Attention(self.num_heads, head_dim, self.width, dtype=self.dtype)
        self.attn_norm = make_norm("layernorm", self.norm_eps, "attn_norm", self.dtype)
        if self.has_cross_attention:
            self.cross = Attention(self.num_heads, head_dim, self.width, dtype=self.dtype)
            self.cross_norm = make_norm("layernorm", self.norm_eps, "cross_norm", self.dtype)
        # HF `intermediate_query` / `output_query`: the FFN of the query positions.
        self.mlp = MLP(self.mlp_dim, self.width, self.act, dtype=self.dtype)
        self.mlp_norm = make_norm("layernorm", self.norm_eps, "mlp_norm", self.dtype)
        if self.reads_text:
            # HF `intermediate` / `output`: the FFN of the text positions (InstructBLIP only; BLIP-2's
            # conditional-generation checkpoints do not hold it, see sparsevlm.hf.qformer).
            self.text_mlp = MLP(self.mlp_dim, self.width, self.act, dtype=self.dtype)
            self.text_mlp_norm = make_norm("layernorm", self.norm_eps, "text_mlp_norm", self.dtype)

    def __call__(self, x: Array, self_mask: Array, image_features: Array, num_queries: int) -> Array:
        """`x` `[B, Q+T, W]` → same shape; `self_mask` `[B, Q+T, Q+T]` is True where allowed."""
        h, _ = self.attn(x, self_mask)
        x = self.attn_norm(h.astype(x.dtype) + x)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if self.has_cross_attention:
            # Only the queries read the image; no image padding, so no mask.
            h, _ = self.cross(queries, None, kv_input=image_features.astype(self.dtype))
            queries = self.cross_norm(h.astype(queries.dtype) + queries)
        queries = self.mlp_norm(self.mlp(queries).astype(queries.dtype) + queries)
        if not self.reads_text:
            return queries
        # Run even on zero text positions so that `init` without text still creates the text FFN.
        text = self.text_mlp_norm(self.text_mlp(text).astype(text.dtype) + text)
        return jnp.concatenate([queries, text], axis=1)


def qformer_block(config: ConnectorConfig, index: int, dtype: Dtype = jnp.float32, **module_kwargs: Any) -> QFormerBlock:
    """Layer `index` as a standalone module (the connector's blocks and block-wise calibration share it)."""
    return QFormerBlock(
        **module_kwargs,
        width=config.width,
        num_heads=config.num_heads,
        mlp_dim=config.mlp_dim,
        act=config.act,
        norm_eps=config.norm_eps,
        has_cross_attention=index % config.cross_attention_frequency == 0,
        reads_text=config.reads_text,
        dtype=dtype,
    )


class QFormer(nn.Module):
    """Image features `[B, Nv, Ev]` (+ instruction tokens) → `num_query_tokens` language embeddings `[B, Q, E]`."""

    config: ConnectorConfig
    language_width: int
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        init = nn.initializers.normal(0.02)
        self.query_tokens = self.param("query_tokens", init, (cfg.num_query_tokens, cfg.width), jnp.float32)
        if cfg.reads_text:
            self.word_embed = nn.Embed(cfg.text_vocab_size, cfg.width, dtype=self.dtype, embedding_init=init)
            self.pos_embed = nn.Embed(cfg.text_max_positions, cfg.width, dtype=self.dtype, embedding_init=init)
        # BLIP-2: HF `qformer.layernorm` on the queries; InstructBLIP: `qformer.embeddings.layernorm`
        # on queries and text together. Either way one LayerNorm over every input position.
        self.embed_norm = make_norm("layernorm", cfg.norm_eps, "embed_norm", self.dtype)
        self.blocks = [qformer_block(cfg, i, self.dtype) for i in range(cfg.depth)]
        self.projection = Linear(self.language_width, dtype=self.dtype)

    def embed(self, text_tokens: Array | None, text_mask: Array | None, batch: int) -> tuple[Array, Array]:
        """The input of block 0: hidden states `[B, Q+T, W]` and the self-attention mask `[B, Q+T, Q+T]`."""
        cfg = self.config
        if text_tokens is not None and not cfg.reads_text:
            raise ValueError("text_tokens were given but this Q-Former does not read text (connector.reads_text=False)")
        x = jnp.broadcast_to(self.query_tokens.astype(self.dtype), (batch, cfg.num_query_tokens, cfg.width))
        if cfg.reads_text and text_tokens is None:
            # Zero text positions: same output as queries alone, and `init` still creates the text params.
            text_tokens = jnp.zeros((batch, 0), jnp.int32)
        if text_tokens is not None:
            if text_tokens.shape[1] > cfg.text_max_positions:
                raise ValueError(
                    f"text_tokens has {text_tokens.shape[1]} positions; "
                    f"connector.text_max_positions={cfg.text_max_positions}"
                )
            if text_mask is None:
                text_mask = jnp.ones(text_tokens.shape, bool)
            # HF numbers the text from 0 whatever the padding, and gives the queries no position.
            positions = jnp.arange(text_tokens.shape[1])[None]
            text = self.word_embed(text_tokens) + self.pos_embed(positions)
            x = jnp.concatenate([x, text.astype(x.dtype)], axis=1)
        else:
            text_mask = None
        return self.embed_norm(x), self_attention_mask(cfg.num_query_tokens, text_mask, batch)

    def head(self, x: Array) -> Array:
        """Keep the query positions and project them to the language width (HF `language_projection`)."""
        return self.projection(x[:, : self.config.num_query_tokens])

    def __call__(
        self, image_features: Array, text_tokens: Array | None = None, text_mask: Array | None = None
    ) -> Array:
        """Image features `[B, Nv, Ev]` (+ instruction `[B, T]` and its mask) → `[B, Q, language_width]`."""
        carry = {"x": image_features}
        if self.config.reads_text:
            if text_tokens is None:
                # Zero text positions: same output as queries alone, and `init` still creates the text params.
                text_tokens = jnp.zeros((image_features.shape[0], 0), jnp.int32)
            mask = jnp.ones(text_tokens.shape, bool) if text_mask is None else text_mask
            carry |= {"instruction_tokens": text_tokens, "instruction_mask": mask}
        elif text_tokens is not None:
            raise ValueError("text_tokens were given but this Q-Former does not read text (connector.reads_text=False)")
        return run_stages(self, qformer_stages(self.config, self.language_width, self.dtype), carry)["x"]


@functools.lru_cache(maxsize=32)
def qformer_stages(config: ConnectorConfig, language_width: int, dtype: Dtype = jnp.float32) -> tuple[Stage, ...]:
    """The Q-Former's forward pass: embed (queries [+ instruction]), one stage per block, query slice + projection.

    The image features ride along in the carry as `image` (every cross-attention reads them); `weight`
    marks the query and real instruction positions (calibration counts only those).
    """
    # parent=None: definitions only, even when first built inside a module's method.
    qformer = QFormer(config, language_width, dtype, parent=None)
    num_queries = config.num_query_tokens

    def embed(call: Call, carry: Carry, layer: int | None) -> Carry:
        batch = carry["x"].shape[0]
        text = (None, None)
        if config.reads_text:
            if "instruction_tokens" not in carry:
                raise ValueError("this model's Q-Former reads the instruction: pass its tokens (encode the prompt with "
                                 "the bundle's instruction_tokenizer)")
            text = (carry["instruction_tokens"], carry["instruction_mask"])
        x, self_mask = call(*text, batch, method="embed")
        weight = jnp.ones((batch, num_queries), jnp.float32)
        if config.reads_text:
            weight = jnp.concatenate([weight, carry["instruction_mask"].astype(jnp.float32)], axis=1)
        return carry | {"image": carry["x"], "x": x, "self_mask": self_mask, "weight": weight}

    def layer_step(call: Call, carry: Carry, layer: int | None) -> Carry:
        return carry | {"x": call(carry["x"], carry["self_mask"], carry["image"], num_queries)}

    def head(call: Call, carry: Carry, layer: int | None) -> Carry:
        rest = {k: v for k, v in carry.items() if k not in ("image", "self_mask", "weight")}
        return rest | {"x": call(carry["x"], method="head")}

    # One module per block shape (with / without cross-attention), so calibration compiles each once.
    shapes = {i % config.cross_attention_frequency == 0: qformer_block(config, i, dtype, parent=None)
              for i in range(config.depth)}
    blocks = [Stage(f"blocks_{i}", shapes[i % config.cross_attention_frequency == 0], layer_step, i)
              for i in range(config.depth)]
    return (Stage("", qformer, embed), *blocks, Stage("", qformer, head))
