"""Benchmark scripts run end to end at small sizes and write the JSON they promise (timings are not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsevlm.checkpoint import save_model
from sparsevlm.pruning import METHODS, prunable_paths

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_prune_benchmark_quick_on_a_saved_model(tiny_bundle, tmp_path):
    model = save_model(tmp_path / "model", tiny_bundle)
    out = tmp_path / "bench.json"
    # The benchmark runs as users run it: one real device, not the tests' simulated eight.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "prune.py"), "--quick", "--model", str(model), "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "prune" and report["quick"] is True
    assert report["layer"] == {"shape": [512, 512], "tokens": 256}
    assert {"platform", "device", "cpu_count", "jax", "jaxlib", "flax", "numpy"} <= set(report)
    rows = report["results"]
    towers_linears = sum(not p.startswith("connector/") for p in prunable_paths(tiny_bundle.params))
    for scope in ("model", "layer"):
        for pattern in ("unstructured", "2:4"):
            found = {r["method"]: r for r in rows if r["scope"] == scope and r["pattern"] == pattern}
            assert set(found) == set(METHODS), (scope, pattern)
            assert found["magnitude"]["vs_magnitude"] == 1.0
    assert {r["method"] for r in rows if r["pattern"] == "-"} == {"stats:sq_norm", "stats:hessian"}
    for r in rows:
        assert r["median_s"] > 0 and r["min_s"] <= r["median_s"] <= r["max_s"] and r["first_s"] > 0
        if r["scope"] == "model":
            assert r["layers"] == towers_linears
            assert r["measured_sparsity"] == {"vision": 0.5, "language": 0.5}
        elif r["pattern"] != "-":
            assert r["shape"] == [512, 512] and r["kept_fraction"] == 0.5
    assert "median s" in proc.stdout and "sparsegpt" in proc.stdout
