"""Model directories: config + params + tokenizer saved with orbax, and safetensors export."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import save_file
from transformers import PreTrainedTokenizerBase

from sparsevlm.config import VLMConfig
from sparsevlm.data.tokenize import tokenizer_from_json, tokenizer_to_json
from sparsevlm.hf.safetensors_io import SINGLE_NAME, iter_file
from sparsevlm.integrity import (CorruptCheckpointError, listed_files, one_line_error, verify_checksums, write_atomic,
                                 write_checksums)
from sparsevlm.pruning.masks import flat_masks, masks_from_flat
from sparsevlm.tree import flatten, unflatten

PyTree = Any
_ITEMS = ("params", "config", "tokenizer", "metadata", "masks")


@dataclasses.dataclass(frozen=True)
class ModelBundle:
    """Everything needed to run a model: config, param tree, tokenizer, metadata and, once pruned, masks.

    `masks` is a tree like `params` with a boolean keep-mask for every pruned kernel and None elsewhere.
    `processor` is the HF processor of a model loaded from a Hugging Face checkpoint (its files are
    kept in `metadata["hf"]`, so it survives a save and load).
    """

    config: VLMConfig
    params: PyTree
    tokenizer: PreTrainedTokenizerBase
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    masks: PyTree | None = None
    processor: Any = None

    @property
    def image_processor(self) -> Any:
        """The HF image processor (resize / crop as the checkpoint expects); None for built-in models."""
        return getattr(self.processor, "image_processor", None)

    @property
    def instruction_tokenizer(self) -> PreTrainedTokenizerBase | None:
        """InstructBLIP's Q-Former tokenizer (its prompt goes to the Q-Former too); None for other models."""
        if not self.config.connector.reads_text:
            return None
        tokenizer = getattr(self.processor, "qformer_tokenizer", None)
        if tokenizer is None:
            raise ValueError("this model's Q-Former reads the instruction but its processor has no qformer_tokenizer")
        return tokenizer


def is_model_dir(path: str | os.PathLike) -> bool:
    """True if `path` holds a saved model (a complete orbax step with our items)."""
    path = Path(path)
    if not path.is_dir():
        return False
    manager = ocp.CheckpointManager(path.resolve(), item_names=_ITEMS, options=_options(read_only=True))
    return manager.latest_step() is not None


def _options(read_only: bool = False) -> ocp.CheckpointManagerOptions:
    return ocp.CheckpointManagerOptions(
        max_to_keep=1, enable_async_checkpointing=False, read_only=read_only, create=not read_only
    )


