"""`load_hf_model` on damaged or unusual LLaVA checkpoints: clear errors naming the file, and sharded loads."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from sparsevlm.cli import main
from sparsevlm.hf.load import load_hf_model
from sparsevlm.hf.safetensors_io import INDEX_NAME, SINGLE_NAME
from sparsevlm.tree import flatten


@pytest.fixture()
def llava_copy(llava_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny LLaVA checkpoint, free to damage."""
    return Path(shutil.copytree(llava_dir, tmp_path / "llava"))


@pytest.fixture(scope="module")
def sharded_llava(llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same LLaVA re-saved by transformers in several shards, with the processor files copied over."""
    from transformers import LlavaForConditionalGeneration

    directory = tmp_path_factory.mktemp("sharded_llava")
    LlavaForConditionalGeneration.from_pretrained(llava_dir).save_pretrained(directory, max_shard_size="60KB")
    for path in llava_dir.iterdir():
        if not (directory / path.name).exists() and path.name != SINGLE_NAME:
            shutil.copy(path, directory / path.name)
    return directory


def _edit_config(directory: Path, edit: Any) -> Path:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return path


def _escaped(path: Path) -> str:
    return re.escape(str(path))


def test_unknown_model_type_names_the_value_and_the_file(llava_copy):
    path = _edit_config(llava_copy, lambda c: c.update(model_type="llava_next_video_x"))
    with pytest.raises(ValueError, match=rf"{_escaped(path)}: model_type='llava_next_video_x' is not supported; "
                                         r"allowed: llava, blip-2, instructblip"):
        load_hf_model(llava_copy)


def test_unsupported_language_model_names_the_file(llava_copy):
    path = _edit_config(llava_copy, lambda c: c["text_config"].update(model_type="mistral"))
    with pytest.raises(ValueError, match=rf"{_escaped(path)}: text_config.model_type='mistral' is not supported"):
        load_hf_model(llava_copy)


def test_config_that_is_not_json(llava_copy):
    (llava_copy / "config.json").write_text("{model_type: llava")
    with pytest.raises(ValueError, match=rf"{_escaped(llava_copy / 'config.json')} is not valid JSON"):
        load_hf_model(llava_copy)


def test_missing_shard_names_the_shard_and_the_index(sharded_llava, tmp_path):
    directory = Path(shutil.copytree(sharded_llava, tmp_path / "llava"))
    shard = sorted(json.loads((directory / INDEX_NAME).read_text())["weight_map"].values())[0]
    (directory / shard).unlink()
    with pytest.raises(FileNotFoundError, match=rf"shard {shard} listed in {_escaped(directory / INDEX_NAME)}"):
        load_hf_model(directory)


def test_shape_that_disagrees_with_the_config_names_the_tensor_and_the_file(llava_copy):
    _edit_config(llava_copy, lambda c: c["text_config"].update(intermediate_size=72))
    name = "language_model.model.layers.0.mlp.gate_proj.weight"
    with pytest.raises(ValueError, match=rf"tensor {re.escape(name)} in {_escaped(llava_copy / SINGLE_NAME)} has "
                                         r"shape \(64, 32\) but the config implies \(32, 72\)"):
        load_hf_model(llava_copy)


def test_tensor_the_config_does_not_describe(llava_copy):
    path = llava_copy / SINGLE_NAME
    tensors = load_file(path)
    extra = "language_model.model.layers.2.mlp.up_proj.weight"  # a third layer the config does not have
    tensors[extra] = np.zeros((64, 32), np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{_escaped(path)} holds tensor '{re.escape(extra)}' that this "
                                         r"config.json does not describe \(1 such tensors\)"):
        load_hf_model(llava_copy)


def test_tensor_the_config_implies_but_the_file_lacks(llava_copy):
    path = llava_copy / SINGLE_NAME
    tensors = load_file(path)
    missing = "multi_modal_projector.linear_2.bias"
    del tensors[missing]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(missing)}' that config.json implies is missing "
                                         rf"from the checkpoint at {_escaped(llava_copy)}"):
        load_hf_model(llava_copy)


def test_pickle_only_checkpoint_is_refused(llava_copy):
    path = llava_copy / SINGLE_NAME
    torch.save({k: torch.from_numpy(v) for k, v in load_file(path).items()}, llava_copy / "pytorch_model.bin")
    path.unlink()
    with pytest.raises(ValueError, match=r"holds only PyTorch .bin/.pt weights \(pytorch_model.bin\); they are "
                                         r"refused because loading them can run arbitrary code"):
        load_hf_model(llava_copy)


def test_sharded_checkpoint_gives_the_single_file_params(llava_dir, sharded_llava):
    assert len(set(json.loads((sharded_llava / INDEX_NAME).read_text())["weight_map"].values())) >= 3
    assert not (sharded_llava / SINGLE_NAME).exists()
    single = flatten(load_hf_model(llava_dir).params)
    sharded = flatten(load_hf_model(sharded_llava).params)
    assert single.keys() == sharded.keys()
    for path, value in single.items():
        assert sharded[path].dtype == value.dtype, path
        np.testing.assert_array_equal(sharded[path], value, err_msg=path)


def test_float16_is_refused_with_the_allowed_values(llava_dir):
    with pytest.raises(ValueError, match=r"dtype='float16' is not supported; allowed: float32, bfloat16"):
        load_hf_model(llava_dir, dtype="float16")


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: _edit_config(d, lambda c: c.update(model_type="mllama")), "model_type='mllama' is not supported"),
        (lambda d: (d / SINGLE_NAME).unlink(), "has no model.safetensors or model.safetensors.index.json"),
        (lambda d: (d / SINGLE_NAME).write_bytes((d / SINGLE_NAME).read_bytes()[:-100]), "is truncated: tensor"),
    ],
    ids=["unknown-model-type", "no-weights", "truncated-weights"],
)
def test_cli_reports_a_bad_checkpoint_in_one_line(llava_copy, damage, message, capsys):
    damage(llava_copy)
    assert main(["evaluate", "--model", str(llava_copy), "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsevlm evaluate: error: ") and message in err[0], err


def test_config_transformers_rejects_is_one_clear_error(llava_copy):
    path = _edit_config(llava_copy, lambda c: c["text_config"].update(num_attention_heads=5))
    with pytest.raises(ValueError, match=rf"{_escaped(path)}: transformers rejects this config: .*not a multiple"):
        load_hf_model(llava_copy)
    _edit_config(llava_copy, lambda c: c["text_config"].update(model_type="no_such_model", num_attention_heads=4))
    with pytest.raises(ValueError, match="Unrecognized model type for subconfig: no_such_model") as info:
        load_hf_model(llava_copy)
    assert len(str(info.value)) < 500  # transformers lists every model type it knows; the message is cut short


def test_checkpoint_without_processor_files(llava_copy):
    for path in llava_copy.iterdir():
        if path.name not in ("config.json", SINGLE_NAME):
            path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{_escaped(llava_copy)} lacks usable processor files"):
        load_hf_model(llava_copy)
