"""The one training loop: a jit-compiled train step over a batch stream, with resume, a non-finite
guard, loss history, checkpoints every N steps and hooks at a cadence.

Pretraining (both stages) and restoration are each a step function (`train.make_train_step`), a
stream and a call to `run`; the loop is written once, here.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from sparsevlm.checkpoint import TrainingCheckpoints

PyTree = Any


class Stream(Protocol):
    """Batches without end, whose position (random generator included) can be saved and restored exactly."""

    def __next__(self) -> Any: ...

    def state(self) -> dict[str, Any]:
        """JSON-serialisable position."""
        ...

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state()`."""
        ...


class NonFiniteGuard:
    """Host-side check of every step: stop at a non-finite loss or gradient, or skip up to `max_skipped` such steps.

    The jit steps already leave the state unchanged on a non-finite step (`train.keep_if_finite`), so
    a skipped step costs one batch and nothing else.
    """

    def __init__(self, max_skipped: int = 0, skipped: int = 0) -> None:
        if max_skipped < 0:
            raise ValueError(f"max_skipped={max_skipped} must be >= 0")
        self.max_skipped, self.skipped = max_skipped, skipped

    def check(self, metrics: Mapping[str, Any], step: int, where: str = "",
              last_good: Callable[[], str] | None = None) -> bool:
        """True if this step was non-finite and skipped; raises FloatingPointError past the allowance.

        `last_good()` (asked only when stopping) describes the checkpoint the user can go back to.
        """
        loss, grad_norm = (float(x) for x in jax.device_get((metrics["loss"], metrics["grad_norm"])))
        if np.isfinite(loss) and np.isfinite(grad_norm):
            return False
        what = f"loss {loss}" if not np.isfinite(loss) else f"gradient norm {grad_norm}"
        self.skipped += 1
        if self.skipped <= self.max_skipped:
            print(f"skipped step {step}{where}: non-finite {what} ({self.skipped} of at most {self.max_skipped})")
            return True
        allowance = f"; {self.skipped - 1} non-finite steps were already skipped" if self.max_skipped else ""
        kept = last_good() if last_good is not None else ""
        raise FloatingPointError(f"non-finite {what} at step {step}{where}{allowance}{kept}")


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(steps_done, state)` after every `every`-th optimizer step (skipped steps do not count)."""

    every: int
    fn: Callable[[int, PyTree], None]


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """The final state, the recorded metrics, how many steps were skipped, and the wall time of the whole run.

    `seconds` includes the time spent before a resume (saved with the checkpoints).
    """

    state: PyTree
    history: list[dict[str, float]]
    skipped: int
    seconds: float


def run(
    step: Callable[..., tuple[PyTree, Mapping[str, Any]]],
    state: PyTree,
    stream: Stream | Iterator[Any],
    steps: int,
    *,
    inputs: Sequence[PyTree] = (),
    place: Callable[[Any], Any] = lambda batch: batch,
    accumulate: int | None = None,
    checkpoints: TrainingCheckpoints | None = None,
    checkpoint_every: int = 0,
    skip_nonfinite: int = 0,
    log_every: int = 10,
    hooks: Sequence[Hook] = (),
    desc: str = "train",
    progress: bool = True,
) -> TrainResult:
    """Run `state, metrics = step(state, place(next(stream)), *inputs)` until `steps` optimizer steps are done.

    With `accumulate` each step call is a micro-batch and an optimizer step takes `accumulate` of
    them (history and messages then name micro-batches too). With `checkpoints`, the newest
    checkpoint there is resumed from (state, the stream's position, skipped count, history and
    time), one is written every `checkpoint_every` optimizer steps, and one at the end. Metrics are
    recorded every `log_every` calls and at the last; a non-finite step stops the run, naming the last
    good checkpoint, unless `skip_nonfinite` allows skipping it.
    """
    per_step = accumulate or 1
    guard = NonFiniteGuard(skip_nonfinite)
    history: list[dict[str, float]] = []
    done, earlier = 0, 0.0
    resumed = checkpoints.load_latest(state) if checkpoints is not None else None
    if resumed is not None:
        done, state, extra = resumed
        stream.load_state(extra["data"])
        guard.skipped, history, earlier = extra["skipped"], extra["history"], extra.get("seconds", 0.0)
        print(f"resuming from step {done} of {steps} ({checkpoints.directory})")
    started = time.perf_counter()
    last_good = checkpoints.describe_latest if checkpoints is not None else None

    def save(steps_done: int) -> None:
        extra = {"data": stream.state(), "skipped": guard.skipped, "history": history,
                 "seconds": earlier + time.perf_counter() - started}
        checkpoints.save(steps_done, state, extra)

    total = steps * per_step
    bar = tqdm(range(done * per_step, total), desc=desc, disable=not progress, mininterval=1.0,
               initial=done * per_step, total=total)
    for call in bar:
        state, metrics = step(state, place(next(stream)), *inputs)
        optimizer_step = call // per_step
        # One scalar sync per step: a non-finite step left the state as it was, and either stops the run
        # (no checkpoint is written after it) or is skipped and counted.
        where = f" (micro-batch {call})" if accumulate is not None else ""
        if guard.check(metrics, optimizer_step, where, last_good):
            continue
        if call % log_every == 0 or call == total - 1:
            record = {k: float(v) for k, v in metrics.items() if k != "tokens"}
            record["step"] = optimizer_step
            if accumulate is not None:
                record["micro_step"] = call
            history.append(record)
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k not in ("step", "micro_step")})
        if (call + 1) % per_step:
            continue
        done = optimizer_step + 1
        for hook in hooks:
            if done % hook.every == 0:
                hook.fn(done, state)
        if checkpoints is not None and checkpoint_every and done % checkpoint_every == 0 and done < steps:
            save(done)
    if checkpoints is not None:
        if checkpoints.latest_step() != steps:
            save(steps)
        checkpoints.close()
    return TrainResult(state, history, guard.skipped, earlier + time.perf_counter() - started)
