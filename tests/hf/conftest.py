"""Tiny HF checkpoints built once per test session."""

from __future__ import annotations

import pytest

from tests.hf import tiny


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    """A saved tiny LLaVA (CLIP + Llama) with its processor."""
    return tiny.save_llava(tmp_path_factory.mktemp("llava"))
