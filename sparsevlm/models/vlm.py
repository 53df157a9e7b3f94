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
from sparsevlm.models.layers import MLP, Dtype, KVCache, make_norm
from sparsevlm.models.layers import causal_mask as attention_mask
from sparsevlm.models.stages import Carry, PyTree, Stage
from sparsevlm.models.t5 import T5
from sparsevlm.models.vit import ViT, vit_block

Array = jax.Array
Instruction = tuple[Array, Array]  # the Q-Former's own prompt tokens [B, Tq] and mask (InstructBLIP)

TOWERS = ("vision", "connector", "language")


def prompt_mask(text_mask: Array, target_mask: Array | None) -> Array:
    """The prompt part of left-padded `[prompt | targets]` rows."""
    mask = text_mask.astype(bool)
    return mask if target_mask is None else mask & ~target_mask.astype(bool)


def decoder_inputs(tokens: Array, text_mask: Array, target_mask: Array | None, start_id: int) -> tuple[Array, Array]:
    """Encoder–decoder view of `[prompt | targets]`: the start token replaces the last prompt token,
    so decoder position t (from there on) predicts token t + 1, as in the decoder-only layout."""
    prompt = prompt_mask(text_mask, target_mask)
    slots = jnp.arange(tokens.shape[1])
    last = jnp.max(jnp.where(prompt, slots[None], -1), axis=1, keepdims=True)
    decoder_tokens = jnp.where(slots[None] == last, start_id, tokens)
    return decoder_tokens, text_mask.astype(bool) & (slots[None] >= last)


def prediction_mask(config: VLMConfig, text_mask: Array, target_mask: Array | None) -> Array:
    """`[B, T]` True where the logits are a real next-token prediction (T5: the decoder's positions)."""
    if config.language.arch == "t5":
        return decoder_inputs(text_mask.astype(jnp.int32), text_mask, target_mask, config.language.decoder_start_id)[1]
    return text_mask.astype(bool)


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
        self.language = T5(cfg.language, self.dtype) if cfg.language.arch == "t5" else Decoder(cfg.language, self.dtype)

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
        target_mask: Array | None = None,
    ) -> tuple[Array, list[KVCache] | None]:
        """Full forward (training, scoring, or generation prefill when `cache` is given).

        Returns logits `[B, L, V]` (L = `prefix_length(T)`) and, with a cache of length S >= L, the
        filled cache. Logits at t predict token t + 1 for every architecture: an encoder–decoder
        (T5) encodes the prompt (`text_mask` without `target_mask`) and decodes the targets, its
        start token sitting at the last prompt position.
        """
        image_tokens = self.encode_images(images, instruction)
        if self.config.language.arch == "t5":
            if cache is not None:
                raise ValueError("an encoder-decoder model has no decoder-only prefill; use eval.generate")
            embeds, valid = self.encoder_inputs(image_tokens, tokens, text_mask, target_mask)
            decoder_tokens, decoder_valid = self.decoder_inputs(tokens, text_mask, target_mask)
            return self.language(embeds, valid, decoder_tokens, decoder_valid)
        embeds, valid, positions = self.language_inputs(image_tokens, tokens, text_mask)
        length = embeds.shape[1]
        if cache is not None:
            pad = cache[0]["k"].shape[1] - length
            valid = jnp.pad(valid, ((0, 0), (0, pad)))
        mask = attention_mask(valid, jnp.arange(length))
        return self.language(embeds, positions, mask, cache, 0)

    def encoder_inputs(
        self, image_tokens: Array, tokens: Array, text_mask: Array, target_mask: Array | None
    ) -> tuple[Array, Array]:
        """T5: encoder embeddings (image tokens spliced into the prompt) and their validity."""
        prompt = prompt_mask(text_mask, target_mask)
        embeds, valid, _ = self.language_inputs(image_tokens, tokens, prompt)
        return embeds, valid

    def decoder_inputs(self, tokens: Array, text_mask: Array, target_mask: Array | None) -> tuple[Array, Array]:
        """T5: decoder tokens (start token at the last prompt position, then the targets) and validity."""
        return decoder_inputs(tokens, text_mask, target_mask, self.config.language.decoder_start_id)

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
    vit = ViT(config.vision, dtype)
    vision_block = vit_block(config.vision, dtype)
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

    language_stages = _t5_stages(config, dtype) if config.language.arch == "t5" else _decoder_stages(config, dtype)
    return (
        Stage("vision", vision_embed),
        *[Stage(f"vision/blocks_{i}", vision_layer) for i in range(config.vision.blocks_used)],
        Stage("vision", vision_head),
        *connector_stages,
        *language_stages,
    )


