"""Things a test run builds once and every pytest-xdist worker shares: a trained model, tiny HF checkpoints.

`build_once(root, name, build)` builds `root/name` the first time any process asks (the others wait on a
file lock); `root` is the run's shared temporary directory (`run_root`). The trained default-architecture
model can also be built ahead, in its own process, while the workers start on other tests:
`python -m tests.shared ROOT` (started by tests/conftest.py when the run is parallel).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import pytest

TRAINED = "trained-default-short"


def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's temporary directory shared by all workers (each worker's own is a child of it)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def build_once(root: Path, name: str, build: Callable[[Path], None]) -> Path:
    """`root/name`, built by whichever process asks first; the others wait and reuse it."""
    from filelock import FileLock

    out = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (root / f"{name}.done").exists():
            build(out)
            (root / f"{name}.done").write_text("")
    return out


def build_trained_model(out: Path) -> None:
    """The default architecture, briefly trained on real shapes data (its layers have real statistics)."""
    from sparsevlm.config import PretrainConfig
    from sparsevlm.pretrain import pretrain

    config = PretrainConfig(steps=100, batch_size=32, warmup_steps=20, train_images=600, vision_steps=40)
    pretrain(config, out, eval_images=20, progress=False)


if __name__ == "__main__":
    build_once(Path(sys.argv[1]), TRAINED, build_trained_model)
