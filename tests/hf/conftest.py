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
    builders = {"blip2-opt": tiny.save_blip2, "instructblip-llama": tiny.save_instructblip,
                "blip2-flant5": tiny.save_blip2_t5, "instructblip-flant5": tiny.save_instructblip_t5}
    cache = {"llava-llama": llava_dir}

    def get(family: str):
        if family not in cache:
            cache[family] = builders[family](tmp_path_factory.mktemp(family))
        return cache[family]

    return get
