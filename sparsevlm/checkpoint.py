"""Checkpoints: model directories (config + params + tokenizer + masks, saved with orbax), resumable
training state, and plain safetensors export.

Both kinds of directory are written so that a crash leaves the previous one intact, and both carry
a sha256 manifest (`sparsevlm.integrity`) checked before anything is read back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import save_file

from sparsevlm.bundle import ModelBundle
from sparsevlm.config import VLMConfig
from sparsevlm.data.tokenize import tokenizer_from_json, tokenizer_to_json
from sparsevlm.hf.compressed import BITMASK_MIN_SPARSITY, SPARSITY_CONFIG, CompressedWriter, open_checkpoint
from sparsevlm.hf.safetensors_io import SINGLE_NAME, write_file
from sparsevlm.integrity import (
    CorruptCheckpointError,
    listed_files,
    one_line_error,
    verify_checksums,
    write_atomic,
    write_checksums,
)
from sparsevlm.masks import flat_masks, masks_from_flat
from sparsevlm.tree import flatten, unflatten

PyTree = Any
_ITEMS = ("params", "config", "tokenizer", "metadata", "masks")


def is_model_dir(path: str | os.PathLike) -> bool:
    """True if `path` holds a saved model (a complete orbax step with our items)."""
    path = Path(path)
    if not path.is_dir():
        return False
    return _reader(path.resolve()).latest_step() is not None


def _reader(path: Path) -> ocp.CheckpointManager:
    """A manager that only reads the model directory `path`."""
    return ocp.CheckpointManager(path, item_names=_ITEMS, options=_options(reading=True))


def _saved_step(manager: ocp.CheckpointManager, path: Path) -> int:
    """The model's step in `path`, or a FileNotFoundError naming the directory."""
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{path} holds no saved model (no complete orbax checkpoint)")
    return step


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata item of the saved model at `path` (its recipe, scores, history), without its params."""
    path = Path(path).resolve()
    manager = _reader(path)
    restored = manager.restore(_saved_step(manager, path), args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    return dict(restored["metadata"] or {})


def _options(reading: bool = False) -> ocp.CheckpointManagerOptions:
    # A model directory is read by each process on its own and written by one (`save_model`): its
    # manager spans this process only, so orbax never waits for the others at a barrier.
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    if reading:
        # Not orbax's read_only mode, which logs a warning on every read: a manager that is never asked
        # to save and does not create the directory writes nothing.
        return ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=False,
                                            multiprocessing_options=alone)
    # The (staging) directory already exists: orbax cannot create it for a subset of the processes.
    return ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=False,
                                        multiprocessing_options=alone)


def save_model(path: str | os.PathLike, bundle: ModelBundle, overwrite: bool = False) -> Path:
    """Save a bundle as a model directory; an existing non-empty `path` needs `overwrite=True`.

    The new model is written to a sibling temporary directory and renamed into place, so a crash
    mid-save leaves any previous model at `path` intact. Its `checksums.json` is written last, inside
    that directory, so the rename publishes the model and its manifest together. In a run of several
    processes every process calls this with the same bundle; process 0 writes, the others wait for it.
    """
    path = Path(path).resolve()
    if jax.process_count() > 1:
        from sparsevlm.sharding import barrier, is_primary

        if is_primary():
            _save_model(path, bundle, overwrite)
        barrier(f"save_model {path}")
        return path
    return _save_model(path, bundle, overwrite)


def _save_model(path: Path, bundle: ModelBundle, overwrite: bool) -> Path:
    """`save_model`'s writing, by the one process that writes."""
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
    manager = _reader(path)
    step = _saved_step(manager, path)
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
        from sparsevlm.hf.processor import processor_from_files  # transformers' processors: only for HF models

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
    tensors = {name: np.ascontiguousarray(np.asarray(value)) for name, value in flatten(bundle.params).items()}
    return _export(bundle, Path(out_dir), lambda tmp: save_file(tensors, str(tmp), metadata={"format": "sparsevlm"}))


def export_safetensors_compressed(bundle: ModelBundle, out_dir: str | os.PathLike,
                                  min_sparsity: float = BITMASK_MIN_SPARSITY) -> dict[str, Any]:
    """`export_safetensors` with every masked kernel written 2:4, bitmask or dense by its zeros; the formats chosen.

    A compressed kernel is stored as its `[out, in]` transpose (a torch `Linear`'s layout, the one the
    compressed-tensors formats group along); the file's metadata also carries the `sparsity_config`.
    """
    if bundle.masks is None:
        raise ValueError("the model has no masks: compressed export writes the weights that pruning masked "
                         "(export a pruned or restored model, or use --format dense)")
    flat = flatten(bundle.params)
    pruned = set(flat_masks(bundle.masks))
    writer = CompressedWriter(pruned, min_sparsity)

    def tensors() -> Any:
        for name, value in flat.items():
            value = np.asarray(value)
            yield name, np.ascontiguousarray(value.T if name in pruned else value)

    specs = writer.plan(tensors())
    metadata = {"format": "sparsevlm", **writer.metadata(), SPARSITY_CONFIG: json.dumps(writer.sparsity_config())}
    _export(bundle, Path(out_dir), lambda tmp: write_file(tmp, specs, writer.tensors(tensors()), metadata=metadata))
    return writer.report()


