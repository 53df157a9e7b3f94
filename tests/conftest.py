"""Shared fixtures: a tiny random-weight VLM and an isolated SPARSEVLM_HOME."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Simulated devices for sharding tests must be requested before JAX initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One persistent compilation cache for the whole run: the first process to import this (pytest, or
# pytest-xdist's controller) makes it, and the workers and the CLI subprocesses tests start inherit
# it, so a program compiled once (e.g. the restore step of the tiny model) is not compiled again.
# A size limit turns on JAX's file locking, which makes concurrent workers safe.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="sparsevlm-test-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache, JAX_COMPILATION_CACHE_MAX_SIZE=str(4 << 30),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.3")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sparsevlm.checkpoint import ModelBundle  # noqa: E402
from sparsevlm.config import ConnectorConfig, LanguageConfig, VisionConfig, VLMConfig  # noqa: E402
from sparsevlm.data import shapes  # noqa: E402
from sparsevlm.data.tokenize import build_word_tokenizer  # noqa: E402
from sparsevlm.models import VLM  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's model cache from tests."""
    monkeypatch.setenv("SPARSEVLM_HOME", str(tmp_path_factory.mktemp("home")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the slow end-to-end tests first, so parallel workers do not end on one long test."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def tiny_config(vocab_size: int, **language: object) -> VLMConfig:
    """A VLM small enough to run in milliseconds, with every feature of the default switched on."""
    return VLMConfig(
        vision=VisionConfig(image_size=48, patch_size=16, width=32, depth=2, num_heads=2, mlp_dim=64),
        connector=ConnectorConfig(hidden_dim=48),
        language=LanguageConfig(
            vocab_size=vocab_size, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64, **language
        ),
    )


@pytest.fixture(scope="session")
def tokenizer():
    """The built-in word-level tokenizer."""
    return build_word_tokenizer(shapes.vocabulary())


@pytest.fixture(scope="session")
def tiny_bundle(tokenizer) -> ModelBundle:
    """A random-weight tiny VLM bundle."""
    config = tiny_config(len(tokenizer))
    model = VLM(config)
    images = np.zeros((1, 48, 48, 3), np.float32)
    tokens = np.ones((1, 4), np.int32)
    params = model.init(jax.random.key(0), images, tokens, np.ones((1, 4), bool))["params"]
    return ModelBundle(config, jax.tree.map(np.asarray, params), tokenizer)


@pytest.fixture(scope="session")
def test_split():
    """A small shapes-VQA test split."""
    return shapes.build_split("test", 24)


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The default architecture, briefly trained on real shapes data (its layers have real statistics)."""
    from sparsevlm.config import PretrainConfig
    from sparsevlm.pretrain import pretrain

    from filelock import FileLock

    # Under pytest-xdist every worker asks for it: the first builds it in the run's shared temp
    # directory, the others wait on the lock and reuse it.
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    out = root / "trained" / "default-short"
    with FileLock(str(root / "trained.lock")):
        if not (root / "trained.done").exists():
            config = PretrainConfig(steps=150, batch_size=32, warmup_steps=20, train_images=800, vision_steps=80)
            pretrain(config, out, eval_images=40, progress=False)
            (root / "trained.done").write_text("")
    return str(out)


@pytest.fixture(scope="session")
def trained_bundle(trained_model_dir: str) -> ModelBundle:
    """The briefly trained default-architecture model, loaded."""
    from sparsevlm.checkpoint import load_model_dir

    return load_model_dir(trained_model_dir)


class Killed(BaseException):
    """Stands in for SIGKILL inside the process: nothing after the raise runs."""


@pytest.fixture()
def kill_after_checkpoint(monkeypatch):
    """Make the n-th completed checkpoint save the last thing a run does."""

    def arm(n: int) -> None:
        from sparsevlm import train

        original = train.TrainingCheckpoints.save
        saves = []

        def save(self, *args, **kwargs):
            original(self, *args, **kwargs)
            saves.append(args[0])
            if len(saves) == n:
                monkeypatch.setattr(train.TrainingCheckpoints, "save", original)
                raise Killed

        monkeypatch.setattr(train.TrainingCheckpoints, "save", save)

    return arm
