"""Beam search over a cached decoding step, matching Hugging Face `generate(num_beams=K, do_sample=False)`.

The search mirrors transformers 5.x `GenerationMixin._beam_search` with its defaults
(`early_stopping=False`, one EOS token, no logits processors), step for step:

- each running beam adds `log_softmax(logits)` to its summed log-probability; the top `2K` of the
  `K * V` continuations are kept, so at least `K` of them do not end in EOS;
- the next running beams are the best `K` of those `2K` that did not finish (EOS, or the last step);
- only candidates among the first `K` of the `2K` may become finished hypotheses (an EOS ranked
  below `K` is dropped), scored `sum_logprobs / generated_length ** length_penalty`, where
  `generated_length` counts the new tokens including the EOS (the prompt is excluded);
- at the last step every one of the first `K` candidates is finished, so a row that never produced
  an EOS returns its best running beam;
- a row stops accepting hypotheses once `K` have finished and the best running beam, scored at the
  current generated length, cannot beat the worst of them (HF's `early_stopping=False` heuristic);
  the loop ends when no row can improve or after `max_new_tokens` steps.

With `num_beams=1` this reduces to greedy decoding, which `greedy_search` does directly over the same step.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any
DecodeStep = Callable[[PyTree, Array, Array], tuple[Array, PyTree]]

# HF marks excluded candidates by adding this constant (not -inf), and the selections below depend on
# the resulting ordering; use the same value so ties and ranks come out the same.
_MASKED = -1.0e9


class _Beams(NamedTuple):
    """Per-row beam state; `K` beams per row, tokens over the `M` new positions."""

    running_tokens: Array  # [B, K, M] int32, pad_id where not yet generated
    running_scores: Array  # [B, K] float32 summed log-probs
    finished_tokens: Array  # [B, K, M] int32, best finished hypotheses first
    finished_scores: Array  # [B, K] float32 length-penalised scores (_MASKED where empty)
    finished: Array  # [B, K] bool, whether a slot holds a real hypothesis
    improvable: Array  # [B] bool, whether the row still accepts new hypotheses


def _gather(x: Array, index: Array) -> Array:
    """`x[b, index[b, j], ...]` for `x` `[B, N, ...]` and `index` `[B, J]`."""
    index = index.reshape(index.shape + (1,) * (x.ndim - index.ndim))
    return jnp.take_along_axis(x, index, axis=1)


def _init_beams(batch: int, num_beams: int, max_new_tokens: int, pad_id: int) -> _Beams:
    """Start: beam 0 live with score 0; the other beams at -1e9 so the first step expands beam 0 only."""
    tokens = jnp.full((batch, num_beams, max_new_tokens), pad_id, jnp.int32)
    running_scores = jnp.zeros((batch, num_beams), jnp.float32).at[:, 1:].set(_MASKED)
    return _Beams(
        running_tokens=tokens,
        running_scores=running_scores,
        finished_tokens=tokens,
        finished_scores=jnp.full((batch, num_beams), _MASKED, jnp.float32),
        finished=jnp.zeros((batch, num_beams), bool),
        improvable=jnp.ones((batch,), bool),
    )


def _select(
    beams: _Beams,
    logits: Array,
    step: Array,
    penalties: Array,
    eos_id: int,
) -> tuple[_Beams, Array]:
    """One beam-search update from `logits` `[B, K, V]` at new-token index `step`; returns the parent beams `[B, K]`."""
    batch, num_beams, vocab = logits.shape
    max_new_tokens = beams.running_tokens.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    summed = (log_probs + beams.running_scores[:, :, None]).reshape(batch, num_beams * vocab)

    # 2K candidates: even if K of them end in EOS, K remain to continue.
    top_scores, top_index = jax.lax.top_k(summed, 2 * num_beams)
    parent, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    candidate_tokens = _gather(beams.running_tokens, parent).at[:, :, step].set(token)
    hits_stop = (token == eos_id) | (step + 1 >= max_new_tokens)

    # Next running beams: the best K candidates that did not stop.
    running_candidates = top_scores + jnp.where(hits_stop, _MASKED, 0.0)
    keep = jax.lax.top_k(running_candidates, num_beams)[1]
    running_tokens = _gather(candidate_tokens, keep)
    running_scores = _gather(running_candidates, keep)
    parents = _gather(parent, keep)

    # New hypotheses: only stopped candidates among the first K of the 2K count (HF's top_num_beam_mask).
    in_top = jnp.arange(2 * num_beams) < num_beams
    just_finished = hits_stop & in_top[None, :]
    # HF adds its -1e9 masks one after another; keep that order so float rounding (and so ranks) agree.
    hypothesis_scores = top_scores / penalties[step]
    hypothesis_scores = hypothesis_scores + jnp.where(beams.improvable[:, None], 0.0, _MASKED)
    hypothesis_scores = hypothesis_scores + jnp.where(just_finished, 0.0, _MASKED)
    merged_scores = jnp.concatenate([beams.finished_scores, hypothesis_scores], axis=1)
    best = jax.lax.top_k(merged_scores, num_beams)[1]
    finished_tokens = _gather(jnp.concatenate([beams.finished_tokens, candidate_tokens], axis=1), best)
    finished_scores = _gather(merged_scores, best)
    finished = _gather(jnp.concatenate([beams.finished, just_finished], axis=1), best)

    # HF's early_stopping=False heuristic: can the best running beam, scored at the current generated
    # length, still beat the worst finished hypothesis? Only once all K slots are full can it fail.
    best_possible = running_scores[:, :1] / penalties[step]
    worst_finished = jnp.where(finished, jnp.min(finished_scores, axis=1, keepdims=True), _MASKED)
    improvable = beams.improvable & jnp.any(best_possible > worst_finished, axis=1)

    new = _Beams(running_tokens, running_scores, finished_tokens, finished_scores, finished, improvable)
    return new, parents


def _check_inputs(first_logits: Array, state: PyTree, num_beams: int, max_new_tokens: int) -> None:
    """Validate the public arguments, naming the offending one."""
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams={num_beams!r} must be a positive int")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    if first_logits.ndim != 2:
        raise ValueError(f"first_logits must be [batch, vocab], got shape {tuple(first_logits.shape)}")
    batch = first_logits.shape[0]
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch:
            raise ValueError(
                f"state leaf {jax.tree_util.keystr(path)} has shape {tuple(jnp.shape(leaf))}; "
                f"every leaf needs the batch size {batch} as its leading axis"
            )


def beam_search(
    decode_step: DecodeStep,
    first_logits: Array,
    state: PyTree,
    num_beams: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    length_penalty: float = 1.0,
) -> Array:
    """Best finished hypothesis per row `[B, max_new_tokens]` int32, `pad_id` after its EOS.

    Args:
      decode_step: `(state, tokens [N], step) -> (logits [N, V], state)`, one cached step for
        `N = B * num_beams` rows; `step` (int32 scalar) is the index of `tokens` among the new tokens.
      first_logits: `[B, V]` logits for the first new token, from the prefill.
      state: the decoding state after the prefill; every leaf has the batch as its leading axis. It is
        repeated per beam (row `b * num_beams + k`) and re-gathered by parent beam after every step.
      num_beams, max_new_tokens: static; traceable under `jax.jit` for fixed values.
      eos_id, pad_id: token ids; `length_penalty` is the exponent on the generated length.
    """
    _check_inputs(first_logits, state, num_beams, max_new_tokens)
    batch, vocab = first_logits.shape
    # Computed in float64 and rounded once, as HF divides float32 scores by a Python float.
    penalties = jnp.asarray(np.arange(1, max_new_tokens + 1, dtype=np.float64) ** length_penalty, jnp.float32)
    row_offsets = (jnp.arange(batch) * num_beams)[:, None]

    # HF feeds the prefill logits to every (identical) beam; the -1e9 start scores pick beam 0.
    logits = jnp.broadcast_to(first_logits[:, None, :], (batch, num_beams, vocab))
    beams = _init_beams(batch, num_beams, max_new_tokens, pad_id)
    beams, parents = _select(beams, logits, jnp.int32(0), penalties, eos_id)
    state = jax.tree.map(lambda leaf: jnp.repeat(leaf, num_beams, axis=0), state)

    def keep_going(carry: tuple) -> Array:
        beams, _, _, step = carry
        return (step < max_new_tokens) & jnp.any(beams.improvable)

    def advance(carry: tuple) -> tuple:
        beams, state, parents, step = carry
        rows = (parents + row_offsets).reshape(-1)
        state = jax.tree.map(lambda leaf: jnp.take(leaf, rows, axis=0), state)
        tokens = beams.running_tokens[:, :, step - 1].reshape(-1)
        logits, state = decode_step(state, tokens, step - 1)
        beams, parents = _select(beams, logits.reshape(batch, num_beams, -1), step, penalties, eos_id)
        return beams, state, parents, step + 1

    beams, *_ = jax.lax.while_loop(keep_going, advance, (beams, state, parents, jnp.int32(1)))
    return beams.finished_tokens[:, 0]


class Decoding(NamedTuple):
    """Where generation starts: first-token logits `[B, V]`, the state (leading axis B) and its step."""

    first_logits: Array
    state: PyTree
    step: DecodeStep


def greedy_search(
    decode_step: DecodeStep, first_logits: Array, state: PyTree, max_new_tokens: int, eos_id: int, pad_id: int
) -> Array:
    """Argmax decoding `[B, max_new_tokens]` over a cached step (as `beam_search`'s); `pad_id` after each row's EOS."""
    first = jnp.argmax(first_logits, axis=-1).astype(jnp.int32)

    def body(carry: tuple, step: Array) -> tuple[tuple, Array]:
        token, state, done = carry
        logits, state = decode_step(state, token, step)
        done = done | (token == eos_id)
        nxt = jnp.where(done, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        return (nxt, state, done), nxt

    carry = (first, state, jnp.zeros(first.shape, bool))
    _, rest = jax.lax.scan(body, carry, jnp.arange(max_new_tokens - 1, dtype=jnp.int32))
    return jnp.concatenate([first[:, None], rest.T], axis=1)
