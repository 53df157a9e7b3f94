"""`sparsevlm plan`: a restoration step's per-device memory and compile time from a config.json alone."""

from __future__ import annotations

import json
import math
import shutil

import jax
import pytest

from sparsevlm.cli import main
from sparsevlm.config import RestoreConfig
from sparsevlm.hf.load import expected_shapes
from sparsevlm.masks import is_prunable
from sparsevlm.plan import PRESETS, plan_config, plan_restoration


@pytest.fixture(scope="module")
def config_only(llava_dir, tmp_path_factory):
    """A directory holding only the tiny LLaVA's config.json: no weights, no processor."""
    directory = tmp_path_factory.mktemp("config-only")
    shutil.copy(llava_dir / "config.json", directory / "config.json")
    return directory


def _plan(directory, tmp_path, *flags):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(directory), "--method", "sparselora", "--batch-size", "8", "--seq-len", "24",
                 "--json", str(out), *flags]) == 0
    return json.loads(out.read_text())


def test_plan_from_a_config_alone_counts_every_part(config_only, tmp_path, capsys):
    report = _plan(config_only, tmp_path, "--scan-layers", "--remat", "block")
    assert "per device" in capsys.readouterr().out
    shapes = expected_shapes(plan_config(str(config_only)))
    parts = report["per_device_bytes"]
    assert parts["params"] == 2 * sum(math.prod(s) for s in shapes.values())  # bf16
    # Packed masks: 1 bit per weight, each output row group rounded up to a byte.
    assert parts["masks"] == sum(math.prod(s[:-1]) * -(-s[-1] // 8) for p, s in shapes.items() if is_prunable(p, jax.ShapeDtypeStruct(s, 'float32')))
    assert parts["total"] == parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"]
    assert parts["arguments"] >= parts["params"] + parts["masks"] + parts["lora"] + parts["optimizer"]
    assert report["compile_seconds"] > 0 and report["restore"]["scan_layers"] is True


def test_fsdp_splits_the_plan_over_eight_devices(config_only, tmp_path):
    assert len(jax.devices()) == 8, "the test process should have 8 simulated devices (tests/conftest.py)"
    one = _plan(config_only, tmp_path, "--scan-layers")["per_device_bytes"]
    eight = _plan(config_only, tmp_path, "--scan-layers", "--mesh", "fsdp=8")["per_device_bytes"]
    replicated = {"params": 0.0, "masks": 0.0}  # a few small params (relative bias, patch kernel) are not split
    for name in replicated:
        assert eight[name] <= one[name] / 8 * 1.15, name
    assert eight["total"] < one["total"] / 2


def test_presets_are_the_papers_7b_models():
    llava = plan_config("llava-1.5-7b")
    assert (llava.language.depth, llava.language.width, llava.language.mlp_dim, llava.language.num_heads,
            llava.language.vocab_size) == (32, 4096, 11008, 32, 32064)
    assert (llava.vision.image_size, llava.vision.patch_size, llava.vision.width, llava.num_image_tokens) == \
        (336, 14, 1024, 576)
    blip = plan_config("instructblip-vicuna-7b")
    assert blip.connector.kind == "qformer" and blip.connector.reads_text and blip.vision.depth == 39
    assert blip.language.depth == 32 and blip.language.vocab_size == 32001
    assert set(PRESETS) == {"llava-1.5-7b", "instructblip-vicuna-7b"}


def test_a_7b_preset_plans_without_allocating():
    report = plan_restoration(plan_config("llava-1.5-7b"), RestoreConfig(method="sparselora", bf16=True,
                                                                         scan_layers=True, remat="block"), 1, 600)
    assert 7.0e9 < report["model"]["params"] < 7.2e9
    assert report["per_device_bytes"]["params"] == 2 * report["model"]["params"]


@pytest.mark.parametrize("flags, message", [
    (["--model", "llava-13b"], "'llava-13b' is neither a preset (llava-1.5-7b, instructblip-vicuna-7b)"),
    (["--model", "llava-1.5-7b", "--mesh", "fsdp=3"], "fsdp=3"),
    (["--model", "llava-1.5-7b", "--seq-len", "100"], "--seq-len 100 leaves"),
])
def test_bad_plan_input_is_one_line(flags, message, capsys):
    assert main(["plan", "--method", "sparselora", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
