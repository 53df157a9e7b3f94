"""Real multi-process runs: the CLI as 2 processes × 2 simulated CPU devices (gloo collectives), against
one process holding the same 4-device mesh, plus kill-and-resume and the multi-process bad cases
(docs/bad-inputs.md, "Several processes"). Every child is bounded in time and killed on failure.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sparsevlm.checkpoint import load_model_dir, save_model
from sparsevlm.config import SparsitySpec
from sparsevlm.pruning import prune

ROOT = Path(__file__).resolve().parents[1]  # the checkout these tests run from: the children import it
TABLE = ROOT / "docs" / "bad-inputs.md"
ROW = re.compile(r"^\| (M\d+) \| (\w+) \| `([^`]+)` \| `([^`]+)` \|$")
LIMIT = 240  # seconds any one launch may take before its processes are killed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))}
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update({"SPARSEVLM_DISTRIBUTED_TIMEOUT": "60", "SPARSEVLM_HEARTBEAT_TIMEOUT": "10", **extra})
    return env


def _start(argvs: list[list[str]], processes: int, ids: list[int] | None = None, port: int | None = None,
           **extra: str) -> list[subprocess.Popen]:
    """`sparsevlm ARGV` as processes `ids` (default all) of a run of `processes` × 2 devices."""
    port = port or _free_port()
    children = []
    for index, argv in zip(ids if ids is not None else range(processes), argvs):
        env = _env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                   JAX_PROCESS_ID=str(index), **extra)
        children.append(subprocess.Popen([sys.executable, "-m", "sparsevlm.cli", *argv], env=env, cwd=ROOT,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return children


def _wait(children: list[subprocess.Popen], limit: float = LIMIT) -> list[tuple[int, str]]:
    """Each child's exit code and output; all of them killed if any outlives `limit` seconds."""
    deadline = time.monotonic() + limit
    results = []
    try:
        for child in children:
            out, _ = child.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append((child.returncode, out))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"a process ran past {limit} s (a hang)") from None
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return results


def _run(argv: list[str], processes: int = 2, **extra: str) -> tuple[list[tuple[int, str]], float]:
    """Every process runs `argv`; retried once on a new port if the coordinator's port was taken meanwhile."""
    for attempt in range(2):
        started = time.perf_counter()
        results = _wait(_start([argv] * processes, processes, **extra))
        if not any("Address already in use" in out for _, out in results) or attempt:
            return results, time.perf_counter() - started
    raise AssertionError("unreachable")


def _single(argv: list[str], devices: int = 4) -> tuple[tuple[int, str], float]:
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "sparsevlm.cli", *argv], env=_env(devices), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return _wait([child])[0], time.perf_counter() - started


def _final_lora(checkpoints: Path) -> tuple[int, dict]:
    """The newest checkpoint's LoRA factors as NumPy arrays, whatever topology wrote them."""
    import orbax.checkpoint as ocp

    step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    # The saved tree's structure, from orbax's own metadata file; every leaf read back as NumPy.
    tree: dict = {}
    for entry in json.loads((checkpoints / str(step) / "state" / "_METADATA").read_text())["tree_metadata"].values():
        node, keys = tree, [int(k["key"]) if k["key_type"] == 1 else k["key"] for k in entry["key_metadata"]]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)

    def lists(node):
        if not isinstance(node, dict):
            return node
        node = {k: lists(v) for k, v in node.items()}
        return [node[i] for i in range(len(node))] if node and all(isinstance(k, int) for k in node) else node

    state = ocp.PyTreeCheckpointer().restore(checkpoints / str(step) / "state",
                                             args=ocp.args.PyTreeRestore(restore_args=lists(tree)))
    from sparsevlm.tree import flatten

    return step, flatten(state["params"])


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in a)


