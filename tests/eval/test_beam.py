"""Beam search: token for token against HF `generate` on a tiny Llama, and against brute-force enumeration."""

from __future__ import annotations

import functools
import itertools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import torch
import transformers

from sparsevlm.eval.beam import beam_search
from sparsevlm.hf.llama import language_config, language_rules
from sparsevlm.hf.rules import to_ours
from sparsevlm.models.decoder import Decoder, init_cache
from sparsevlm.models.layers import causal_mask
from sparsevlm.tree import flatten, unflatten

VOCAB, MAX_NEW, BEAMS = 64, 10, 5
# Not 0: HF fills finished rows with `pad_token_id or eos_token_id`, so a pad id of 0 would come back as EOS.
PAD = VOCAB - 1
# Left-padded to a common length, for us and for HF alike (HF's positions skip the padding too).
PROMPTS = [[5, 9, 13, 7], [40, 22, 17, 8, 31, 11], [60, 4, 25], [12, 12, 50, 33, 27]]


@pytest.fixture(scope="module", autouse=True)
def single_threaded_torch() -> Iterator[None]:
    """Torch's CPU threads contend with XLA's and make each tiny `generate` call seconds slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[transformers.LlamaForCausalLM, Decoder, dict]:
    """A tiny random HF Llama and the same weights as our `Decoder` params, converted from its safetensors."""
    torch.manual_seed(0)
    # A wide init makes next-token distributions peaked, so no two beams tie within float32 noise.
    hf_config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, pad_token_id=PAD,
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path)

    config = language_config(hf.config)
    decoder = Decoder(config)
    tokens = jnp.zeros((1, 2), jnp.int32)

    def init(module: Decoder, tokens: jax.Array) -> tuple:
        # Through `embed_tokens` too, so the embedding table is part of the expected tree.
        mask = causal_mask(jnp.ones((1, 2), bool), jnp.arange(2))
        return module(module.embed_tokens(tokens), jnp.arange(2)[None], mask)

    shapes = jax.eval_shape(functools.partial(decoder.init, method=init), jax.random.key(0), tokens)["params"]
    expected = {f"language/{name}": leaf.shape for name, leaf in flatten(shapes).items()}
    assert "language/embed/embedding" in expected
    with safetensors.safe_open(path / "model.safetensors", "np") as f:
        flat = dict(to_ours(language_rules(config, prefix=""), f.get_tensor, expected, np.float32))
    assert flat.keys() == expected.keys()
    params = unflatten({name.removeprefix("language/"): value for name, value in flat.items()})
    return hf, decoder, params


def _left_pad(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts → left-padded tokens `[B, T]` and their valid mask."""
    length = max(map(len, prompts))
    tokens = np.full((len(prompts), length), PAD, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt) :] = prompt
        valid[row, length - len(prompt) :] = True
    return tokens, valid


@functools.partial(jax.jit, static_argnames="decoder")
def _prefill(decoder: Decoder, params: dict, tokens: jax.Array, valid: jax.Array) -> tuple[jax.Array, dict]:
    """Run the prompt into a cache with room for `MAX_NEW` tokens: first logits `[B, V]` and the decoding state."""
    batch, length = tokens.shape
    slots = jnp.pad(valid, ((0, 0), (0, MAX_NEW)))
    # Rotary positions count real tokens only, as HF's do for a prompt without padding.
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    embeds = decoder.apply({"params": params}, tokens, method=Decoder.embed_tokens)
    cache = init_cache(decoder.config, batch, length + MAX_NEW)
    logits, cache = decoder.apply(
        {"params": params}, embeds, positions, causal_mask(slots, jnp.arange(length)), cache, 0
    )
    return logits[:, -1], {"cache": cache, "valid": slots, "position": positions[:, -1]}


