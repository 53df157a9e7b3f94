"""ViT vision tower (CLIP / SigLIP / BLIP-2 style, chosen by `VisionConfig` switches)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsevlm.config import VisionConfig
from sparsevlm.models.layers import Block, Dtype, make_norm
from sparsevlm.models.stages import Call, Carry, Stage, block_stack, run_stages

Array = jax.Array


def vit_block(config: VisionConfig, dtype: Dtype = jnp.float32, **module_kwargs: Any) -> Block:
    """One ViT block as a standalone module (the tower's blocks and block-wise calibration share it)."""
    return Block(
        **module_kwargs,
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
    scan_layers: bool = False  # blocks as one scanned module (params stacked: `stack_layers`)

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
        self.blocks = block_stack(lambda: vit_block(cfg, self.dtype), cfg.blocks_used, self.scan_layers)
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
        """Images → features, through `vit_stages`."""
        return run_stages(self, vit_stages(self.config, self.dtype), {"images": images})["x"]


@functools.lru_cache(maxsize=32)
def vit_stages(config: VisionConfig, dtype: Dtype = jnp.float32) -> tuple[Stage, ...]:
    """The tower's forward pass: `images` → embed → blocks used → head, as `x` in the carry."""
    # parent=None: definitions only, even when first built inside a module's method.
    vit, block = ViT(config, dtype, parent=None), vit_block(config, dtype, parent=None)

    def embed(call: Call, carry: Carry, layer: int | None) -> Carry:
        rest = {k: v for k, v in carry.items() if k != "images"}
        return rest | {"x": call(carry["images"], method="embed")}

    def layer_step(call: Call, carry: Carry, layer: int | None) -> Carry:
        return carry | {"x": call(carry["x"], None)[0]}

    def head(call: Call, carry: Carry, layer: int | None) -> Carry:
        return carry | {"x": call(carry["x"], method="head")}

    blocks = [Stage(f"blocks_{i}", block, layer_step, i, scannable=True) for i in range(config.blocks_used)]
    return (Stage("", vit, embed), *blocks, Stage("", vit, head))
