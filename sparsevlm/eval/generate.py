"""Greedy decoding with the KV cache, compiled once per (batch shape, max_new_tokens)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sparsevlm.models.decoder import init_cache
from sparsevlm.models.t5 import T5
from sparsevlm.models.t5 import greedy_generate as t5_greedy
from sparsevlm.models.vlm import VLM, Instruction

Array = jax.Array
GenerateFn = Callable[[Any, Array, Array, Array], Array]


def greedy_generate(
    model: VLM,
    params: Any,
    images: Array,
    tokens: Array,
    text_mask: Array,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    instruction: Instruction | None = None,
) -> Array:
    """New tokens `[B, max_new_tokens]` after left-padded prompts; `pad_id` after each row's EOS."""
    if model.config.language.arch == "t5":
        embeds, valid = model.apply({"params": params}, images, tokens, text_mask, instruction, method=_encoder_inputs)
        language = T5(model.config.language, model.dtype)
        return t5_greedy(language, params["language"], embeds, valid, max_new_tokens,
                         model.config.language.decoder_start_id, eos_id, pad_id)
    batch, length = tokens.shape
    prefix = model.prefix_length(length)
    num_image = prefix - length
    cache = init_cache(model.config.language, batch, prefix + max_new_tokens, model.dtype)
    logits, cache = model.apply({"params": params}, images, tokens, text_mask, cache, instruction)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    valid = jnp.concatenate(
        [jnp.ones((batch, num_image), bool), text_mask.astype(bool), jnp.zeros((batch, max_new_tokens), bool)],
        axis=1,
    )
    position = num_image + text_mask.sum(axis=1).astype(jnp.int32) - 1

    def step(carry: tuple, offset: Array) -> tuple[tuple, Array]:
        token, cache, valid, position, done = carry
        index = prefix + offset
        valid = valid.at[:, index].set(True)
        position = position + 1
        logits, cache = model.apply(
            {"params": params}, token[:, None], position[:, None], valid, cache, index, method=VLM.decode
        )
        done = done | (token == eos_id)
        nxt = jnp.where(done, pad_id, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32))
        return (nxt, cache, valid, position, done), nxt

    carry = (first, cache, valid, position, jnp.zeros((batch,), bool))
    _, rest = jax.lax.scan(step, carry, jnp.arange(max_new_tokens - 1))
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def _encoder_inputs(model: VLM, images: Array, tokens: Array, text_mask: Array, instruction: Instruction | None):
    return model.encoder_inputs(model.encode_images(images, instruction), tokens, text_mask, None)


@functools.lru_cache(maxsize=16)
def compiled_generate(model: VLM, max_new_tokens: int, eos_id: int, pad_id: int) -> GenerateFn:
    """`jit`-compiled `greedy_generate` for one model and decoding setup, reused across calls."""
    return jax.jit(
        functools.partial(greedy_generate, model, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
    )


def decode_text(tokenizer: Any, ids: Any, eos_id: int) -> str:
    """Token ids up to the first EOS → text."""
    ids = [int(i) for i in ids]
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
