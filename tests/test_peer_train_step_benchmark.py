"""The SparseLoRA step against the PyTorch peer runs end to end at its quick size; both sides do the same job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_peer_train_step_benchmark_quick_agrees_on_the_first_loss_and_the_gradients(tmp_path):
    out = tmp_path / "peer_train_step.json"
    # The benchmark runs as users run it: one real device, not the tests' simulated eight.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "peer_train_step.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "peer_train_step" and report["quick"] is True and report["built"] is True
    assert report["config"] == "quick" and report["sizes"]["width"] == 128
    assert {"platform", "device", "cpu_count", "jax", "jaxlib", "flax", "numpy", "load_average_1m"} <= set(report)
    assert report["kl_weight"] == 0.1 and report["ranks"] == {"vision": 4, "connector": 2, "language": 8}
    # Quick LLaVA: CLIP uses 1 of its 2 layers (6 adapted linears), the projector 2, Llama 2 × 7.
    assert report["lora_modules"] == 6 + 2 + 14 and report["masked_weights"] == 6 + 14
    assert report["kept_fraction"] == 0.5

    # Same weights, masks and batch, B = 0: the first step's loss is the pruned model's on both sides.
    assert report["loss_abs_diff"] == pytest.approx(abs(report["loss_ours"] - report["loss_peer"]))
    assert report["loss_abs_diff"] <= 1e-4 * abs(report["loss_peer"])
    # With B ≠ 0 (a shared LoRA state), every factor's gradient (A's too) agrees with PEFT's: measured ~1e-6.
    assert report["grad_factors"] == 2 * report["lora_modules"] and report["grad_zero_factors"] == 0
    assert report["grad_rel_diff"] <= 1e-4
    assert report["loss_at_state_ours"] == pytest.approx(report["loss_at_state_peer"], rel=1e-5)
    assert abs(report["loss_at_state_ours"] - report["loss_ours"]) > 1e-4  # the LoRA term did change the loss

    rows = {r["side"]: r for r in report["results"]}
    assert set(rows) == {"ours", "peer"}
    assert rows["ours"]["first_loss"] == report["loss_ours"] and rows["peer"]["first_loss"] == report["loss_peer"]
    assert rows["ours"]["trainable_params"] == rows["peer"]["trainable_params"] > 0
    tokens = rows["ours"]["batch_size"] * rows["ours"]["sequence_length"]
    for r in rows.values():
        assert r["mode"] == "sparselora" and r["dtype"] == "float32"
        assert 0 < r["step_ms_min"] <= r["step_ms_median"] <= r["step_ms_max"]
        assert r["tokens_per_s"] == pytest.approx(tokens / (r["step_ms_median"] / 1000), rel=1e-2)
        assert r["model_tflops_per_s"] > 0 and r["mfu"] is None  # float32 on a CPU: no peak to compare with
        assert r["peak_mib"] > 0 and r["peak_memory_kind"] == "rss"
        assert r["rss"]["step_peak_mib"] == pytest.approx(r["rss"]["held_mib"] + r["rss"]["step_growth_mib"], abs=0.2)
    memory = rows["ours"]["xla_memory"]
    assert memory["argument_mib"] > 0 and memory["temp_mib"] > 0

    ratios = report["ratios"]
    assert ratios["step_time"] == pytest.approx(rows["ours"]["step_ms_median"] / rows["peer"]["step_ms_median"])
    assert ratios["peak_memory"] == pytest.approx(rows["ours"]["peak_mib"] / rows["peer"]["peak_mib"])
    assert rows["peer"]["vs_peer"] == 1.0 and rows["ours"]["vs_peer"] == pytest.approx(ratios["step_time"], abs=1e-3)
    assert "x peer" in proc.stdout and "first-step loss" in proc.stdout and "gradients at a shared" in proc.stdout