def _export(bundle: ModelBundle, out_dir: Path, write_weights: Any) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "model.safetensors", write_weights)
    write_atomic(out_dir / "config.json", bundle.config.to_json())
    write_atomic(out_dir / "tokenizer.json", tokenizer_to_json(bundle.tokenizer))
    return out_dir


def import_safetensors(directory: str | os.PathLike) -> ModelBundle:
    """Read back a directory written by `export_safetensors` (or compressed); a damaged file is a ValueError naming it."""
    directory = Path(directory)
    # Our reader, not `safetensors.numpy.load_file`: its errors (SafetensorError, not a ValueError) name no file.
    checkpoint = open_checkpoint(directory)
    compressed = getattr(checkpoint, "formats", {})
    # A compressed kernel is stored `[out, in]`: transposed back to Flax's `[in, out]`.
    params = unflatten({name: checkpoint.read(name).T.copy() if name in compressed else checkpoint.read(name)
                        for name in checkpoint.keys()})
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


class TrainingCheckpoints:
    """Resumable training checkpoints in one directory: the train state, and JSON for the data position etc.

    Each save is an orbax step directory (one for all processes of a multi-process run, on a file
    system they share), written under a temporary name and renamed when complete,
    so a kill mid-save leaves the previous checkpoint as the latest; a sha256 manifest is added to
    each, and checked before a resume. `run` identifies the run (config, model): resuming a
    directory written by a different run is an error naming what differs.
    """

    def __init__(self, directory: str | os.PathLike, run: Mapping[str, Any], keep: int = 2) -> None:
        self.directory = Path(directory).resolve()
        if self.directory.exists() and not self.directory.is_dir():
            raise FileExistsError(f"checkpoint directory {self.directory} exists and is not a directory")
        self.run = json.loads(json.dumps(dict(run)))  # what a JSON round trip gives back, for comparison
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def describe_latest(self) -> str:
        """"; the last good checkpoint is step N in DIR" (empty when there is none), for error messages."""
        step = self.latest_step()
        return "" if step is None else f"; the last good checkpoint is step {step} in {self.directory}"

    def load_latest(self, like: PyTree) -> tuple[int, PyTree, dict[str, Any]] | None:
        """(step, state laid out like `like`, extras) from the newest checkpoint, or None if there is none."""
        step = self.latest_step()
        if step is None:
            return None
        where = self.directory / str(step)
        verify_checksums(where)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # noqa: BLE001 — whatever orbax raises, the user needs the path
            raise CorruptCheckpointError(f"checkpoint {where} is unreadable: {one_line_error(err)}") from err
        if not isinstance(meta, dict) or "run" not in meta:
            raise CorruptCheckpointError(f"checkpoint {where} has no run description: not a sparsevlm checkpoint")
        now, then = _dotted(self.run), _dotted(meta["run"])
        differs = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
        if differs:
            shown = ", ".join(f"{k} {then.get(k)!r} there, {now.get(k)!r} now" for k in differs[:4])
            more = f" and {len(differs) - 4} more" if len(differs) > 4 else ""
            raise ValueError(
                f"{self.directory} holds checkpoints of a different run ({shown}{more}); delete it to start "
                "afresh, or choose another output"
            )
        try:
            state = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as err:  # noqa: BLE001
            raise CorruptCheckpointError(f"checkpoint {where} is unreadable: {one_line_error(err)}") from err
        return step, jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(state)), meta.get("extra", {})

    def save(self, step: int, state: PyTree, extra: Mapping[str, Any]) -> None:
        """Write step `step` (state arrays + JSON extras) and its manifest; older ones beyond `keep` go.

        Every process of a multi-process run calls it: each writes its own shards (orbax), process 0
        the JSON and the manifest. The extras must be the same on every process.
        """
        meta = {"run": self.run, "step": step, "extra": dict(extra)}
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            write_checksums(self.directory / str(step))

    def close(self) -> None:
        """Finish pending writes."""
        self._manager.wait_until_finished()
        self._manager.close()


def _dotted(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` → `{"a.b": 1}`: leaf settings, for naming what differs."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, value in tree.items() for k, v in _dotted(value, f"{prefix}.{key}" if prefix else key).items()}