@pytest.fixture(scope="module")
def pruned_dir(tiny_bundle, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multiprocess")
    dense = save_model(root / "dense", tiny_bundle)
    result = prune(tiny_bundle.params, tiny_bundle.config, SparsitySpec(vision=0.5, language=0.5), "magnitude")
    import dataclasses

    target = {"vision": 0.5, "connector": 0.0, "language": 0.5}
    bundle = dataclasses.replace(tiny_bundle, params=result.params, masks=result.masks, metadata={
        "pruning": {"pattern": "unstructured", "target": target, "source_model": str(dense)}})
    return save_model(root / "pruned", bundle)


def _restore_argv(pruned: Path, out: Path, steps: int = 8) -> list[str]:
    return ["restore", "--model", str(pruned), "--method", "sparselora", "--steps", str(steps), "--warmup-steps", "0",
            "--batch-size", "8", "--train-images", "16", "--checkpoint-every", "2", "--eval-images", "2",
            "--mesh", "data=2,fsdp=2", "--out", str(out)]


@pytest.fixture(scope="module")
def two_runs(pruned_dir) -> dict:
    """The same restoration as one process with 4 devices and as 2 processes × 2 devices, both timed."""
    root = pruned_dir.parent
    (code, out), one_seconds = _single(_restore_argv(pruned_dir, root / "one"))
    assert code == 0, out[-3000:]
    results, two_seconds = _run(_restore_argv(pruned_dir, root / "two"))
    for index, (code, out) in enumerate(results):
        assert code == 0, f"process {index}: {out[-3000:]}"
    print(f"\nrestore wall time: one process {one_seconds:.1f} s, two processes {two_seconds:.1f} s "
          f"({two_seconds / one_seconds:.2f}×)")
    return {"root": root, "one": root / "one", "two": root / "two", "outputs": [out for _, out in results]}


@pytest.mark.slow
def test_two_processes_restore_as_one_process_on_the_same_mesh(two_runs):
    one, two = two_runs["one"], two_runs["two"]
    step_one, lora_one = _final_lora(one.with_name("one-checkpoints"))
    step_two, lora_two = _final_lora(two.with_name("two-checkpoints"))
    assert step_one == step_two == 8 and len(lora_one) > 0
    assert _max_diff(lora_one, lora_two) <= 1e-5
    reports = [json.loads((d / "report.json").read_text()) for d in (one, two)]
    losses = [[h["loss"] for h in r["loss_history"]] for r in reports]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert reports[1]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    merged = [load_model_dir(d).params for d in (one, two)]
    from sparsevlm.tree import flatten

    assert _max_diff(flatten(merged[0]), flatten(merged[1])) <= 1e-5
    # One writer: both processes finished, nothing but the model and its report in the output, no
    # staging directories beside it, and the checkpoints written once (the newest two kept).
    assert sorted(p.name for p in two.iterdir()) == ["0", "checksums.json", "report.json"]
    assert not [p for p in two.parent.iterdir() if p.name.startswith(".two")]
    kept = sorted(int(p.name) for p in two.with_name("two-checkpoints").iterdir())
    assert kept == [6, 8]
    assert all("saved to" in out for out in two_runs["outputs"])


@pytest.mark.slow
def test_a_process_killed_mid_run_resumes_on_both_to_the_uninterrupted_factors(two_runs, pruned_dir):
    out = two_runs["root"] / "killed"
    checkpoints = out.with_name("killed-checkpoints")
    argv = _restore_argv(pruned_dir, out)
    children = _start([argv, argv], 2)
    try:
        deadline = time.monotonic() + LIMIT
        while not (checkpoints / "4" / "checksums.json").is_file():
            assert all(c.poll() is None for c in children), "a process exited before the second checkpoint"
            assert time.monotonic() < deadline, f"no second checkpoint within {LIMIT} s"
            time.sleep(0.01)
        os.kill(children[1].pid, signal.SIGKILL)
        # The survivor does not hang: it stops once the coordinator misses the dead process's heartbeats.
        survivor, _ = children[0].communicate(timeout=60)
        assert children[0].returncode != 0 and children[1].wait(timeout=10) == -signal.SIGKILL
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert not out.exists()
    written = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert 4 <= written < 8
    results, _ = _run(argv)
    for index, (code, text) in enumerate(results):
        assert code == 0, f"process {index}: {text[-3000:]}"
        assert f"resuming from step {written} of 8" in text
    step, resumed = _final_lora(checkpoints)
    _, whole = _final_lora(two_runs["two"].with_name("two-checkpoints"))
    assert step == 8 and _max_diff(resumed, whole) <= 1e-6
    reports = [json.loads((d / "report.json").read_text()) for d in (two_runs["two"], out)]
    assert reports[0]["loss_history"] == reports[1]["loss_history"]


def _bad_rows() -> list[tuple[str, str, str, str]]:
    rows = [m.groups() for m in map(ROW.match, TABLE.read_text().splitlines()) if m]
    assert [n for n, *_ in rows] == [f"M{i}" for i in range(1, len(rows) + 1)] and len(rows) >= 3
    return rows


@pytest.mark.parametrize("number,case,command,message", _bad_rows(),
                         ids=lambda v: v if re.fullmatch(r"M\d+", str(v)) else None)
def test_a_bad_multi_process_run_fails_on_every_process_with_one_line(number, case, command, message, pruned_dir,
                                                                      tmp_path):
    import shlex

    out = tmp_path / "out"
    argv = [word.replace("{pruned}", str(pruned_dir)).replace("{out}", str(out)) for word in shlex.split(command)]
    started = time.monotonic()
    if case == "missing":  # process 1 of 2 never starts
        results = _wait(_start([argv], 2, ids=[0], SPARSEVLM_DISTRIBUTED_TIMEOUT="3"), limit=60)
    elif case == "mismatched":  # process 1 was given another --steps
        other = [("3" if prev == "--steps" else word) for prev, word in zip(["", *argv], argv)]
        assert other != argv
        results = _wait(_start([argv, other], 2), limit=90)
    else:
        results, _ = _run(argv)
    for index, (code, text) in enumerate(results):
        lines = [line for line in text.splitlines() if message in line]
        assert code == 2 and lines, f"row {number}, process {index}: exit {code}, {text[-1500:]!r}"
        assert re.match(r"sparsevlm( restore)?: error: ", lines[0]), lines[0]
    assert time.monotonic() - started < 90 and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("method,pattern", [("magnitude", "unstructured"), ("wanda", "2:4"), ("sparsegpt", "2:4")])
def test_two_processes_prune_as_one_process_on_the_same_mesh(method, pattern, pruned_dir, tmp_path):
    import jax

    from sparsevlm.config import PruneConfig
    from sparsevlm.jobs import prune_job
    from sparsevlm.masks import flat_masks
    from sparsevlm.pruning.verify import verify_params
    from sparsevlm.sharding import make_mesh
    from sparsevlm.tree import flatten

    dense = pruned_dir.with_name("dense")
    flags = ["--method", method, "--pattern", pattern, "--language-sparsity", "0.5", "--calib-samples", "8",
             "--eval-images", "2"]
    results, _ = _run(["prune", "--model", str(dense), *flags, "--mesh", "fsdp=-1", "--out", str(tmp_path / "two")])
    for index, (code, out) in enumerate(results):
        assert code == 0, f"process {index}: {out[-3000:]}"
    # The reference: this process, on a mesh of 4 of its 8 devices, the same fsdp=4 layout.
    config = PruneConfig(method=method, sparsity=SparsitySpec(language=0.5, pattern=pattern), calib_samples=8)
    assert prune_job(str(dense), config, tmp_path / "one", 2, make_mesh("fsdp=-1", jax.devices()[:4])) == 0
    one, two = load_model_dir(tmp_path / "one"), load_model_dir(tmp_path / "two")
    masks_one, masks_two = flat_masks(one.masks), flat_masks(two.masks)
    assert masks_one.keys() == masks_two.keys() and len(masks_one) > 0
    if method == "sparsegpt":  # its column updates reduce in another order: masks may differ, N:M may not
        report = verify_params(two.params, two.masks, two.metadata["pruning"])
        assert report["ok"], report
        assert _max_diff(flatten(one.params), flatten(two.params)) <= 1e-4
    else:
        assert all(np.array_equal(masks_one[p], masks_two[p]) for p in masks_one)
        assert _max_diff(flatten(one.params), flatten(two.params)) == 0.0
    assert json.loads((tmp_path / "two" / "report.json").read_text())["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}


@pytest.mark.slow
def test_two_processes_pretrain_as_one_process_on_the_same_mesh(tmp_path):
    import jax

    from sparsevlm.config import PretrainConfig
    from sparsevlm.jobs import pretrain_job
    from sparsevlm.sharding import make_mesh
    from sparsevlm.tree import flatten

    settings = {"steps": 4, "warmup_steps": 1, "batch_size": 8, "train_images": 32, "vision_steps": 2,
                "vision_batch_size": 8, "checkpoint_every": 2}
    flags = [part for name, value in settings.items() for part in (f"--{name.replace('_', '-')}", str(value))]
    results, _ = _run(["pretrain", *flags, "--eval-images", "4", "--mesh", "data=2,fsdp=2", "--out",
                       str(tmp_path / "two")])
    for index, (code, out) in enumerate(results):
        assert code == 0, f"process {index}: {out[-3000:]}"
    # The reference: this process, on a mesh of 4 of its 8 devices with the same layout.
    assert pretrain_job(PretrainConfig(**settings), tmp_path / "one", mesh=make_mesh("data=2,fsdp=2", jax.devices()[:4]),
                        eval_images=4) == 0
    one, two = load_model_dir(tmp_path / "one"), load_model_dir(tmp_path / "two")
    assert two.metadata["loss_history"][-1]["loss"] == pytest.approx(one.metadata["loss_history"][-1]["loss"], rel=1e-5)
    assert _max_diff(flatten(one.params), flatten(two.params)) <= 1e-5
    assert sorted(p.name for p in (tmp_path / "two-checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
