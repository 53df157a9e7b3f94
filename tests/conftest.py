"""Shared fixtures: a tiny random-weight VLM and an isolated SPARSEVLM_HOME."""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Simulated devices for sharding tests must be requested before JAX initialises. XLA compiling is
# most of the suite's time and the tests check what is computed, not how fast: LLVM's backend
# optimisations are off (measured: a third less compile time, a fifth less suite time).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
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

from sparsevlm.bundle import ModelBundle  # noqa: E402
from sparsevlm.config import ConnectorConfig, LanguageConfig, VisionConfig, VLMConfig  # noqa: E402
from sparsevlm.data import shapes  # noqa: E402
from sparsevlm.data.tokenize import build_word_tokenizer  # noqa: E402
from sparsevlm.models.vlm import VLM  # noqa: E402
from tests import shared  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's model cache from tests."""
    monkeypatch.setenv("SPARSEVLM_HOME", str(tmp_path_factory.mktemp("home")))


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """A parallel run of the whole suite trains the shared model in a process of its own from the start,
    so no worker waits for it while it could run other tests."""
    whole_suite = all(Path(arg).resolve() == Path(__file__).parent for arg in config.args)
    parallel = getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER")
    if whole_suite and parallel:
        root = config._tmp_path_factory.getbasetemp()
        config._prebuild = subprocess.Popen([sys.executable, "-m", "tests.shared", str(root)],
                                            cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop the prebuild if the run ended before it did."""
    prebuild = getattr(config, "_prebuild", None)
    if prebuild is not None and prebuild.poll() is None:
        prebuild.kill()
        prebuild.wait()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with slow end-to-end tests first (setup.cfg runs `--dist loadfile`: each file on one worker),
    so the workers do not end on one long file, and those needing the trained model after the others.

    Compiling is most of the suite's time; a file's tests share shapes, module fixtures and JAX's
    in-process caches, so one worker compiling them once beats two compiling them twice.
    """
    def needs_trained_model(item: pytest.Item) -> bool:
        return bool({"trained_model_dir", "trained_bundle"} & set(getattr(item, "fixturenames", ())))

    files = {}
    for item in items:
        slow, trained = files.get(item.fspath, (False, False))
        files[item.fspath] = (slow or item.get_closest_marker("slow") is not None, trained or needs_trained_model(item))
    # Slow files first; among them, those that need the shared trained model after the others, which
    # keep the workers busy while `tests.shared` trains it in a process of its own.
    items.sort(key=lambda item: (not files[item.fspath][0], files[item.fspath][1], item.get_closest_marker("slow") is None))


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
def scenes_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-weight tiny VLM saved as pretrained on scenes VQA (its tokenizer: the scenes vocabulary)."""
    from sparsevlm.checkpoint import save_model
    from sparsevlm.data import scenes

    tokenizer = build_word_tokenizer(scenes.vocabulary())
    config = tiny_config(len(tokenizer))
    side = config.vision.image_size
    params = VLM(config).init(jax.random.key(0), np.zeros((1, side, side, 3), np.float32), np.ones((1, 4), np.int32),
                              np.ones((1, 4), bool))["params"]
    # The recorded test accuracy is not what this model scores: a study must measure its own.
    metadata = {"pretrain": {"task": "scenes"}, "test_accuracy": 0.5}
    path = tmp_path_factory.mktemp("scenes") / "model"
    save_model(path, ModelBundle(config, jax.tree.map(np.asarray, params), tokenizer, metadata))
    return str(path)


@pytest.fixture(scope="session")
def test_split():
    """A small shapes-VQA test split."""
    return shapes.build_split("test", 24)


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The default architecture, briefly trained on real shapes data (its layers have real statistics)."""
    return str(shared.build_once(shared.run_root(tmp_path_factory), shared.TRAINED, shared.build_trained_model))


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
        from sparsevlm import checkpoint

        original = checkpoint.TrainingCheckpoints.save
        saves = []

        def save(self, *args, **kwargs):
            original(self, *args, **kwargs)
            saves.append(args[0])
            if len(saves) == n:
                monkeypatch.setattr(checkpoint.TrainingCheckpoints, "save", original)
                raise Killed

        monkeypatch.setattr(checkpoint.TrainingCheckpoints, "save", save)

    return arm


@pytest.fixture()
def script():
    """Import a benchmark or experiment script in this process: `script(directory, name)` → its module.

    The scripts import their siblings by bare name (`common`, `llava`, ...), and benchmarks/ and
    experiments/ each have a `common`: the directory goes first on sys.path while the test runs, and
    the modules loaded from it are forgotten afterwards, so the next script gets its own siblings.
    """
    path, directories = list(sys.path), []

    def load(directory: Path, name: str):
        directory = Path(directory).resolve()
        directories.append(directory)
        for sibling in (p.stem for p in directory.glob("*.py")):
            sys.modules.pop(sibling, None)
        sys.path.insert(0, str(directory))
        return importlib.import_module(name)

    yield load
    sys.path[:] = path
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve().parent in directories:
            del sys.modules[name]
