"""ViT vision tower (CLIP / SigLIP / BLIP-2 style, chosen by `VisionConfig` switches)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsevlm.config import VisionConfig
from sparsevlm.models.layers import Block, Dtype, make_norm

Array = jax.Array


class ViT(nn.Module):
    """Images `[B, H, W, C]` (already normalised) → features `[B, N, width]` at `feature_layer`."""

    config: VisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: Array) -> Array:
        cfg = self.config
        x = nn.Conv(
            cfg.width,
            (cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            use_bias=cfg.patch_bias,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(0.02),
            name="patch_embed",
        )(images.astype(self.dtype))
        batch = x.shape[0]
        x = x.reshape(batch, -1, cfg.width)
        if cfg.use_cls_token:
            cls = self.param("cls_token", nn.initializers.normal(0.02), (cfg.width,), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, cfg.width)), x], axis=1)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (x.shape[1], cfg.width), jnp.float32)
        x = x + pos.astype(x.dtype)[None]
        if cfg.pre_norm:
            x = make_norm("layernorm", cfg.norm_eps, "pre_norm", self.dtype)(x)
        for i in range(cfg.blocks_used):
            x, _ = Block(
                width=cfg.width,
                num_heads=cfg.num_heads,
                head_dim=cfg.width // cfg.num_heads,
                mlp_dim=cfg.mlp_dim,
                act=cfg.act,
                norm="layernorm",
                norm_eps=cfg.norm_eps,
                qkv_bias=cfg.qkv_bias,
                dtype=self.dtype,
                name=f"blocks_{i}",
            )(x, mask=None)
        if cfg.final_norm and cfg.blocks_used == cfg.depth:
            x = make_norm("layernorm", cfg.norm_eps, "final_norm", self.dtype)(x)
        if cfg.use_cls_token and cfg.drop_cls_token:
            x = x[:, 1:]
        return x
