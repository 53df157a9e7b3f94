"""VLM beam search (5 beams, 10 new tokens, as the paper evaluates VQA) token for token against HF `generate`."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest
import torch

from sparsevlm.eval.generate import compiled_generate
from sparsevlm.models.vlm import VLM
from tests.hf.test_families import _arrays, _inputs, _is_t5
from tests.hf.tiny import FAMILIES

BEAMS, MAX_NEW = 5, 10


@pytest.fixture(scope="module", autouse=True)
def single_threaded_torch() -> Iterator[None]:
    """Torch's CPU threads contend with XLA's and make each tiny `generate` call seconds slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _through_eos(tokens: np.ndarray, eos_id: int) -> list[int]:
    """Tokens up to and including the first EOS (HF fills finished beams with EOS when the pad id is 0)."""
    tokens = [int(t) for t in tokens]
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def _hf(bundle, model, inputs, num_beams: int, eos_id: int) -> list[list[int]]:
    """HF `generate`'s new tokens per row, through the first EOS."""
    with torch.no_grad():
        out = model.generate(**inputs, num_beams=num_beams, do_sample=False, max_new_tokens=MAX_NEW,
                             eos_token_id=eos_id, pad_token_id=bundle.tokenizer.pad_token_id)
    # Decoder-only models return the prompt too; T5 returns the decoder's start token first.
    new = out[:, 1:] if _is_t5(bundle) else out[:, inputs["input_ids"].shape[1]:]
    return [_through_eos(row, eos_id) for row in new.numpy()]


def _ours(bundle, inputs, num_beams: int, eos_id: int) -> np.ndarray:
    """Our new tokens `[B, MAX_NEW]` through `compiled_generate`, as evaluation runs it."""
    pad_id = bundle.tokenizer.pad_token_id
    generate = compiled_generate(VLM(bundle.config), MAX_NEW, eos_id, pad_id, num_beams=num_beams)
    images, tokens, mask, instruction = _arrays(inputs)
    out = np.asarray(generate(bundle.params, images, tokens, mask, instruction=instruction))
    assert out.shape == (len(tokens), MAX_NEW)
    for row in out:  # past the EOS, padding
        assert (row[len(_through_eos(row, eos_id)):] == pad_id).all()
    return out


@pytest.fixture(scope="module")
def case(family):
    """Both prompts as one left-padded batch, and an EOS id the search meets mid-answer.

    The tiny random models rarely emit their tokenizer's EOS in 10 tokens, so the EOS is a token that
    HF's 5-beam answer (with the real EOS) holds at index 4: hypotheses then end early, and greedy and
    beam answers differ on every family.
    """
    name, bundle, model = family
    inputs = _inputs(bundle.processor, FAMILIES[name][1])
    eos_id = _hf(bundle, model, inputs, BEAMS, bundle.tokenizer.eos_token_id)[0][4]
    return bundle, model, inputs, eos_id


def test_beam_search_matches_transformers(case):
    bundle, model, inputs, eos_id = case
    want = _hf(bundle, model, inputs, BEAMS, eos_id)
    assert [_through_eos(row, eos_id) for row in _ours(bundle, inputs, BEAMS, eos_id)] == want
    assert want != _hf(bundle, model, inputs, 1, eos_id), "the case should tell beam search from greedy"


def test_one_beam_is_greedy(case):
    # Greedy decoding is `generate(num_beams=1)`; this runs it compiled, as evaluation does, with early EOS.
    bundle, model, inputs, eos_id = case
    want = _hf(bundle, model, inputs, 1, eos_id)
    assert [_through_eos(row, eos_id) for row in _ours(bundle, inputs, 1, eos_id)] == want
