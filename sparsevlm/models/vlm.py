"""The VLM composition: vision tower → connector (MLP or Q-Former) → image tokens spliced into the text.

Image tokens go before the text (the built-in model) or, when the config names an image token,
into the prompt positions holding it, in order (how HF LLaVA, BLIP-2 and InstructBLIP do it).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsevlm.config import VLMConfig
from sparsevlm.models.decoder import Decoder, decoder_stages
from sparsevlm.models.layers import MLP, Dtype, KVCache, causal_mask
from sparsevlm.models.stages import Call, Carry, Stage, prefixed, run_stages, scanned_stacks
from sparsevlm.models.t5 import T5, t5_stages
from sparsevlm.models.vit import ViT, vit_stages

Array = jax.Array
Instruction = tuple[Array, Array]  # the Q-Former's own prompt tokens [B, Tq] and mask (InstructBLIP)


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


def connector_module(config: VLMConfig, dtype: Dtype = jnp.float32, **module_kwargs: Any) -> nn.Module:
    """The connector as a standalone module: LLaVA MLP projector or Q-Former."""
    if config.connector.kind == "qformer":
        from sparsevlm.models.qformer import QFormer

        return QFormer(config.connector, config.language.width, dtype, **module_kwargs)
    return MLP(config.connector.hidden_dim, config.language.width, config.connector.act, gated=False, dtype=dtype,
               **module_kwargs)


def splice_image_tokens(text_embeds: Array, image_tokens: Array, tokens: Array, image_token_id: int) -> Array:
    """Replace, row by row and in order, the embeddings at `image_token_id` positions by the image tokens."""
    is_image = tokens == image_token_id
    order = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_tokens.shape[1] - 1)
    gathered = jnp.take_along_axis(image_tokens, order[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(text_embeds.dtype), text_embeds)


def join_image_tokens(
    text_embeds: Array, image_tokens: Array, tokens: Array, text_mask: Array, image_token_id: int | None
) -> tuple[Array, Array, Array]:
    """Image tokens and text as one sequence: embeddings `[B, L, E]`, validity and positions.

    L is N + T when image tokens go before the text (`image_token_id` None), else T (they replace
    placeholder tokens). Positions count only valid tokens, so padding does not shift them.
    """
    if image_token_id is None:
        embeds = jnp.concatenate([image_tokens.astype(text_embeds.dtype), text_embeds], axis=1)
        valid = jnp.concatenate([jnp.ones(image_tokens.shape[:2], bool), text_mask.astype(bool)], axis=1)
    else:
        embeds = splice_image_tokens(text_embeds, image_tokens, tokens, image_token_id)
        valid = text_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    return embeds, valid, positions


def packed_layout(valid: Array, segments: Array) -> tuple[Array, Array]:
    """Attention mask `[B, L, L]` and positions `[B, L]` of rows packing several texts after one shared prefix.

    `segments` `[B, L]` is 0 on the shared prefix (the image tokens) and k >= 1 on the k-th text, each
    text contiguous and after the prefix. A text attends causally to the prefix and to itself only, and
    its positions restart after the prefix, so every text sees exactly what it would alone in its own
    row (shared-image packing: one image's questions share its tokens).
    """
    count = jnp.cumsum(valid, axis=1)
    starts = (segments > 0) & (segments != jnp.pad(segments, ((0, 0), (1, 0)))[:, :-1])
    before = jax.lax.cummax(jnp.where(starts, count - valid, 0), axis=1)  # valid tokens before the text
    shared = jnp.sum(valid & (segments == 0), axis=1, keepdims=True)
    positions = jnp.where(segments > 0, shared + count - before - 1, count - 1)
    same = (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == 0)
    return causal_mask(valid, jnp.arange(valid.shape[1])) & same, jnp.maximum(positions, 0)


class VLM(nn.Module):
    """Image + left-padded text → logits over the sequence `[image tokens | text tokens]`.

    The forward pass is `forward_stages(config)`: the vision tower's, the connector's and the
    language model's own stage lists joined by the step that splices image tokens into the text.
    Padding inside the text is excluded by `text_mask`; positions count only real tokens, so the
    result does not depend on how much padding a row has.

    `scan_layers` holds each block stack as one scanned module (compiled once; params in the
    `stack_layers(params, scan_stacks(config))` layout); `remat` rematerialises every block in the
    backward pass (`REMAT_MODES`). Neither changes the result.
    """

    config: VLMConfig
    dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat: str = "none"

    def setup(self) -> None:
        cfg = self.config
        self.vision = ViT(cfg.vision, self.dtype, scan_layers=self.scan_layers)
        self.connector = connector_module(cfg, self.dtype)
        language = T5 if cfg.language.arch == "t5" else Decoder
        self.language = language(cfg.language, self.dtype, scan_layers=self.scan_layers)

    def __call__(
        self,
        images: Array,
        tokens: Array,
        text_mask: Array,
        cache: list[KVCache] | None = None,
        instruction: Instruction | None = None,
        target_mask: Array | None = None,
        segments: Array | None = None,
    ) -> tuple[Array, list[KVCache] | None]:
        """Full forward (training, scoring, or generation prefill when `cache` is given).

        Returns logits `[B, L, V]` (L = `prefix_length(T)`) and, with a cache of length S >= L, the
        filled cache. Logits at t predict token t + 1 for every architecture: an encoder–decoder
        (T5) encodes the prompt (`text_mask` without `target_mask`) and decodes the targets, its
        start token sitting at the last prompt position. `instruction` is the Q-Former's own prompt
        tokens and mask (InstructBLIP). `segments` `[B, T]` packs several texts per image row (k >= 1
        on the k-th, 0 on padding; `packed_layout`): training only, image tokens before the text.
        """
        if cache is not None and self.config.language.arch == "t5":
            raise ValueError("an encoder-decoder model has no decoder-only prefill; use eval.generate")
        if cache is not None and segments is not None:
            raise ValueError("generation prefill takes one text per row: pass segments=None")
        carry = self._inputs(images, tokens, text_mask, instruction, target_mask, segments)
        if cache is not None:
            carry |= {"cache": cache, "cache_index": 0}
        carry = run_stages(self, forward_stages(self.config, self.dtype), carry, self.remat)
        return carry["logits"], carry.get("cache")

    def hidden_states(self, images: Array, tokens: Array, text_mask: Array, instruction: Instruction | None = None,
                      target_mask: Array | None = None, segments: Array | None = None) -> Array:
        """The forward pass up to the LM head: the last hidden states `[B, L, E]` (`logits` maps them on)."""
        carry = self._inputs(images, tokens, text_mask, instruction, target_mask, segments)
        return run_stages(self, forward_stages(self.config, self.dtype)[:-1], carry, self.remat)["x"]

    def logits(self, hidden: Array) -> Array:
        """The LM head (final norm included) on hidden states `[B, T, E]` → logits `[B, T, V]` (float32)."""
        return run_stages(self, forward_stages(self.config, self.dtype)[-1:], {"x": hidden})["logits"]

    def _inputs(self, images: Array, tokens: Array, text_mask: Array, instruction: Instruction | None,
                target_mask: Array | None, segments: Array | None = None) -> Carry:
        """The first carry of the forward pass."""
        carry = {"images": images, "tokens": tokens, "text_mask": text_mask}
        if target_mask is not None:
            carry["target_mask"] = target_mask
        if segments is not None:
            cfg = self.config
            if cfg.language.arch == "t5" or cfg.image_token_id is not None:
                raise ValueError("packed texts (segments) need a decoder-only model with image tokens before the "
                                 f"text; this one has language.arch={cfg.language.arch!r}, "
                                 f"image_token_id={cfg.image_token_id}")
            carry["segments"] = segments
        if instruction is not None:
            carry |= {"instruction_tokens": instruction[0], "instruction_mask": instruction[1]}
        elif self.config.connector.reads_text:
            raise ValueError("this model's Q-Former reads the instruction: pass `instruction`")
        return carry

    def encode_prompt(self, images: Array, tokens: Array, text_mask: Array,
                      instruction: Instruction | None = None) -> tuple[Array, Array]:
        """T5: the encoder's outputs `[B, S, E]` for image + prompt, and their validity `[B, S]`."""
        stages = forward_stages(self.config, self.dtype)
        end = max(i for i, s in enumerate(stages) if s.prefix.startswith("language/encoder")) + 1
        carry = run_stages(self, stages[:end], self._inputs(images, tokens, text_mask, instruction, None))
        return carry["encoded"], carry["encoded_valid"]

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
        mask = causal_mask(valid, jnp.reshape(index, (1,)))
        logits, cache = self.language(embeds, positions, mask, cache, index)
        assert cache is not None
        return logits, cache


@functools.lru_cache(maxsize=16)
def forward_stages(config: VLMConfig, dtype: Dtype = jnp.float32) -> tuple[Stage, ...]:
    """The VLM's forward pass as stages, prefixes from the VLM's root; what `VLM.__call__` runs.

    Block-wise calibration runs the same stages one at a time. The carry starts as `{"images",
    "tokens", "text_mask"}` (+ `target_mask`, instruction tokens); `x` is the hidden state and
    `weight` marks the tokens that count as calibration data (padding does not). Cached per config,
    so repeated pruning runs reuse the stage functions and their compilations.
    """
    if config.connector.kind == "qformer":
        from sparsevlm.models.qformer import qformer_stages

        connector = prefixed(qformer_stages(config.connector, config.language.width, dtype), "connector")
    else:
        connector = [Stage("connector", connector_module(config, dtype, parent=None), _project)]
    lang, image_token_id = config.language, config.image_token_id
    if lang.arch == "t5":
        encoder, decoder = t5_stages(lang, dtype)

        def splice(call: Call, carry: Carry, layer: int | None) -> Carry:
            # Encoder: image tokens + the prompt; decoder: the start token at the last prompt position, then targets.
            target = carry.get("target_mask")
            prompt = prompt_mask(carry["text_mask"], target)
            text = call(carry["tokens"], method="embed_tokens")
            embeds, valid, _ = join_image_tokens(text, carry["x"], carry["tokens"], prompt, image_token_id)
            tokens, decoder_valid = decoder_inputs(carry["tokens"], carry["text_mask"], target, lang.decoder_start_id)
            return {"x": embeds, "encoded_valid": valid, "decoder_tokens": tokens, "decoder_valid": decoder_valid,
                    "weight": valid.astype(jnp.float32)}

        language = [Stage("language", T5(lang, dtype, parent=None), splice), *prefixed((*encoder, *decoder), "language")]
    else:

        def splice(call: Call, carry: Carry, layer: int | None) -> Carry:
            text = call(carry["tokens"], method="embed_tokens")
            x, valid, positions = join_image_tokens(text, carry["x"], carry["tokens"], carry["text_mask"],
                                                    image_token_id)
            out = {"x": x, "valid": valid, "positions": positions, "weight": valid.astype(jnp.float32)}
            if "segments" in carry:  # several texts share the row's image (`packed_layout`)
                image = jnp.zeros((x.shape[0], x.shape[1] - carry["tokens"].shape[1]), carry["segments"].dtype)
                mask, positions = packed_layout(valid, jnp.concatenate([image, carry["segments"]], axis=1))
                return out | {"positions": positions, "mask": mask}
            attend = valid
            if "cache" in carry:  # generation prefill: the cache's later slots are not written yet
                attend = jnp.pad(valid, ((0, 0), (0, carry["cache"][0]["k"].shape[1] - x.shape[1])))
                out |= {"cache": carry["cache"], "cache_index": carry["cache_index"]}
            return out | {"mask": causal_mask(attend, jnp.arange(x.shape[1]))}

        language = [Stage("language", Decoder(lang, dtype, parent=None), splice),
                    *prefixed(decoder_stages(lang, dtype), "language")]
    return (*prefixed(vit_stages(config.vision, dtype), "vision"), *connector, *language)


def scan_stacks(config: VLMConfig) -> dict[str, int]:
    """`{stack prefix: depth}` of the block stacks a `scan_layers` VLM holds as one module each."""
    return scanned_stacks(forward_stages(config))


def _project(call: Call, carry: Carry, layer: int | None) -> Carry:
    """The MLP connector: vision features → language embeddings."""
    return carry | {"x": call(carry["x"])}
