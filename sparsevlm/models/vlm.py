"""The VLM composition: vision tower → connector (MLP or Q-Former) → image tokens spliced into the text.

Image tokens go before the text (the built-in model) or, when the config names an image token,
into the prompt positions holding it, in order (how HF LLaVA, BLIP-2 and InstructBLIP do it).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsevlm.config import VLMConfig
from sparsevlm.models.decoder import Decoder, decoder_block
from sparsevlm.models.layers import MLP, Dtype, KVCache
from sparsevlm.models.layers import causal_mask as attention_mask
from sparsevlm.models.stages import Carry, PyTree, Stage
from sparsevlm.models.vit import ViT, vit_block

Array = jax.Array
Instruction = tuple[Array, Array]  # the Q-Former's own prompt tokens [B, Tq] and mask (InstructBLIP)

TOWERS = ("vision", "connector", "language")


def connector_module(config: VLMConfig, dtype: Dtype = jnp.float32) -> nn.Module:
    """The connector as a standalone module: LLaVA MLP projector or Q-Former."""
    if config.connector.kind == "qformer":
        from sparsevlm.models.qformer import QFormer

        return QFormer(config.connector, config.language.width, dtype)
    return MLP(config.connector.hidden_dim, config.language.width, config.connector.act, gated=False, dtype=dtype)


def splice_image_tokens(text_embeds: Array, image_tokens: Array, tokens: Array, image_token_id: int) -> Array:
    """Replace, row by row and in order, the embeddings at `image_token_id` positions by the image tokens."""
    is_image = tokens == image_token_id
    order = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_tokens.shape[1] - 1)
    gathered = jnp.take_along_axis(image_tokens, order[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class VLM(nn.Module):
    """Image + left-padded text → logits over the sequence `[image tokens | text tokens]`.

    Padding inside the text is excluded by `text_mask`; rotary positions count only real tokens,
    so the result does not depend on how much padding a row has.
    """

    config: VLMConfig
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.vision = ViT(cfg.vision, self.dtype)
        self.connector = connector_module(cfg, self.dtype)
        self.language = Decoder(cfg.language, self.dtype)

    def encode_images(self, images: Array, instruction: Instruction | None = None) -> Array:
        """Images `[B, H, W, C]` → image tokens in the language model's embedding space `[B, N, E]`.

        `instruction` (InstructBLIP) is the Q-Former's own tokens and mask for the prompt.
        """
        features = self.vision(images)
        if self.config.connector.kind != "qformer":
            return self.connector(features)
        if self.config.connector.reads_text:
            if instruction is None:
                raise ValueError("this model's Q-Former reads the instruction: pass `instruction`")
            return self.connector(features, instruction[0], instruction[1])
        return self.connector(features)

    def language_inputs(self, image_tokens: Array, tokens: Array, text_mask: Array) -> tuple[Array, Array, Array]:
        """Splice image tokens into the text: embeddings `[B, L, E]`, validity and positions.

        L is N + T when image tokens go before the text, else T (they replace placeholder tokens).
        """
        text = self.language.embed_tokens(tokens)
        if self.config.image_token_id is None:
            embeds = jnp.concatenate([image_tokens.astype(text.dtype), text], axis=1)
            valid = jnp.concatenate([jnp.ones(image_tokens.shape[:2], bool), text_mask.astype(bool)], axis=1)
        else:
            embeds = splice_image_tokens(text, image_tokens, tokens, self.config.image_token_id)
            valid = text_mask.astype(bool)
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        return embeds, valid, positions

    def __call__(
        self,
        images: Array,
        tokens: Array,
        text_mask: Array,
        cache: list[KVCache] | None = None,
        instruction: Instruction | None = None,
    ) -> tuple[Array, list[KVCache] | None]:
        """Full forward (training, scoring, or generation prefill when `cache` is given).

        Returns logits `[B, L, V]` (L = `prefix_length(T)`) and, with a cache of length S >= L, the filled cache.
        """
        image_tokens = self.encode_images(images, instruction)
        embeds, valid, positions = self.language_inputs(image_tokens, tokens, text_mask)
        length = embeds.shape[1]
        if cache is not None:
            pad = cache[0]["k"].shape[1] - length
            valid = jnp.pad(valid, ((0, 0), (0, pad)))
        mask = attention_mask(valid, jnp.arange(length))
        return self.language(embeds, positions, mask, cache, 0)

    def prefix_length(self, num_text: int) -> int:
        """Sequence length the language model sees for `num_text` text tokens."""
        cfg = self.config
        return num_text + (cfg.num_image_tokens if cfg.image_token_id is None else 0)

    def decode(
        self,
        tokens: Array,
        positions: Array,
        valid: Array,
        cache: list[KVCache],
        index: Array,
    ) -> tuple[Array, list[KVCache]]:
        """One cached step: tokens `[B, 1]` written at cache slot `index`; `valid` `[B, S]` marks usable slots."""
        embeds = self.language.embed_tokens(tokens)
        mask = attention_mask(valid, jnp.reshape(index, (1,)))
        logits, cache = self.language(embeds, positions, mask, cache, index)
        assert cache is not None
        return logits, cache


@functools.lru_cache(maxsize=16)
def calibration_stages(config: VLMConfig, dtype: Dtype = jnp.float32) -> tuple[Stage, ...]:
    """The forward pass as a chain of stages, one per transformer block, for block-wise calibration.

    The carry starts as `{"images", "tokens", "text_mask"}`; `x` is the hidden state and `weight`
    marks the tokens that count as calibration data (padding does not). Cached per config, so
    repeated pruning runs reuse the stage functions and their compilations.
    """
    model = VLM(config, dtype)
    vit = ViT(config.vision, dtype)
    vision_block = vit_block(config.vision, dtype)
    language_block = decoder_block(config.language, dtype)
    connector = connector_module(config, dtype)

    def vision_embed(params: PyTree, carry: Carry) -> Carry:
        rest = {k: v for k, v in carry.items() if k != "images"}
        return rest | {"x": vit.apply({"params": params}, carry["images"], method=ViT.embed)}

    def vision_layer(params: PyTree, carry: Carry) -> Carry:
        return carry | {"x": vision_block.apply({"params": params}, carry["x"], None)[0]}

    def vision_head(params: PyTree, carry: Carry) -> Carry:
        return carry | {"x": vit.apply({"params": params}, carry["x"], method=ViT.head)}

    def project(params: PyTree, carry: Carry) -> Carry:
        return carry | {"x": connector.apply({"params": params}, carry["x"])}

    connector_stages = [Stage("connector", project)]
    if config.connector.kind == "qformer":
        connector_stages = _qformer_stages(config, dtype)

    def splice_and_position(module: VLM, image_tokens: Array, tokens: Array, text_mask: Array) -> tuple:
        x, valid, positions = module.language_inputs(image_tokens, tokens, text_mask)
        return module.language.add_positions(x, positions), valid, positions  # OPT's learned positions

    def splice(params: PyTree, carry: Carry) -> Carry:
        x, valid, positions = model.apply(
            {"params": {"language": params}}, carry["x"], carry["tokens"], carry["text_mask"],
            method=splice_and_position,
        )
        return {"x": x, "valid": valid, "positions": positions, "weight": valid.astype(jnp.float32)}

    def language_layer(params: PyTree, carry: Carry) -> Carry:
        mask = attention_mask(carry["valid"], jnp.arange(carry["x"].shape[1]))
        return carry | {"x": language_block.apply({"params": params}, carry["x"], mask, carry["positions"])[0]}

    return (
        Stage("vision", vision_embed),
        *[Stage(f"vision/blocks_{i}", vision_layer) for i in range(config.vision.blocks_used)],
        Stage("vision", vision_head),
        *connector_stages,
        Stage("language", splice),
        *[Stage(f"language/blocks_{i}", language_layer) for i in range(config.language.depth)],
    )


def _qformer_stages(config: VLMConfig, dtype: Dtype) -> list[Stage]:
    """Q-Former stages: embed (queries [+ instruction]), one stage per block, then query slice + projection.

    The image features ride along in the carry as `image` (every cross-attention reads them);
    `weight` marks the query and real instruction positions.
    """
    from sparsevlm.models.qformer import QFormer, qformer_block

    cfg = config.connector
    qformer = QFormer(cfg, config.language.width, dtype)
    num_queries = cfg.num_query_tokens
    blocks = {index: qformer_block(cfg, index, dtype) for index in range(min(cfg.depth, cfg.cross_attention_frequency + 1))}

    def embed(params: PyTree, carry: Carry) -> Carry:
        batch = carry["x"].shape[0]
        text = (carry["instruction_tokens"], carry["instruction_mask"]) if cfg.reads_text else (None, None)
        x, self_mask = qformer.apply({"params": params}, *text, batch, method=QFormer.embed)
        weight = jnp.ones((batch, num_queries), jnp.float32)
        if cfg.reads_text:
            weight = jnp.concatenate([weight, carry["instruction_mask"].astype(jnp.float32)], axis=1)
        return carry | {"image": carry["x"], "x": x, "self_mask": self_mask, "weight": weight}

    def layer_fn(block: nn.Module):  # noqa: ANN202 - one function per block shape (with / without cross-attention)
        def layer(params: PyTree, carry: Carry) -> Carry:
            x = block.apply({"params": params}, carry["x"], carry["self_mask"], carry["image"], num_queries)
            return carry | {"x": x}

        return layer

    with_cross = layer_fn(blocks[0])
    without_cross = layer_fn(blocks[1]) if 1 in blocks and cfg.cross_attention_frequency > 1 else with_cross

    def head(params: PyTree, carry: Carry) -> Carry:
        rest = {k: v for k, v in carry.items() if k not in ("image", "self_mask", "weight")}
        return rest | {"x": qformer.apply({"params": params}, carry["x"], method=QFormer.head)}

    layers = [
        Stage(f"connector/blocks_{i}", with_cross if i % cfg.cross_attention_frequency == 0 else without_cross)
        for i in range(cfg.depth)
    ]
    return [Stage("connector", embed), *layers, Stage("connector", head)]
