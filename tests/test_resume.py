"""Resumable training: checkpoints of state + data position, resume after a kill, and the NaN/Inf guard."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from sparsevlm import checkpoint
from sparsevlm.checkpoint import load_model_dir, save_model
from sparsevlm.cli import main
from sparsevlm.config import RestoreConfig, SparsitySpec
from sparsevlm.data import batch as batch_module
from sparsevlm.pruning import prune
from sparsevlm.restoration import restore
from sparsevlm.tree import flatten

from .conftest import Killed


@pytest.fixture(scope="module")
def pruned(tiny_bundle):
    return prune(tiny_bundle.params, tiny_bundle.config, SparsitySpec.same(0.5), "magnitude")


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    run = {"restore": {"steps": 4}}
    like = {"lora": jax.numpy.zeros((3, 2)), "count": jax.numpy.zeros((), jax.numpy.int32)}
    checkpoints = checkpoint.TrainingCheckpoints(tmp_path / "c", run)
    for step in (2, 4):
        checkpoints.save(step, {"lora": np.full((3, 2), step, np.float32), "count": np.int32(step)}, {"at": step})
    checkpoints.close()
    # A run killed while writing step 4: orbax's temporary directory, half full, beside a complete step 2.
    (tmp_path / "c" / "4").rename(tmp_path / "c" / "4.orbax-checkpoint-tmp-1700000000000000")
    for item in (tmp_path / "c" / "4.orbax-checkpoint-tmp-1700000000000000" / "state").rglob("*"):
        if item.is_file():
            item.write_bytes(item.read_bytes()[: item.stat().st_size // 2])
    step, state, extra = checkpoint.TrainingCheckpoints(tmp_path / "c", run).load_latest(like)
    assert step == 2 and extra == {"at": 2}
    assert np.asarray(state["lora"]).tolist() == [[2.0, 2.0]] * 3 and int(state["count"]) == 2
    assert state["lora"].sharding == like["lora"].sharding


def test_resuming_another_runs_checkpoints_is_an_error(tiny_bundle, pruned, tmp_path):
    config = RestoreConfig(train_data="shapes-mix", steps=2, warmup_steps=0, batch_size=4, train_images=8, checkpoint_every=1)
    args = (tiny_bundle.params, pruned.masks, tiny_bundle.config, tiny_bundle.tokenizer)
    restore(*args, config, checkpoint_dir=tmp_path / "c", progress=False)
    before = sorted(p.name for p in (tmp_path / "c").iterdir())
    with pytest.raises(ValueError, match=r"holds checkpoints of a different run \(restore.learning_rate 0.001 there, 0.003 now\)"):
        restore(*args, dataclasses.replace(config, learning_rate=3e-3), checkpoint_dir=tmp_path / "c", progress=False)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == before


def _poison(monkeypatch, bad: set[int]) -> None:
    """Make the given micro-batches (0-based) carry NaN images."""
    original = batch_module.BatchStream.__next__
    seen = []

    def poisoned(self):
        batch = original(self)
        seen.append(1)
        if len(seen) - 1 in bad:
            batch = dataclasses.replace(batch, images=np.full_like(batch.images, np.nan))
        return batch

    monkeypatch.setattr(batch_module.BatchStream, "__next__", poisoned)


def test_skip_mode_skips_non_finite_steps_and_counts_them(tiny_bundle, pruned, monkeypatch, capsys):
    config = RestoreConfig(train_data="shapes-mix", steps=4, warmup_steps=0, batch_size=4, train_images=8, skip_nonfinite=1)
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
    config = RestoreConfig(train_data="shapes-mix", steps=1, warmup_steps=0, batch_size=4, train_images=8, skip_nonfinite=1)
    _poison(monkeypatch, {0})
    result = restore(tiny_bundle.params, pruned.masks, tiny_bundle.config, tiny_bundle.tokenizer, config,
                     progress=False)
    from sparsevlm.lora import init_lora

    initial = init_lora(tiny_bundle.params, config.lora, jax.random.key(config.seed))
    assert result.skipped == 1 and _max_diff(result.lora, initial) == 0.0


def _restore_argv(pruned_dir: Path, out: Path) -> list[str]:
    return ["restore", "--model", str(pruned_dir), "--method", "sparselora", "--steps", "16", "--warmup-steps", "2",
            "--batch-size", "4", "--grad-accum", "2", "--train-images", "8", "--checkpoint-every", "2",
            "--eval-images", "2", "--out", str(out)]


@pytest.mark.slow
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
    assert 4 <= written < 16
    # Re-running the same command resumes and ends where the uninterrupted run did.
    assert main(_restore_argv(pruned_dir, out)) == 0
    final = {}
    for name in ("whole", "killed"):
        import orbax.checkpoint as ocp

        manager = ocp.CheckpointManager(tmp_path / f"{name}-checkpoints", item_names=("state", "meta"))
        assert manager.latest_step() == 16
        final[name] = manager.restore(16, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    whole_lora, killed_lora = final["whole"]["params"], final["killed"]["params"]
    assert jax.tree.structure(whole_lora) == jax.tree.structure(killed_lora)
    assert _max_diff(whole_lora, killed_lora) <= 1e-6
    whole, resumed = flatten(load_model_dir(tmp_path / "whole").params), flatten(load_model_dir(out).params)
    assert max(float(np.max(np.abs(whole[p] - resumed[p]))) for p in whole) <= 1e-6
    # The loss history (restored from the checkpoint, then continued) matches, and the newest two
    # checkpoints are kept, each with its sha256 manifest.
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("whole", "killed")]
    assert reports[0]["loss_history"] == reports[1]["loss_history"] and reports[1]["skipped_steps"] == 0
    kept = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert kept == [14, 16] and all((checkpoints / str(s) / "checksums.json").is_file() for s in kept)


@pytest.mark.parametrize("damage,message", [("truncate", r"is truncated: \d+ of \d+ bytes"),
                                            ("flip", r"is corrupted \(sha256 mismatch")])
def test_a_damaged_training_checkpoint_is_a_clear_error(tiny_bundle, pruned, tmp_path, damage, message):
    from sparsevlm.integrity import CorruptCheckpointError

    config = RestoreConfig(train_data="shapes-mix", steps=2, warmup_steps=0, batch_size=4, train_images=8, checkpoint_every=1)
    args = (tiny_bundle.params, pruned.masks, tiny_bundle.config, tiny_bundle.tokenizer, config)
    restore(*args, checkpoint_dir=tmp_path / "c", progress=False)
    data = max((p for p in (tmp_path / "c" / "2" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    raw = raw[:middle] if damage == "truncate" else raw[:middle] + bytes(b ^ 0xFF for b in raw[middle:middle + 4]) + raw[middle + 4:]
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=rf"{data.name}.* {message}"):
        restore(*args, checkpoint_dir=tmp_path / "c", progress=False)


@pytest.mark.slow
def test_sharded_restore_resumes_onto_its_mesh(tiny_bundle, pruned, tmp_path, kill_after_checkpoint):
    from sparsevlm.sharding import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig.parse("data=2,fsdp=4"))
    config = RestoreConfig(train_data="shapes-mix", steps=4, warmup_steps=0, batch_size=8, train_images=8, checkpoint_every=2)
    args = (tiny_bundle.params, pruned.masks, tiny_bundle.config, tiny_bundle.tokenizer, config)
    whole = restore(*args, checkpoint_dir=tmp_path / "a", progress=False, mesh=mesh)
    kill_after_checkpoint(1)
    with pytest.raises(Killed):
        restore(*args, checkpoint_dir=tmp_path / "b", progress=False, mesh=mesh)
    resumed = restore(*args, checkpoint_dir=tmp_path / "b", progress=False, mesh=mesh)
    assert _max_diff(whole.lora, resumed.lora) <= 1e-6
