"""The HF-loading memory benchmark runs end to end at its quick size and writes both loaders' figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_hf_load_benchmark_quick_reports_both_loaders(tmp_path):
    out = tmp_path / "hf_load.json"
    # The benchmark runs as users run it: one real device, not the tests' simulated eight.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "hf_load.py"), "--quick", "--dir", str(tmp_path / "llava"),
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "hf_load" and report["quick"] is True and report["built"] is True
    assert {"platform", "device", "cpu_count", "jax", "jaxlib", "flax", "numpy", "load_average_1m"} <= set(report)
    checkpoint = report["checkpoint"]
    # transformers sharded it (the index and several files), and the bytes come from the headers.
    assert checkpoint["shards"] >= 2 and (tmp_path / "llava" / "model.safetensors.index.json").is_file()
    assert checkpoint["tensor_bytes"] > 0 and checkpoint["file_mib"] >= checkpoint["tensor_mib"]
    rows = {r["loader"]: r for r in report["results"]}
    assert set(rows) == {"sparsevlm", "transformers"}
    for r in rows.values():
        assert r["baseline_mib"] > 0 and r["load_s"] > 0
        assert 0 <= r["peak_growth_mib"] <= r["touched_peak_growth_mib"]
        assert r["peak_mib"] == pytest.approx(r["baseline_mib"] + r["peak_growth_mib"], abs=0.2)
        assert r["peak_ratio"] == pytest.approx(r["peak_growth_mib"] * 2**20 / checkpoint["tensor_bytes"], abs=2e-3)
        assert r["touched_peak_ratio"] >= r["peak_ratio"]
    # Our loader holds every weight once loaded; both read the same weights.
    assert rows["sparsevlm"]["retained_growth_mib"] * 2**20 >= checkpoint["tensor_bytes"]
    assert rows["sparsevlm"]["checksum"] == pytest.approx(rows["transformers"]["checksum"], rel=1e-4)
    assert report["target_ratio"] == 1.3
    assert report["meets_target"] == (rows["sparsevlm"]["peak_ratio"] < 1.3)
    assert "peak / ckpt" in proc.stdout and "transformers" in proc.stdout
