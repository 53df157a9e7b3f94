"""The one training loop on a toy step: cadence of logs, hooks and checkpoints, micro-batches, resume, the guard."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsevlm import trainer
from sparsevlm.checkpoint import TrainingCheckpoints
from sparsevlm.data.batch import rng_state, set_rng_state


class Draws:
    """Batches of one normal draw each, from a generator whose state is the stream's position."""

    def __init__(self, seed: int = 0, poison: frozenset[int] = frozenset()) -> None:
        self.rng, self.calls, self.poison = np.random.default_rng(seed), 0, poison

    def __next__(self) -> np.ndarray:
        value = np.float32(np.nan if self.calls in self.poison else self.rng.normal())
        self.calls += 1
        return value

    def state(self) -> dict[str, Any]:
        return {"rng": rng_state(self.rng), "calls": self.calls}

    def load_state(self, state: Mapping[str, Any]) -> None:
        set_rng_state(self.rng, state["rng"])
        self.calls = state["calls"]


@jax.jit
def _step(state: dict, batch: jax.Array) -> tuple[dict, dict]:
    """A running sum of the batches (skipped when not finite, as train steps do), and metrics."""
    finite = jnp.isfinite(batch)
    new = {"total": jnp.where(finite, state["total"] + batch, state["total"]), "count": state["count"] + finite}
    return new, {"loss": batch, "grad_norm": jnp.abs(batch), "tokens": jnp.ones(())}


def _start() -> dict:
    return {"total": jnp.zeros(()), "count": jnp.zeros((), jnp.int32)}


def test_logs_hooks_and_checkpoints_run_at_their_cadence(tmp_path):
    seen = []
    checkpoints = TrainingCheckpoints(tmp_path / "c", {"run": 1}, keep=5)
    result = trainer.run(_step, _start(), Draws(), 6, accumulate=2, checkpoints=checkpoints, checkpoint_every=2,
                         log_every=5, hooks=[trainer.Hook(3, lambda done, state: seen.append(done))], progress=False)
    # 6 optimizer steps of 2 micro-batches: 12 calls; history at calls 0, 5, 10 and the last (11).
    assert int(result.state["count"]) == 12
    assert [(h["step"], h["micro_step"]) for h in result.history] == [(0, 0), (2, 5), (5, 10), (5, 11)]
    assert set(result.history[0]) == {"loss", "grad_norm", "step", "micro_step"}  # counts are not recorded
    assert seen == [3, 6]
    assert sorted(int(p.name) for p in (tmp_path / "c").iterdir() if p.name.isdigit()) == [2, 4, 6]


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    whole = trainer.run(_step, _start(), Draws(), 8, checkpoints=TrainingCheckpoints(tmp_path / "a", {"run": 1}),
                        checkpoint_every=3, log_every=2, progress=False)

    class Stop(Exception):
        pass

    def stop(done: int, state: Any) -> None:
        raise Stop

    with pytest.raises(Stop):  # killed after step 7, whose checkpoint (6) is the last one written
        trainer.run(_step, _start(), Draws(), 8, checkpoints=TrainingCheckpoints(tmp_path / "b", {"run": 1}),
                    checkpoint_every=3, log_every=2, hooks=[trainer.Hook(7, stop)], progress=False)
    resumed = trainer.run(_step, _start(), Draws(), 8, checkpoints=TrainingCheckpoints(tmp_path / "b", {"run": 1}),
                          checkpoint_every=3, log_every=2, progress=False)
    assert float(resumed.state["total"]) == float(whole.state["total"])  # the same draws, in the same order
    assert int(resumed.state["count"]) == 8 and resumed.history == whole.history


def test_a_non_finite_step_stops_the_run_naming_the_last_good_checkpoint(tmp_path):
    checkpoints = TrainingCheckpoints(tmp_path / "c", {"run": 1})
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 4 \(micro-batch 4\); the last good "
                                                 r"checkpoint is step 4 in "):
        trainer.run(_step, _start(), Draws(poison=frozenset({4})), 8, accumulate=1, checkpoints=checkpoints,
                    checkpoint_every=2, progress=False)
    assert sorted(int(p.name) for p in (tmp_path / "c").iterdir() if p.name.isdigit()) == [2, 4]


def test_skipping_counts_the_non_finite_steps_and_leaves_the_state_alone(capsys):
    result = trainer.run(_step, _start(), Draws(poison=frozenset({1, 3})), 5, skip_nonfinite=2, progress=False)
    assert result.skipped == 2 and int(result.state["count"]) == 3
    printed = capsys.readouterr().out
    assert "skipped step 1: non-finite loss nan (1 of at most 2)" in printed
    assert "skipped step 3: non-finite loss nan (2 of at most 2)" in printed
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 3; 2 non-finite steps were already"):
        trainer.run(_step, _start(), Draws(poison=frozenset({0, 1, 3})), 5, skip_nonfinite=2, progress=False)
