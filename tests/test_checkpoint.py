"""Model directories: save → load gives identical logits; export names round-trip; nothing is overwritten."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from sparsevlm.checkpoint import export_safetensors, import_safetensors, is_model_dir, load_model_dir, save_model
from sparsevlm.config import VLMConfig
from sparsevlm.models.vlm import VLM
from sparsevlm.tree import flatten


def _logits(bundle):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 48, 48, 3)).astype(np.float32)
    tokens = rng.integers(4, 30, size=(2, 5)).astype(np.int32)
    logits, _ = VLM(bundle.config).apply({"params": bundle.params}, images, tokens, np.ones((2, 5), bool))
    return np.asarray(logits)


def test_save_load_gives_identical_logits(tiny_bundle, tmp_path):
    bundle = dataclasses.replace(tiny_bundle, metadata={"note": "x", "accuracy": 0.5})
    save_model(tmp_path / "m", bundle)
    assert is_model_dir(tmp_path / "m")
    loaded = load_model_dir(tmp_path / "m")
    assert loaded.config == bundle.config
    assert loaded.metadata == {"note": "x", "accuracy": 0.5}
    assert loaded.tokenizer.get_vocab() == bundle.tokenizer.get_vocab()
    np.testing.assert_array_equal(_logits(loaded), _logits(bundle))


def test_save_refuses_to_overwrite_and_keeps_the_old_model(tiny_bundle, tmp_path):
    save_model(tmp_path / "m", tiny_bundle)
    other = dataclasses.replace(tiny_bundle, metadata={"version": 2})
    with pytest.raises(FileExistsError, match="already exists"):
        save_model(tmp_path / "m", other)
    assert load_model_dir(tmp_path / "m").metadata == {}
    save_model(tmp_path / "m", other, overwrite=True)
    assert load_model_dir(tmp_path / "m").metadata == {"version": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging or backup left behind


def test_load_missing_or_empty_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no saved model"):
        load_model_dir(tmp_path / "empty")
    assert not is_model_dir(tmp_path / "empty")


def test_export_names_round_trip(tiny_bundle, tmp_path):
    export_safetensors(tiny_bundle, tmp_path / "out")
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    flat = flatten(tiny_bundle.params)
    assert set(tensors) == set(flat)
    assert "language/blocks_0/attn/q/kernel" in tensors
    for name, value in flat.items():
        np.testing.assert_array_equal(tensors[name], value)
    assert VLMConfig.from_dict(json.loads((tmp_path / "out" / "config.json").read_text())) == tiny_bundle.config
    back = import_safetensors(tmp_path / "out")
    assert back.config == tiny_bundle.config
    np.testing.assert_array_equal(_logits(back), _logits(tiny_bundle))
