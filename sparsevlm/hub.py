"""Resolve a model name or path: `default` or `scenes` (trained on first use), a saved model directory, or an HF checkpoint.

HF checkpoints are a local directory with `config.json` + safetensors, or a hub name such as
`llava-hf/llava-1.5-7b-hf` (downloaded once with `huggingface_hub`, safetensors and configs only).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from sparsevlm.bundle import ModelBundle
from sparsevlm.checkpoint import is_model_dir, load_model_dir, read_metadata
from sparsevlm.config import RUN_ONLY_FIELDS, PretrainConfig, pretrain_preset
from sparsevlm.data.builtin import data_fingerprint

DEFAULT_MODEL = "default"
# Built-in model name → the built-in task it is pretrained on; each is cached in its own directory.
BUILTIN_MODEL_TASKS = {DEFAULT_MODEL: "shapes", "scenes": "scenes"}
BUILTIN_MODELS = tuple(BUILTIN_MODEL_TASKS)


def sparsevlm_home() -> Path:
    """`$SPARSEVLM_HOME`, default `~/.cache/sparsevlm`."""
    return Path(os.environ.get("SPARSEVLM_HOME", Path.home() / ".cache" / "sparsevlm")).expanduser()


def default_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Where built-in model `name` lives (`$SPARSEVLM_HOME/<name>`)."""
    if name not in BUILTIN_MODEL_TASKS:
        raise ValueError(f"{name!r} is not a built-in model; allowed: {', '.join(BUILTIN_MODELS)}")
    return sparsevlm_home() / name


def ensure_default_model(progress: bool = True, name: str = DEFAULT_MODEL) -> Path:
    """Train and save built-in model `name` (its task's preset recipe) if it is missing, or was trained with
    another recipe or on other data than its task generates today; return its directory."""
    path = default_model_dir(name)
    task = BUILTIN_MODEL_TASKS[name]
    recipe = pretrain_preset(task)
    if not is_model_dir(path):
        why = "not found"
    elif (saved := saved_recipe(path)) != recipe:
        why = f"trained with another recipe ({saved}; today's: {recipe})"
    elif (data := read_metadata(path).get("data")) != data_fingerprint(task):
        why = f"trained on other {task} data (fingerprint {data}; today's: {data_fingerprint(task)})"
    else:
        return path
    from sparsevlm.pretrain import pretrain  # heavy import only when training is needed

    print(f"built-in model {name!r} {why} at {path}; training it now (one-time, ~10-15 minutes on 2 CPU cores)")
    pretrain(recipe, path, progress=progress)
    return path


def saved_recipe(path: Path) -> PretrainConfig | None:
    """The recipe a saved built-in model was trained with, or None.

    Fields the model predates, and those that only watch or save a run (`RUN_ONLY_FIELDS`), read as
    their defaults.
    """
    stored = read_metadata(path).get("pretrain")
    if not isinstance(stored, dict):
        return None
    known = {f.name for f in dataclasses.fields(PretrainConfig)} - set(RUN_ONLY_FIELDS)
    try:
        return PretrainConfig(**{k: v for k, v in stored.items() if k in known})
    except (TypeError, ValueError):
        return None


def is_hf_dir(path: Path) -> bool:
    """True for a directory holding an HF checkpoint (`config.json`)."""
    return path.is_dir() and (path / "config.json").is_file()


def _looks_like_hub_name(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and not Path(name).exists()


def download_hf(name: str) -> Path:
    """A hub checkpoint's local snapshot: configs, processor files and safetensors only (never PyTorch .bin)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as err:  # the hub client raises many types; the user needs the name and the cause
        raise FileNotFoundError(f"could not fetch {name!r} from the Hugging Face hub: {err}") from None


def resolve_model_path(name_or_path: str, progress: bool = True) -> Path:
    """Directory of a model given as a built-in name, a path or a hub name; a clear error for anything else."""
    if name_or_path in BUILTIN_MODEL_TASKS:
        return ensure_default_model(progress, name_or_path)
    if _looks_like_hub_name(name_or_path):
        return download_hf(name_or_path)
    path = Path(name_or_path).expanduser()
    looks_like_path = os.sep in name_or_path or name_or_path.startswith(".") or path.exists()
    if not looks_like_path:
        raise ValueError(
            f"unknown model {name_or_path!r}: expected one of {', '.join(BUILTIN_MODELS)}, "
            "the path of a saved model or HF checkpoint directory, or a hub name like org/model"
        )
    if not path.exists():
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
    if not is_hf_dir(path) and not is_model_dir(path):
        raise FileNotFoundError(f"model path {name_or_path!r} holds neither a saved sparsevlm model nor config.json")
    return path


def load_model(name_or_path: str, progress: bool = True, dtype: str = "float32") -> ModelBundle:
    """Load a model by built-in name, path or hub name (the default model is trained on first use)."""
    path = resolve_model_path(name_or_path, progress)
    if not is_hf_dir(path):
        return load_model_dir(path)
    from sparsevlm.hf.load import load_hf_model

    return load_hf_model(path, dtype)
