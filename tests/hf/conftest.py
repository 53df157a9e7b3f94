"""Tiny HF checkpoints built once per test session."""

from __future__ import annotations

import pytest

from tests.hf import tiny


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    """A saved tiny LLaVA (CLIP + Llama) with its processor."""
    return tiny.save_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory, llava_dir):
    """Every tiny family checkpoint, by family name (built on first use)."""
    builders = {
        "blip2-opt": lambda d: tiny.save_blip2(d, "opt"),
        "blip2-flant5": lambda d: tiny.save_blip2(d, "flant5"),
        "instructblip-llama": lambda d: tiny.save_instructblip(d, "llama"),
        "instructblip-flant5": lambda d: tiny.save_instructblip(d, "flant5"),
    }
    cache = {"llava-llama": llava_dir}

    def get(family: str):
        if family not in cache:
            cache[family] = builders[family](tmp_path_factory.mktemp(family))
        return cache[family]

    return get
