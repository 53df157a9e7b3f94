"""ViT vision tower (CLIP / SigLIP / BLIP-2 style, chosen by `VisionConfig` switches)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsevlm.config import VisionConfig
from sparsevlm.models.layers import Block, Dtype, make_norm

Array = jax.Array


def vit_block(config: VisionConfig, dtype: Dtype = jnp.float32) -> Block:
    """One ViT block as a standalone module (the tower's blocks and block-wise calibration share it)."""
    return Block(
        width=config.width,
        num_heads=config.num_heads,
        head_dim=config.width // config.num_heads,
        mlp_dim=config.mlp_dim,
        act=config.act,
        norm="layernorm",
        norm_eps=config.norm_eps,
        qkv_bias=config.qkv_bias,
        dtype=dtype,
    )


class ViT(nn.Module):
    """Images `[B, H, W, C]` (already normalised) → features `[B, N, width]` at `feature_layer`."""

    config: VisionConfig
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.patch_embed = nn.Conv(
            cfg.width,
            (cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            use_bias=cfg.patch_bias,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(0.02),
        )
        if cfg.use_cls_token:
            self.cls_token = self.param("cls_token", nn.initializers.normal(0.02), (cfg.width,), jnp.float32)
        tokens = cfg.num_patches + int(cfg.use_cls_token)
        self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02), (tokens, cfg.width), jnp.float32)
        if cfg.pre_norm:
            self.pre_norm = make_norm("layernorm", cfg.norm_eps, "pre_norm", self.dtype)
        self.blocks = [vit_block(cfg, self.dtype) for _ in range(cfg.blocks_used)]
        if cfg.final_norm and cfg.blocks_used == cfg.depth:
            self.final_norm = make_norm("layernorm", cfg.norm_eps, "final_norm", self.dtype)

    def embed(self, images: Array) -> Array:
        """Patch embedding, class token, positions and pre-norm: the input of the first block."""
        cfg = self.config
        x = self.patch_embed(images.astype(self.dtype))
        batch = x.shape[0]
        x = x.reshape(batch, -1, cfg.width)
        if cfg.use_cls_token:
            cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (batch, 1, cfg.width))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.pos_embed.astype(x.dtype)[None]
        if cfg.pre_norm:
            x = self.pre_norm(x)
        return x

    def head(self, x: Array) -> Array:
        """Final norm and class-token removal after the last block used."""
        cfg = self.config
        if cfg.final_norm and cfg.blocks_used == cfg.depth:
            x = self.final_norm(x)
        if cfg.use_cls_token and cfg.drop_cls_token:
            x = x[:, 1:]
        return x

    def __call__(self, images: Array) -> Array:
        x = self.embed(images)
        for block in self.blocks:
            x, _ = block(x, mask=None)
        return self.head(x)
