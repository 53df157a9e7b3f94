"""Resumable training: checkpoints of state + data position, resume after a kill, and the NaN/Inf guard."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from sparsevlm import restore as restore_module
from sparsevlm import train
from sparsevlm.checkpoint import load_model_dir, save_model
from sparsevlm.cli import main
from sparsevlm.config import PretrainConfig, RestoreConfig
from sparsevlm.pretrain import pretrain
from sparsevlm.pruning import SparsitySpec, prune
from sparsevlm.restore import restore
from sparsevlm.tree import flatten

from .conftest import tiny_config


@pytest.fixture(scope="module")
def pruned(tiny_bundle):
    return prune(tiny_bundle.params, tiny_bundle.config, SparsitySpec.same(0.5), "magnitude")


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


class Killed(BaseException):
    """Stands in for SIGKILL inside the process: nothing after the raise runs."""


@pytest.fixture()
def kill_after_checkpoint(monkeypatch):
    """Make the n-th completed checkpoint save the last thing a run does."""

    def arm(n: int) -> None:
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


def test_pretrain_resumes_to_the_uninterrupted_result(tokenizer, tmp_path, kill_after_checkpoint):
    config = PretrainConfig(steps=7, batch_size=4, warmup_steps=1, train_images=6, vision_steps=2,
                            vision_batch_size=4, checkpoint_every=2)
    model_config = tiny_config(len(tokenizer))
    whole = pretrain(config, None, model_config, eval_images=2, progress=False, checkpoint_dir=tmp_path / "a")
    kill_after_checkpoint(2)
    with pytest.raises(Killed):
        pretrain(config, None, model_config, eval_images=2, progress=False, checkpoint_dir=tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.isdigit()) == ["2", "4"]
    resumed = pretrain(config, None, model_config, eval_images=2, progress=False, checkpoint_dir=tmp_path / "b")
    assert _max_diff(whole.params, resumed.params) == 0.0
    assert resumed.metadata["loss_history"] == whole.metadata["loss_history"]
    assert resumed.metadata["test_accuracy"] == whole.metadata["test_accuracy"]


def test_restore_resumes_with_optimizer_and_data_state(tiny_bundle, pruned, tmp_path, kill_after_checkpoint, capsys):
    config = RestoreConfig(steps=6, warmup_steps=1, batch_size=4, train_images=8, checkpoint_every=2, grad_accum=2)
    args = (tiny_bundle.params, pruned.masks, tiny_bundle.config, tiny_bundle.tokenizer, config)
    whole = restore(*args, checkpoint_dir=tmp_path / "a", progress=False)
    kill_after_checkpoint(1)
    with pytest.raises(Killed):
        restore(*args, checkpoint_dir=tmp_path / "b", progress=False)
    resumed = restore(*args, checkpoint_dir=tmp_path / "b", progress=False)
    assert "resuming from step 2 of 6" in capsys.readouterr().out
    assert _max_diff(whole.lora, resumed.lora) == 0.0
    assert _max_diff(whole.params, resumed.params) == 0.0
    assert resumed.history == whole.history
    # Only the newest two checkpoints are kept, each with its sha256 manifest.
    kept = sorted(int(p.name) for p in (tmp_path / "b").iterdir() if p.name.isdigit())
    assert kept == [4, 6] and all((tmp_path / "b" / str(s) / "checksums.json").is_file() for s in kept)


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tiny_bundle, pruned, tmp_path, capsys):
    config = RestoreConfig(steps=4, warmup_steps=0, batch_size=4, train_images=8, checkpoint_every=2)
    args = (tiny_bundle.params, pruned.masks, tiny_bundle.config, tiny_bundle.tokenizer, config)
    whole = restore(*args, checkpoint_dir=tmp_path / "a", progress=False)
    # A run killed while writing step 4: orbax's temporary directory, half full, and step 2 complete.
    checkpoints = tmp_path / "a"
    (checkpoints / "4").rename(checkpoints / "4.orbax-checkpoint-tmp-1700000000000000")
    for item in (checkpoints / "4.orbax-checkpoint-tmp-1700000000000000" / "state").iterdir():
        if item.is_file():
            item.write_bytes(item.read_bytes()[: item.stat().st_size // 2])
    resumed = restore(*args, checkpoint_dir=checkpoints, progress=False)
    assert "resuming from step 2 of 4" in capsys.readouterr().out
    assert _max_diff(whole.lora, resumed.lora) == 0.0


def test_resuming_another_runs_checkpoints_is_an_error(tiny_bundle, pruned, tmp_path):
    config = RestoreConfig(steps=2, warmup_steps=0, batch_size=4, train_images=8, checkpoint_every=1)
    args = (tiny_bundle.params, pruned.masks, tiny_bundle.config, tiny_bundle.tokenizer)
    restore(*args, config, checkpoint_dir=tmp_path / "c", progress=False)
    before = sorted(p.name for p in (tmp_path / "c").iterdir())
    with pytest.raises(ValueError, match=r"holds checkpoints of a different run \(restore.learning_rate 0.001 there, 0.003 now\)"):
        restore(*args, dataclasses.replace(config, learning_rate=3e-3), checkpoint_dir=tmp_path / "c", progress=False)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == before


def _poison(monkeypatch, bad: set[int]) -> None:
    """Make the given micro-batches (0-based) carry NaN images."""
    original = restore_module.BatchStream.__next__
    seen = []

    def poisoned(self):
        batch = original(self)
        seen.append(1)
        if len(seen) - 1 in bad:
            batch = dataclasses.replace(batch, images=np.full_like(batch.images, np.nan))
        return batch

    monkeypatch.setattr(restore_module.BatchStream, "__next__", poisoned)


def test_skip_mode_skips_non_finite_steps_and_counts_them(tiny_bundle, pruned, monkeypatch, capsys):
    config = RestoreConfig(steps=4, warmup_steps=0, batch_size=4, train_images=8, skip_nonfinite=1)
    args = (tiny_bundle.params, pruned.masks, tiny_bundle.config, tiny_bundle.tokenizer)
    clean = restore(*args, config, progress=False)
    _poison(monkeypatch, {1})
    result = restore(*args, config, progress=False)
    assert result.skipped == 1 and clean.skipped == 0
    assert "skipped step 1 (micro-batch 1): non-finite loss nan (1 of at most 1)" in capsys.readouterr().out
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(result.lora))
    assert _max_diff(result.lora, clean.lora) > 0  # one batch fewer: a different, finite result
    _poison(monkeypatch, {1, 2})
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 2 \(micro-batch 2\); 1 non-finite "
                                                 r"steps were already skipped"):
        restore(*args, config, progress=False)


def test_non_finite_step_leaves_the_state_unchanged(tiny_bundle, pruned, monkeypatch):
    """The jit step itself keeps the old state, so a skipped step costs one batch and nothing else."""
    config = RestoreConfig(steps=1, warmup_steps=0, batch_size=4, train_images=8, skip_nonfinite=1)
    _poison(monkeypatch, {0})
    result = restore(tiny_bundle.params, pruned.masks, tiny_bundle.config, tiny_bundle.tokenizer, config,
                     progress=False)
    from sparsevlm.lora import init_lora
    from sparsevlm.restore import lora_config

    initial = init_lora(tiny_bundle.params, lora_config(config, tiny_bundle.config), jax.random.key(config.seed))
    assert result.skipped == 1 and _max_diff(result.lora, initial) == 0.0


def _restore_argv(pruned_dir: Path, out: Path) -> list[str]:
    return ["restore", "--model", str(pruned_dir), "--method", "sparselora", "--steps", "40", "--warmup-steps", "2",
            "--batch-size", "4", "--train-images", "8", "--checkpoint-every", "2", "--eval-images", "2",
            "--out", str(out)]


def test_restore_killed_after_its_second_checkpoint_resumes_to_the_same_params(tiny_bundle, tmp_path):
    dense = save_model(tmp_path / "dense", tiny_bundle)
    pruned_dir = tmp_path / "pruned"
    assert main(["prune", "--model", str(dense), "--method", "magnitude", "--language-sparsity", "0.5",
                 "--vision-sparsity", "0.5", "--eval-images", "2", "--out", str(pruned_dir)]) == 0
    # Uninterrupted reference run.
    assert main(_restore_argv(pruned_dir, tmp_path / "whole")) == 0
    # The same command as a process, SIGKILLed once its second checkpoint (step 4) is complete.
    out = tmp_path / "killed"
    checkpoints = tmp_path / "killed-checkpoints"
    child = subprocess.Popen([sys.executable, "-m", "sparsevlm.cli", *_restore_argv(pruned_dir, out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (checkpoints / "4").is_dir():
        assert child.poll() is None, f"restore exited ({child.returncode}) before its second checkpoint: " \
                                     f"{child.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "no second checkpoint within 240 s"
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert not out.exists()
    written = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert 4 <= written < 40
    # Re-running the same command resumes and ends where the uninterrupted run did.
    assert main(_restore_argv(pruned_dir, out)) == 0
    final = {}
    for name in ("whole", "killed"):
        import orbax.checkpoint as ocp

        manager = ocp.CheckpointManager(tmp_path / f"{name}-checkpoints", item_names=("state", "meta"))
        assert manager.latest_step() == 40
        final[name] = manager.restore(40, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    whole_lora, killed_lora = final["whole"]["lora"], final["killed"]["lora"]
    assert jax.tree.structure(whole_lora) == jax.tree.structure(killed_lora)
    assert _max_diff(whole_lora, killed_lora) <= 1e-6
    whole, resumed = flatten(load_model_dir(tmp_path / "whole").params), flatten(load_model_dir(out).params)
    assert max(float(np.max(np.abs(whole[p] - resumed[p]))) for p in whole) <= 1e-6


@pytest.mark.parametrize("damage,message", [("truncate", r"is truncated: \d+ of \d+ bytes"),
                                            ("flip", r"is corrupted \(sha256 mismatch")])
def test_a_damaged_training_checkpoint_is_a_clear_error(tiny_bundle, pruned, tmp_path, damage, message):
    from sparsevlm.integrity import CorruptCheckpointError

    config = RestoreConfig(steps=2, warmup_steps=0, batch_size=4, train_images=8, checkpoint_every=1)
    args = (tiny_bundle.params, pruned.masks, tiny_bundle.config, tiny_bundle.tokenizer, config)
    restore(*args, checkpoint_dir=tmp_path / "c", progress=False)
    data = max((p for p in (tmp_path / "c" / "2" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    raw = raw[:middle] if damage == "truncate" else raw[:middle] + bytes(b ^ 0xFF for b in raw[middle:middle + 4]) + raw[middle + 4:]
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=rf"{data.name}.* {message}"):
        restore(*args, checkpoint_dir=tmp_path / "c", progress=False)


def test_sharded_restore_resumes_onto_its_mesh(tiny_bundle, pruned, tmp_path, kill_after_checkpoint):
    from sparsevlm.sharding import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig.parse("data=2,fsdp=4"))
    config = RestoreConfig(steps=4, warmup_steps=0, batch_size=8, train_images=8, checkpoint_every=2)
    args = (tiny_bundle.params, pruned.masks, tiny_bundle.config, tiny_bundle.tokenizer, config)
    whole = restore(*args, checkpoint_dir=tmp_path / "a", progress=False, mesh=mesh)
    kill_after_checkpoint(1)
    with pytest.raises(Killed):
        restore(*args, checkpoint_dir=tmp_path / "b", progress=False, mesh=mesh)
    resumed = restore(*args, checkpoint_dir=tmp_path / "b", progress=False, mesh=mesh)
    assert _max_diff(whole.lora, resumed.lora) <= 1e-6
