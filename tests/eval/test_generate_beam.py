"""Beam-search plumbing: `generate`'s arguments, `evaluate_vqa` and the `evaluate` command's flags.

Token-for-token parity with HF `generate` per family is in tests/hf/test_beam_generation.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparsevlm.cli import main
from sparsevlm.data import shapes
from sparsevlm.eval import evaluate
from sparsevlm.eval.generate import compiled_generate, generate
from sparsevlm.models.vlm import VLM


def test_generate_rejects_bad_decoding_arguments(tiny_bundle):
    model, images = VLM(tiny_bundle.config), np.zeros((1, 48, 48, 3), np.float32)
    tokens, mask = np.ones((1, 4), np.int32), np.ones((1, 4), bool)
    with pytest.raises(ValueError, match="num_beams=0 must be a positive int"):
        generate(model, tiny_bundle.params, images, tokens, mask, 4, eos_id=1, pad_id=0, num_beams=0)
    with pytest.raises(ValueError, match="max_new_tokens=0 must be a positive int"):
        generate(model, tiny_bundle.params, images, tokens, mask, 0, eos_id=1, pad_id=0, num_beams=2)


def test_compiled_generate_is_cached_per_decoding_setup(tiny_bundle):
    model = VLM(tiny_bundle.config)
    beams = compiled_generate(model, 4, 1, 0, num_beams=3)
    assert compiled_generate(model, 4, 1, 0, num_beams=3) is beams
    assert compiled_generate(model, 4, 1, 0, num_beams=3, length_penalty=2.0) is not beams
    assert compiled_generate(model, 4, 1, 0) is not beams


def test_evaluate_vqa_searches_with_the_requested_beams(tiny_bundle, monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return compiled_generate(*args, **kwargs)

    monkeypatch.setattr(evaluate, "compiled_generate", spy)
    dataset = shapes.build_split("validation", 1)
    result = evaluate.evaluate_vqa(tiny_bundle, dataset, batch_size=4, max_new_tokens=3, num_beams=2,
                                   length_penalty=0.5, progress=False)
    assert [call[1:] for call in calls] == [(3, tiny_bundle.tokenizer.eos_token_id,
                                             tiny_bundle.tokenizer.pad_token_id, 2, 0.5)]
    assert (result["num_beams"], result["length_penalty"]) == (2, 0.5)
    assert result["n"] == len(dataset) == len(result["predictions"])


def test_evaluate_command_passes_decoding_flags(monkeypatch, tiny_bundle):
    seen = {}

    def fake_evaluate_task(bundle, task, dataset, **kwargs):
        seen.update(kwargs, task=task)
        return {"accuracy": 0.0, "n": 0, "split": "validation", "by_type": {}}

    monkeypatch.setattr(evaluate, "evaluate_task", fake_evaluate_task)
    monkeypatch.setattr("sparsevlm.hub.load_model", lambda name: tiny_bundle)
    assert main(["evaluate", "--model", "tiny", "--split", "validation", "--limit", "1",
                 "--num-beams", "5", "--max-new-tokens", "10"]) == 0
    assert (seen["task"], seen["num_beams"], seen["max_new_tokens"]) == ("shapes", 5, 10)
    main(["evaluate", "--model", "tiny", "--split", "validation", "--limit", "1"])
    assert (seen["num_beams"], seen["max_new_tokens"]) == (1, None)  # None: the task's default length


@pytest.mark.parametrize("flag,value", [("--num-beams", "0"), ("--max-new-tokens", "0"), ("--num-beams", "five")])
def test_evaluate_command_refuses_bad_decoding_flags(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", "default", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and repr(value) in err
