"""Tiny HF checkpoints, built once per test run for every worker, and the per-family fixture."""

from __future__ import annotations

import pytest
import transformers

from sparsevlm.hf.load import load_hf_model
from tests import shared
from tests.hf import tiny


BUILDERS = {
    "llava-llama": tiny.save_llava,
    "blip2-opt": lambda d: tiny.save_blip2(d, "opt"),
    "blip2-flant5": lambda d: tiny.save_blip2(d, "flant5"),
    "instructblip-llama": lambda d: tiny.save_instructblip(d, "llama"),
    "instructblip-flant5": lambda d: tiny.save_instructblip(d, "flant5"),
}


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """Every tiny family checkpoint, by family name: built on first use, once per run for all workers."""
    root = shared.run_root(tmp_path_factory)
    return lambda family: shared.build_once(root, f"hf-{family}", BUILDERS[family])


@pytest.fixture(scope="session")
def llava_dir(hf_dirs):
    """A saved tiny LLaVA (CLIP + Llama) with its processor."""
    return hf_dirs("llava-llama")


@pytest.fixture(scope="session", params=sorted(tiny.FAMILIES))
def family(request, hf_dirs):
    """Per family: its name, our bundle loaded from the tiny checkpoint, and the transformers model."""
    name = request.param
    directory = hf_dirs(name)
    model = getattr(transformers, tiny.FAMILIES[name][0]).from_pretrained(directory).eval()
    return name, load_hf_model(directory), model
