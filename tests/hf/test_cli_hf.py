"""`sparsevlm prune / restore / evaluate / export` on local HF checkpoints, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from sparsevlm.cli import main
from sparsevlm.hub import load_model
from tests.hf.test_families import FAMILIES, _inputs, _mask, _ours, _theirs


@pytest.mark.slow
@pytest.mark.parametrize("family, method", [("llava-llama", "wanda"), ("instructblip-flant5", "dsnot")])
def test_prune_restore_export_through_the_cli(family, method, hf_dirs, tmp_path, capsys):
    """Wanda or DSnoT 2:4 → SparseLoRA (2 steps) → export: PyTorch loads the same logits and the same zeros."""
    source = str(hf_dirs(family))
    pruned, restored, exported = (str(tmp_path / name) for name in ("pruned", "restored", "exported"))
    common = ["--eval-images", "4", "--seed", "0"]
    assert main(["prune", "--model", source, "--method", method, "--pattern", "2:4", "--vision-sparsity", "0.5",
                 "--connector-sparsity", "0.5", "--language-sparsity", "0.5", "--calib-samples", "8",
                 "--out", pruned, *common]) == 0
    report = json.loads((tmp_path / "pruned" / "report.json").read_text())
    assert report["measured"]["language"] >= 0.5 and report["calibration"]["samples"] == 8
    assert main(["restore", "--model", pruned, "--method", "sparselora", "--steps", "2", "--warmup-steps", "1",
                 "--batch-size", "4", "--train-images", "8", "--out", restored, *common]) == 0
    assert main(["evaluate", "--model", restored, "--limit", "4", "--json", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["n"] > 0
    assert main(["export", "--model", restored, "--out", exported]) == 0

    bundle = load_model(restored)
    model = getattr(transformers, FAMILIES[family][0]).from_pretrained(exported).eval()
    inputs = _inputs(bundle.processor, FAMILIES[family][1])
    assert np.abs(_ours(bundle, inputs) - _theirs(model, inputs))[_mask(bundle, inputs)].max() <= 1e-4
    # Restoration changed the kept weights but not the pattern: every pruned HF weight keeps ≥ 2 zeros per 4.
    original = getattr(transformers, FAMILIES[family][0]).from_pretrained(source).state_dict()
    changed = 0
    for name, weight in model.state_dict().items():
        if name.endswith(("fc1.weight", "down_proj.weight", "wo.weight", "dense.weight")) and weight.ndim == 2:
            groups = weight.numpy().reshape(weight.shape[0], -1, 4)
            if (groups == 0).any():
                assert ((groups == 0).sum(-1) >= 2).all(), name
                changed += int(not torch.equal(torch.where(weight == 0, 0, original[name]), weight))
    assert changed > 0


def test_hub_name_that_cannot_be_fetched_is_a_one_line_error(tmp_path):
    import os
    import subprocess
    import sys

    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "sparsevlm.cli", "evaluate", "--model", "no-such-org/no-such-model"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not fetch 'no-such-org/no-such-model' from the Hugging Face hub" in lines[0]