def _decode_step(
    decoder: Decoder, params: dict, prompt_length: int, state: dict, tokens: jax.Array, step: jax.Array
) -> tuple[jax.Array, dict]:
    """One cached step: `tokens` `[N]` (new token number `step`) written at cache slot `prompt_length + step`."""
    index = prompt_length + step
    valid = state["valid"].at[:, index].set(True)
    position = state["position"] + 1
    embeds = decoder.apply({"params": params}, tokens[:, None], method=Decoder.embed_tokens)
    mask = causal_mask(valid, jnp.reshape(index, (1,)))
    logits, cache = decoder.apply({"params": params}, embeds, position[:, None], mask, state["cache"], index)
    return logits[:, 0], {"cache": cache, "valid": valid, "position": position}


@functools.partial(jax.jit, static_argnames=("decoder", "num_beams", "eos_id", "length_penalty"))
def _ours(
    decoder: Decoder,
    params: dict,
    tokens: jax.Array,
    valid: jax.Array,
    num_beams: int,
    eos_id: int,
    length_penalty: float,
) -> jax.Array:
    """Prefill + beam search with our decoder, one compiled program."""
    first_logits, state = _prefill(decoder, params, tokens, valid)
    step = functools.partial(_decode_step, decoder, params, tokens.shape[1])
    return beam_search(step, first_logits, state, num_beams, MAX_NEW, eos_id, PAD, length_penalty)


def _hf(hf: transformers.LlamaForCausalLM, num_beams: int, eos_id: int, length_penalty: float) -> np.ndarray:
    """HF `generate`'s new tokens for `PROMPTS` `[B, MAX_NEW]`, right-padded with `PAD`."""
    tokens, valid = _left_pad(PROMPTS)
    with torch.no_grad():
        out = hf.generate(
            torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(valid).long(), num_beams=num_beams,
            do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos_id, pad_token_id=PAD,
            length_penalty=length_penalty,
        )
    new = out[:, tokens.shape[1] :].numpy()
    return np.pad(new, ((0, 0), (0, MAX_NEW - new.shape[1])), constant_values=PAD)


def _liked_eos(hf: transformers.LlamaForCausalLM, num_beams: int) -> int:
    """A token the search picks a few steps into the first prompt, so that making it EOS finishes beams early."""
    return int(_hf(hf, num_beams, eos_id=PAD, length_penalty=1.0)[0, 3])


def test_prefill_logits_match_hf(llama):
    hf, decoder, params = llama
    tokens, valid = _left_pad(PROMPTS)
    ours, _ = _prefill(decoder, params, jnp.asarray(tokens), jnp.asarray(valid))
    for row, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            reference = hf(torch.tensor([prompt])).logits[0, -1].numpy()
        np.testing.assert_allclose(ours[row], reference, atol=1e-4, rtol=1e-4)


def test_the_case_exercises_both_endings(llama):
    # With this EOS, HF's best hypothesis ends in EOS for some prompts and runs to the limit for others.
    hf, _, _ = llama
    eos = _liked_eos(hf, BEAMS)
    ended = (_hf(hf, BEAMS, eos, 1.0) == eos).any(axis=1)
    assert ended.any() and not ended.all()


@pytest.mark.parametrize("length_penalty", [1.0, 2.0])
def test_beam_search_matches_hf_generate(llama, length_penalty):
    hf, decoder, params = llama
    eos = _liked_eos(hf, BEAMS)
    tokens, valid = _left_pad(PROMPTS)
    ours = np.asarray(_ours(decoder, params, jnp.asarray(tokens), jnp.asarray(valid), BEAMS, eos, length_penalty))
    reference = _hf(hf, BEAMS, eos, length_penalty)
    np.testing.assert_array_equal(ours, reference)


def test_one_beam_is_greedy(llama):
    hf, decoder, params = llama
    eos = _liked_eos(hf, 1)
    tokens, valid = _left_pad(PROMPTS)
    ours = np.asarray(_ours(decoder, params, jnp.asarray(tokens), jnp.asarray(valid), 1, eos, 1.0))
    reference = _hf(hf, 1, eos, 1.0)
    np.testing.assert_array_equal(ours, reference)
    assert (reference == eos).any()


