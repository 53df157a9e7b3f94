"""VLM generation with the KV cache: greedy or beam search, compiled once per (batch shape, decoding setup).

Both language kinds reduce to the same three things, which greedy decoding and `beam_search` consume:
the first new token's logits, a decoding state with the batch as its leading axis, and a cached step
`(state, tokens [N], step) -> (logits [N, V], state)`. Decoder-only models prefill the prompt into the
cache; the T5 encoder-decoder encodes the prompt and decodes its start token.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sparsevlm.eval.beam import Decoding, beam_search, greedy_search
from sparsevlm.models.decoder import init_cache
from sparsevlm.models.t5 import T5
from sparsevlm.models.vlm import VLM, Instruction

Array = jax.Array
PyTree = Any
GenerateFn = Callable[[Any, Array, Array, Array], Array]


def generate(
    model: VLM,
    params: Any,
    images: Array,
    tokens: Array,
    text_mask: Array,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    instruction: Instruction | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
) -> Array:
    """New tokens `[B, max_new_tokens]` after left-padded prompts; `pad_id` after each row's EOS.

    `num_beams=1` decodes greedily; more beams run `beam_search` (HF `generate(num_beams=K)`, with
    `length_penalty` the exponent on the generated length).
    """
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams={num_beams!r} must be a positive int")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    first_logits, state, step = _start(model, params, images, tokens, text_mask, max_new_tokens, instruction)
    if num_beams == 1:
        return greedy_search(step, first_logits, state, max_new_tokens, eos_id, pad_id)
    return beam_search(step, first_logits, state, num_beams, max_new_tokens, eos_id, pad_id, length_penalty)


def _start(
    model: VLM,
    params: Any,
    images: Array,
    tokens: Array,
    text_mask: Array,
    max_new_tokens: int,
    instruction: Instruction | None,
) -> Decoding:
    """Prefill (decoder-only) or encode and decode the start token (T5), with room for `max_new_tokens`."""
    if model.config.language.arch == "t5":
        encoded, valid = model.apply({"params": params}, images, tokens, text_mask, instruction,
                                     method=VLM.encode_prompt)
        language = T5(model.config.language, model.dtype)
        return start_t5_decoding(language, params["language"], encoded, valid, max_new_tokens)
    return _decoder_start(model, params, images, tokens, text_mask, max_new_tokens, instruction)


def start_t5_decoding(language: T5, params: Any, encoded: Array, valid: Array, max_new_tokens: int) -> Decoding:
    """The decoder's start token at slot 0 after the encoder's outputs; new token `i` is fed at slot `i + 1`."""
    batch = encoded.shape[0]
    variables = {"params": params}

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


def _decoder_start(
    model: VLM,
    params: Any,
    images: Array,
    tokens: Array,
    text_mask: Array,
    max_new_tokens: int,
    instruction: Instruction | None,
) -> Decoding:
    """Prompt prefilled into a cache of `prefix + max_new_tokens` slots; new token `i` goes to slot `prefix + i`."""
    batch, length = tokens.shape
    prefix = model.prefix_length(length)
    num_image = prefix - length
    cache = init_cache(model.config.language, batch, prefix + max_new_tokens, model.dtype)
    logits, cache = model.apply({"params": params}, images, tokens, text_mask, cache, instruction)
    valid = jnp.concatenate(
        [jnp.ones((batch, num_image), bool), text_mask.astype(bool), jnp.zeros((batch, max_new_tokens), bool)],
        axis=1,
    )
    # Positions count real tokens only, so a left-padded row continues from its own last one.
    position = num_image + text_mask.sum(axis=1).astype(jnp.int32) - 1

    def step(state: dict, tokens: Array, step: Array) -> tuple[Array, dict]:
        index = prefix + step
        valid = state["valid"].at[:, index].set(True)
        position = state["position"] + 1
        logits, cache = model.apply(
            {"params": params}, tokens[:, None], position[:, None], valid, state["cache"], index, method=VLM.decode
        )
        return logits[:, 0], {"cache": cache, "valid": valid, "position": position}

    return Decoding(logits[:, -1], {"cache": cache, "valid": valid, "position": position}, step)


@functools.lru_cache(maxsize=16)
def compiled_generate(
    model: VLM, max_new_tokens: int, eos_id: int, pad_id: int, num_beams: int = 1, length_penalty: float = 1.0
) -> GenerateFn:
    """`jit`-compiled `generate` for one model and decoding setup, reused across calls."""
    return jax.jit(
        functools.partial(generate, model, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                          num_beams=num_beams, length_penalty=length_penalty)
    )


def decode_text(tokenizer: Any, ids: Any, eos_id: int) -> str:
    """Token ids up to the first EOS → text."""
    ids = [int(i) for i in ids]
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