def _decoder_stages(config: VLMConfig, dtype: Dtype) -> list[Stage]:
    """Decoder-only language stages: splice image tokens into the text, then one stage per block."""
    model = VLM(config, dtype)
    language_block = decoder_block(config.language, dtype)

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

    return [
        Stage("language", splice),
        *[Stage(f"language/blocks_{i}", language_layer) for i in range(config.language.depth)],
    ]


def _t5_stages(config: VLMConfig, dtype: Dtype) -> list[Stage]:
    """Encoder–decoder stages: encoder inputs, position bias, encoder blocks, final norm; then the same
    for the decoder, whose cross-attention reads the encoder output (`encoded`; its keys' padding
    weights are `kv_weight`). Position biases ride in the carry, one per row so chunking can split them.
    """
    from sparsevlm.models.t5 import position_bias, t5_decoder_block, t5_encoder_block

    model = VLM(config, dtype)
    lang = config.language
    encoder_block, decoder_block_ = t5_encoder_block(lang, dtype), t5_decoder_block(lang, dtype)
    final_norm = make_norm(lang.norm, lang.norm_eps, "norm", dtype)

    def splice(params: PyTree, carry: Carry) -> Carry:
        target = carry.get("target_mask")
        embeds, valid = model.apply(
            {"params": {"language": params}}, carry["x"], carry["tokens"], carry["text_mask"], target,
            method=VLM.encoder_inputs,
        )
        tokens, decoder_valid = decoder_inputs(carry["tokens"], carry["text_mask"], target, lang.decoder_start_id)
        return {"x": embeds, "encoded_valid": valid, "decoder_tokens": tokens, "decoder_valid": decoder_valid,
                "weight": valid.astype(jnp.float32)}

    def bias_fn(causal: bool):  # noqa: ANN202 - the encoder's and the decoder's bias stage
        def add_bias(params: PyTree, carry: Carry) -> Carry:
            batch, length = carry["x"].shape[:2]
            slots = jnp.arange(length)
            bias = position_bias(lang, params["relative_bias"]["embedding"], slots, slots, causal)
            return carry | {"bias": jnp.broadcast_to(bias, (batch, *bias.shape[1:]))}

        return add_bias

    def encoder_layer(params: PyTree, carry: Carry) -> Carry:
        valid = carry["encoded_valid"]
        mask = jnp.broadcast_to(valid[:, None, :], (valid.shape[0], valid.shape[1], valid.shape[1]))
        x, _ = encoder_block.apply({"params": params}, carry["x"], mask, score_bias=carry["bias"])
        return carry | {"x": x}

    def encoder_end(params: PyTree, carry: Carry) -> Carry:
        encoded = final_norm.apply({"params": params["norm"]}, carry["x"])
        keep = ("encoded_valid", "decoder_tokens", "decoder_valid")
        return {k: carry[k] for k in keep} | {"encoded": encoded}

    def decoder_embed(params: PyTree, carry: Carry) -> Carry:
        x = jnp.take(params["embed"]["embedding"], carry["decoder_tokens"], axis=0).astype(dtype)
        return carry | {"x": x, "weight": carry["decoder_valid"].astype(jnp.float32),
                        "kv_weight": carry["encoded_valid"].astype(jnp.float32)}

    def decoder_layer(params: PyTree, carry: Carry) -> Carry:
        x, valid, encoded_valid = carry["x"], carry["decoder_valid"], carry["encoded_valid"]
        mask = attention_mask(valid, jnp.arange(x.shape[1]))
        cross = jnp.broadcast_to(encoded_valid[:, None, :], (x.shape[0], x.shape[1], encoded_valid.shape[1]))
        x, _ = decoder_block_.apply({"params": params}, x, mask, None, None, 0, carry["bias"], carry["encoded"], cross)
        return carry | {"x": x}

    return [
        Stage("language", splice),
        Stage("language/encoder", bias_fn(causal=False)),
        *[Stage(f"language/encoder/blocks_{i}", encoder_layer) for i in range(lang.depth)],
        Stage("language/encoder", encoder_end),
        Stage("language", decoder_embed),
        Stage("language/decoder", bias_fn(causal=True)),
        *[Stage(f"language/decoder/blocks_{i}", decoder_layer) for i in range(lang.num_decoder_layers)],
    ]


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
        if cfg.reads_text and "instruction_tokens" not in carry:
            raise ValueError("this model's Q-Former reads the instruction: calibration data needs instruction_tokens "
                             "(encode it with the bundle's instruction_tokenizer)")
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