# --- A fake decoder over fixed transition tables: HF run on the same tables, brute force, a hand-worked case. ---

TABLE_EOS, TABLE_PAD = 1, 2  # a pad id of 0 would come back from HF as EOS, as above


def _table_problem(
    seed: int, batch: int, vocab: int, steps: int, eos_bias: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """First-token logits `[B, V]` and next-token logits by (step, previous token, token) `[M - 1, V, V, V]`."""
    rng = np.random.default_rng(seed)
    first = rng.normal(scale=2.0, size=(batch, vocab)).astype(np.float32)
    table = rng.normal(scale=2.0, size=(steps - 1, vocab, vocab, vocab)).astype(np.float32)
    first[:, TABLE_EOS] += eos_bias
    table[..., TABLE_EOS] += eos_bias
    return first, table


def _table_step(table: jax.Array, state: dict, tokens: jax.Array, step: jax.Array) -> tuple[jax.Array, dict]:
    """Logits from the step, the previous token (carried in the state) and the current token."""
    # Depending on the previous token makes a wrong re-gather of the state by parent beam visible.
    return table[step, state["previous"], tokens], {"previous": tokens}


def _table_search(first: np.ndarray, table: np.ndarray, num_beams: int, length_penalty: float) -> np.ndarray:
    """Our beam search over the table."""
    search = jax.jit(
        functools.partial(
            beam_search, functools.partial(_table_step, jnp.asarray(table)), num_beams=num_beams,
            max_new_tokens=table.shape[0] + 1, eos_id=TABLE_EOS, pad_id=TABLE_PAD, length_penalty=length_penalty,
        )
    )
    return np.asarray(search(jnp.asarray(first), {"previous": jnp.full((first.shape[0],), TABLE_PAD, jnp.int32)}))


class _TableLogProbs(transformers.LogitsProcessor):
    """Replaces the model's next-token scores with the table's log-probs (the prompt is one token: the row)."""

    def __init__(self, first: np.ndarray, table: np.ndarray) -> None:
        self.first, self.table = torch.from_numpy(first), torch.from_numpy(table)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids.shape[1] - 1
        if generated == 0:
            logits = self.first[input_ids[:, 0]]
        else:
            previous = input_ids[:, -2] if generated > 1 else torch.full_like(input_ids[:, 0], TABLE_PAD)
            logits = self.table[generated - 1, previous, input_ids[:, -1]]
        return torch.log_softmax(logits, dim=-1)


def _table_hf(first: np.ndarray, table: np.ndarray, num_beams: int, length_penalty: float) -> np.ndarray:
    """HF `generate`'s beam search over the table, new tokens right-padded with `TABLE_PAD`."""
    batch, vocab = first.shape
    steps = table.shape[0] + 1
    # Only the logits processor matters; the model is a stand-in of the right vocabulary size.
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
            max_position_embeddings=16,
        )
    ).eval()
    ids = torch.arange(batch)[:, None]
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), num_beams=num_beams, do_sample=False, max_new_tokens=steps,
            eos_token_id=TABLE_EOS, pad_token_id=TABLE_PAD, length_penalty=length_penalty,
            logits_processor=transformers.LogitsProcessorList([_TableLogProbs(first, table)]),
        )
    new = out[:, 1:].numpy()
    return np.pad(new, ((0, 0), (0, steps - new.shape[1])), constant_values=TABLE_PAD)


@pytest.mark.parametrize(
    "num_beams,length_penalty,eos_bias",
    [
        (1, 1.0, 0.0),
        (2, 0.0, 0.0),  # here an EOS ranked below K would change a row's answer
        (2, 2.0, 2.0),  # here HF's early-stopping heuristic stops before the best hypothesis
        (4, 2.0, 0.0),
    ],
)
def test_table_beam_search_matches_hf_generate(num_beams, length_penalty, eos_bias):
    # A small vocabulary and peaked tables make EOS common, and EOS candidates ranked below K too.
    first, table = _table_problem(seed=num_beams, batch=8, vocab=8, steps=6, eos_bias=eos_bias)
    ours = _table_search(first, table, num_beams, length_penalty)
    reference = _table_hf(first, table, num_beams, length_penalty)
    np.testing.assert_array_equal(ours, reference)
    assert (reference == TABLE_EOS).any(), reference


