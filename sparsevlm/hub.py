"""Resolve a model name or path: `default` (trained on first use) or a saved model directory."""

from __future__ import annotations

import os
from pathlib import Path

from sparsevlm.checkpoint import ModelBundle, is_model_dir, load_model_dir
from sparsevlm.config import PretrainConfig

DEFAULT_MODEL = "default"
BUILTIN_MODELS = (DEFAULT_MODEL,)


def sparsevlm_home() -> Path:
    """`$SPARSEVLM_HOME`, default `~/.cache/sparsevlm`."""
    return Path(os.environ.get("SPARSEVLM_HOME", Path.home() / ".cache" / "sparsevlm")).expanduser()


def default_model_dir() -> Path:
    """Where the default model lives."""
    return sparsevlm_home() / DEFAULT_MODEL


def ensure_default_model(progress: bool = True) -> Path:
    """Train and save the default model if it is missing; return its directory."""
    path = default_model_dir()
    if not is_model_dir(path):
        from sparsevlm.pretrain import pretrain  # heavy import only when training is needed

        print(f"default model not found at {path}; training it now (one-time, ~10 minutes on 2 CPU cores)")
        pretrain(PretrainConfig(), path, progress=progress)
    return path


def resolve_model_path(name_or_path: str, progress: bool = True) -> Path:
    """Directory of a model given as a built-in name or a path; a clear error for anything else."""
    if name_or_path == DEFAULT_MODEL:
        return ensure_default_model(progress)
    path = Path(name_or_path).expanduser()
    looks_like_path = os.sep in name_or_path or name_or_path.startswith(".") or path.exists()
    if not looks_like_path:
        raise ValueError(
            f"unknown model {name_or_path!r}: expected one of {', '.join(BUILTIN_MODELS)} "
            "or the path of a saved model directory"
        )
    if not path.exists():
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
    if not is_model_dir(path):
        raise FileNotFoundError(f"model path {name_or_path!r} holds no saved sparsevlm model")
    return path


def load_model(name_or_path: str, progress: bool = True) -> ModelBundle:
    """Load a model by built-in name or path (the default model is trained on first use)."""
    return load_model_dir(resolve_model_path(name_or_path, progress))