def save_model(path: str | os.PathLike, bundle: ModelBundle, overwrite: bool = False) -> Path:
    """Save a bundle as a model directory; an existing non-empty `path` needs `overwrite=True`.

    The new model is written to a sibling temporary directory and renamed into place, so a crash
    mid-save leaves any previous model at `path` intact. Its `checksums.json` is written last, inside
    that directory, so the rename publishes the model and its manifest together.
    """
    path = Path(path).resolve()
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"model directory {path} already exists and is not empty (pass overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        manager = ocp.CheckpointManager(staging, item_names=_ITEMS, options=_options())
        params = jax.tree.map(np.asarray, bundle.params)
        items = dict(
            params=ocp.args.StandardSave(params),
            config=ocp.args.JsonSave(bundle.config.to_dict()),
            tokenizer=ocp.args.JsonSave({"tokenizer_json": tokenizer_to_json(bundle.tokenizer)}),
            metadata=ocp.args.JsonSave(bundle.metadata),
        )
        if bundle.masks is not None:
            # Only the pruned leaves are stored; None leaves are rebuilt from the params on load.
            pruned = {path: np.asarray(m, bool) for path, m in flat_masks(bundle.masks).items()}
            items["masks"] = ocp.args.StandardSave(unflatten(pruned))
        manager.save(0, args=ocp.args.Composite(**items))
        manager.wait_until_finished()
        manager.close()
        write_checksums(staging)
        if path.exists():
            backup = path.with_name(f".{path.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            path.rename(backup)
            staging.rename(path)
            shutil.rmtree(backup)
        else:
            staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def load_model_dir(path: str | os.PathLike) -> ModelBundle:
    """Load a model directory written by `save_model`; a damaged one is a `CorruptCheckpointError`.

    `checksums.json` is verified first, naming a truncated or changed file. Models saved before
    manifests existed have none and still load; for them (and for damage a manifest cannot see) any
    failure while restoring is reported as a `CorruptCheckpointError` naming the directory.
    """
    path = Path(path).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    verified = verify_checksums(path)
    manager = ocp.CheckpointManager(path, item_names=_ITEMS, options=_options(read_only=True))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{path} holds no saved model (no complete orbax checkpoint)")
    items = dict(
        params=ocp.args.StandardRestore(),
        config=ocp.args.JsonRestore(),
        tokenizer=ocp.args.JsonRestore(),
        metadata=ocp.args.JsonRestore(),
    )
    has_masks = (path / str(step) / "masks").is_dir()
    if has_masks:
        items["masks"] = ocp.args.StandardRestore()
    if verified:
        # Unlisted files may sit beside the model (report.json), but everything restored must be listed.
        listed = listed_files(path)
        for item in items:
            if not any(name.startswith(f"{step}/{item}/") for name in listed):
                raise CorruptCheckpointError(
                    f"{path / str(step) / item} is not covered by {path / 'checksums.json'}: "
                    "it was added after the model was saved"
                )
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as err:  # orbax, tensorstore and json raise many types; none names the damage clearly
        raise CorruptCheckpointError(
            f"model directory {path} is damaged or incomplete (restoring it failed): {one_line_error(err)}"
        ) from err
    finally:
        manager.close()
    try:
        return _bundle(restored, has_masks)
    except Exception as err:  # the files parsed but do not hold a usable model
        raise CorruptCheckpointError(f"model directory {path} holds an unusable model: {one_line_error(err)}") from err


def _bundle(restored: Any, has_masks: bool) -> ModelBundle:
    """A `ModelBundle` from the restored orbax items."""
    params = jax.tree.map(np.asarray, restored["params"])
    masks = masks_from_flat(params, flatten(restored["masks"])) if has_masks else None
    metadata = dict(restored["metadata"] or {})
    processor = None
    tokenizer = None
    if "hf" in metadata:
        from sparsevlm.hf.load import processor_from_files

        processor = processor_from_files(metadata["hf"]["processor_files"])
        tokenizer = processor.tokenizer
    return ModelBundle(
        config=VLMConfig.from_dict(restored["config"]),
        params=params,
        tokenizer=tokenizer or tokenizer_from_json(restored["tokenizer"]["tokenizer_json"]),
        metadata=metadata,
        masks=masks,
        processor=processor,
    )


def export_safetensors(bundle: ModelBundle, out_dir: str | os.PathLike) -> Path:
    """Write `model.safetensors` (flat `/`-joined names), `config.json` and `tokenizer.json` to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.ascontiguousarray(np.asarray(value)) for name, value in flatten(bundle.params).items()}
    write_atomic(out_dir / "model.safetensors",
                 lambda tmp: save_file(tensors, str(tmp), metadata={"format": "sparsevlm"}))
    write_atomic(out_dir / "config.json", bundle.config.to_json())
    write_atomic(out_dir / "tokenizer.json", tokenizer_to_json(bundle.tokenizer))
    return out_dir


def import_safetensors(directory: str | os.PathLike) -> ModelBundle:
    """Read back a directory written by `export_safetensors`; a damaged file is a ValueError naming it."""
    directory = Path(directory)
    # Our reader, not `safetensors.numpy.load_file`: its errors (SafetensorError, not a ValueError) name no file.
    params = unflatten(dict(iter_file(directory / SINGLE_NAME)))
    config_path, tokenizer_path = directory / "config.json", directory / "tokenizer.json"
    for file in (config_path, tokenizer_path):
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist (export_safetensors writes it beside {SINGLE_NAME})")
    try:
        config = VLMConfig.from_dict(json.loads(config_path.read_text()))
    except Exception as err:  # JSONDecodeError, UnicodeDecodeError, or fields the config does not have
        raise ValueError(f"{config_path} is not a valid sparsevlm config: {one_line_error(err)}") from err
    try:
        tokenizer = tokenizer_from_json(tokenizer_path.read_text())
    except Exception as err:  # the tokenizers library raises a bare Exception for malformed JSON
        raise ValueError(f"{tokenizer_path} is not a valid tokenizer: {one_line_error(err)}") from err
    return ModelBundle(config, params, tokenizer)