def test_an_eos_ranked_below_the_beam_width_is_dropped():
    # Two beams. The first step ranks tokens 3, 0, EOS: HF keeps 2K = 4 candidates but lets only the
    # first K of them finish, so the one-token hypothesis [EOS] is never stored, although its score
    # log 0.32 beats every two-token one (the second step is flat, so those average lower).
    vocab = 4
    first = np.log(np.array([[0.33, 0.32, 0.01, 0.34]], np.float32))
    second = np.log(np.array([0.24, 0.25, 0.23, 0.28], np.float32))
    table = np.broadcast_to(second, (1, vocab, vocab, vocab)).copy()
    assert (np.log(0.34) + np.log(0.28)) / 2 < np.log(0.32)  # so storing the EOS would change the answer
    np.testing.assert_array_equal(_table_search(first, table, 2, 1.0), [[3, 3]])
    np.testing.assert_array_equal(_table_hf(first, table, 2, 1.0), [[3, 3]])


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def _brute_force(first: np.ndarray, table: np.ndarray, row: int, length_penalty: float) -> tuple[list[int], float]:
    """Best sequence by `sum log p / length ** length_penalty` over all that end in EOS or reach the limit.

    Returns the sequence (padded) and its margin over the runner-up.
    """
    vocab, steps = first.shape[1], table.shape[0] + 1
    scored = []
    for length in range(1, steps + 1):
        for seq in itertools.product(range(vocab), repeat=length):
            if TABLE_EOS in seq[:-1] or (length < steps and seq[-1] != TABLE_EOS):
                continue
            total, previous, logits = 0.0, TABLE_PAD, first[row]
            for step, token in enumerate(seq):
                total += _log_softmax(logits)[token]
                if step + 1 < length:
                    logits, previous = table[step, previous, token], token
            scored.append((total / length**length_penalty, list(seq) + [TABLE_PAD] * (steps - length)))
    scored.sort(key=lambda item: -item[0])
    return scored[0][1], scored[0][0] - scored[1][0]


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_exhaustive_beam_search_finds_the_brute_force_best(length_penalty):
    vocab, steps, batch = 4, 3, 6
    # Enough beams to keep every live prefix (and every last-step candidate among the first K): beam
    # search then ranks every complete sequence, so it must return the global best.
    num_beams = (vocab - 1) ** (steps - 1) * vocab
    first, table = _table_problem(seed=1, batch=batch, vocab=vocab, steps=steps)
    ours = _table_search(first, table, num_beams, length_penalty)
    ends = set()
    for row in range(batch):
        best, margin = _brute_force(first, table, row, length_penalty)
        assert margin > 1e-4, "the brute-force best is a near tie; pick another seed"
        assert ours[row].tolist() == best, (row, ours[row], best)
        ends.add(TABLE_EOS in best)
    assert ends == {True, False}, "the problem should include rows won by EOS and by running to the limit"


def test_rejects_bad_arguments():
    first = jnp.zeros((2, 5))
    step = lambda state, tokens, step: (jnp.zeros((tokens.shape[0], 5)), state)  # noqa: E731
    with pytest.raises(ValueError, match="num_beams=0"):
        beam_search(step, first, {}, num_beams=0, max_new_tokens=3, eos_id=1, pad_id=0)
    with pytest.raises(ValueError, match=r"state leaf \['cache'\] has shape \(3, 4\)"):
        beam_search(step, first, {"cache": jnp.zeros((3, 4))}, num_beams=2, max_new_tokens=3, eos_id=1, pad_id=0)
