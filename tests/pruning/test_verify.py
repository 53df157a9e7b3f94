"""verify_params / verify_model on the tiny VLM: sparsity, N:M validity and mask violations from the weights."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from sparsevlm.checkpoint import save_model
from sparsevlm.config import SparsitySpec
from sparsevlm.jobs import verify_model
from sparsevlm.masks import prunable_paths
from sparsevlm.pruning import prune
from sparsevlm.pruning.verify import format_verify, n_of_m_valid, verify_params
from sparsevlm.tree import flatten, unflatten

HALF_2_4 = SparsitySpec.same(0.5, "2:4")
HALF = SparsitySpec.same(0.5)


def _claim(spec: SparsitySpec) -> dict:
    # What prune_job records in metadata["pruning"].
    return {"method": "magnitude", "pattern": spec.pattern, "target": spec.targets, "measured": None,
            "calibration": None, "seed": 0, "source_model": None}


@pytest.fixture(scope="module")
def pruned_2_4(tiny_bundle):
    return prune(tiny_bundle.params, None, HALF_2_4, "magnitude")


@pytest.fixture(scope="module")
def pruned_half(tiny_bundle):
    return prune(tiny_bundle.params, None, HALF, "magnitude")


def test_n_of_m_valid_on_hand_worked_kernels():
    # Groups of 4 consecutive inputs (rows of an [in, out] kernel) per output column.
    kernel = np.array([[0, 1], [0, 1], [1, 0], [1, 0], [1, 1], [0, 0], [1, 0], [0, 1]], np.float32)
    assert n_of_m_valid(kernel, "2:4")
    assert n_of_m_valid(kernel, "4:8")
    assert not n_of_m_valid(kernel, "1:4")
    # Zeros grouped along the outputs (the wrong axis) do not make an input-axis 2:4 kernel.
    along_outputs = np.tile(np.array([[0, 0, 1, 1]], np.float32), (4, 1))
    assert not n_of_m_valid(along_outputs, "2:4") and n_of_m_valid(along_outputs.T, "2:4")
    # 4:8 allows all four zeros in one half; 2:4 does not.
    lopsided = np.array([[0], [0], [0], [0], [1], [1], [1], [1]], np.float32)
    assert n_of_m_valid(lopsided, "4:8") and not n_of_m_valid(lopsided, "2:4")
    assert not n_of_m_valid(np.zeros((6, 2)), "2:4")  # 6 inputs cannot tile groups of 4
    with pytest.raises(ValueError, match="not an N:M pattern"):
        n_of_m_valid(kernel, "unstructured")


def test_verify_2_4_pruned_model(tiny_bundle, pruned_2_4):
    report = verify_params(pruned_2_4.params, pruned_2_4.masks, _claim(HALF_2_4))
    towers = report["towers"]
    assert {t: towers[t]["sparsity"] for t in towers} == {"vision": 0.5, "connector": 0.0, "language": 0.5}
    assert towers["vision"]["n_of_m"] == {"2:4": True, "4:8": True}  # 2:4 implies 4:8
    assert towers["language"]["n_of_m"] == {"2:4": True, "4:8": True}
    assert towers["connector"]["n_of_m"] == {"2:4": None, "4:8": None}  # nothing pruned there
    assert (towers["vision"]["layers"], towers["vision"]["pruned_layers"]) == (12, 12)
    assert (towers["connector"]["layers"], towers["connector"]["pruned_layers"]) == (2, 0)
    for path, layer in report["layers"].items():
        dense = path.startswith("connector/")
        assert layer["sparsity"] == (0.0 if dense else 0.5), path
        assert layer["n_of_m"]["2:4"] is not dense, path
        assert layer["mask_violations"] == 0
    assert set(report["layers"]) == set(prunable_paths(tiny_bundle.params))
    assert [(c["tower"], c["ok"], c["n_of_m_valid"]) for c in report["claims"]] == [
        ("vision", True, True), ("language", True, True)]
    assert report["ok"] and report["failures"] == []
    assert json.loads(json.dumps(report)) == report
    # 2:4 implies 4:8, so a 4:8 claim holds too; a 1:4 claim is checked although not a default pattern.
    assert verify_params(pruned_2_4.params, claimed=_claim(SparsitySpec.same(0.5, "4:8")))["ok"]
    one_of_four = verify_params(pruned_2_4.params, claimed=_claim(SparsitySpec.same(0.75, "1:4")))
    assert one_of_four["patterns"] == ["2:4", "4:8", "1:4"] and not one_of_four["ok"]
    assert one_of_four["towers"]["vision"]["n_of_m"]["1:4"] is False


def test_verify_unstructured_model_and_a_false_2_4_claim(pruned_half):
    report = verify_params(pruned_half.params, pruned_half.masks, _claim(HALF))
    assert report["ok"]
    assert report["towers"]["language"]["sparsity"] == 0.5
    # Per-output 50% magnitude pruning is not 2:4 (the zeros are not spread evenly over groups of 4).
    assert report["towers"]["language"]["n_of_m"]["2:4"] is False
    assert all(c["ok"] for c in report["claims"])

    lie = verify_params(pruned_half.params, pruned_half.masks, _claim(HALF_2_4))
    assert not lie["ok"]
    assert [(c["tower"], c["ok"], c["n_of_m_valid"]) for c in lie["claims"]] == [
        ("vision", False, False), ("language", False, False)]
    assert len(lie["failures"]) == 2 and all("break 2:4" in f for f in lie["failures"])
    assert "FAILED  vision claims 2:4" in format_verify(lie)


def test_verify_unstructured_claim_allows_only_rounding(tiny_bundle):
    # 0.3 of 32 inputs prunes 9 of each output, of 64 inputs 19: a faithful prune measures below 0.3 - 1e-3.
    # Per language block: q, o 32x32, k, v 32x16, up, gate 32x64 (7168 weights) and down 64x32 (2048).
    spec = SparsitySpec(language=0.3)
    pruned = prune(tiny_bundle.params, None, spec, "magnitude")
    report = verify_params(pruned.params, pruned.masks, _claim(spec))
    (claim,) = report["claims"]
    assert claim["measured"] == claim["achievable"] == (7168 * 9 / 32 + 2048 * 19 / 64) / 9216
    assert report["ok"]
    # Claiming more than was pruned fails.
    overclaim = verify_params(pruned.params, pruned.masks, _claim(SparsitySpec(language=0.4)))
    assert not overclaim["ok"]
    assert overclaim["failures"] == [
        "language claims unstructured at sparsity 0.4: measured sparsity 0.2847 < claimed 0.4"]


def test_a_weight_nonzero_where_its_mask_prunes_is_a_violation(pruned_2_4):
    flat = dict(flatten(pruned_2_4.params))
    path = "language/blocks_1/mlp/down/kernel"
    mask = np.asarray(flatten(pruned_2_4.masks)[path])
    kernel = flat[path].copy()
    rows, cols = np.nonzero(~mask)
    kernel[rows[0], cols[0]] = 0.25
    kernel[rows[1], cols[1]] = np.nan  # NaN is not zero either
    flat[path] = kernel
    report = verify_params(unflatten(flat), pruned_2_4.masks, _claim(HALF_2_4))
    assert report["layers"][path]["mask_violations"] == 2
    assert report["towers"]["language"]["mask_violations"] == 2
    assert report["towers"]["vision"]["mask_violations"] == 0
    assert not report["ok"]
    assert any("language: 2 weights are nonzero where the mask prunes them" == f for f in report["failures"])
    # Two extra nonzeros also break 2:4 in their groups (each group held exactly two zeros).
    assert report["layers"][path]["n_of_m"]["2:4"] is False


def test_verify_without_masks_or_claim_reports_only(tiny_bundle):
    report = verify_params(tiny_bundle.params)
    assert report["ok"] and report["claims"] == [] and not report["masks_checked"]
    assert {t: s["sparsity"] for t, s in report["towers"].items()} == {"vision": 0.0, "connector": 0.0, "language": 0.0}
    assert all(s["mask_violations"] is None and s["pruned_layers"] == 0 for s in report["towers"].values())
    with pytest.raises(ValueError, match="no 'target'"):
        verify_params(tiny_bundle.params, claimed={"pattern": "2:4"})
    with pytest.raises(ValueError, match="must be N:M, got 'unstructured'"):
        verify_params(tiny_bundle.params, patterns=("2:4", "unstructured"))


def test_verify_model_round_trip(tiny_bundle, pruned_2_4, tmp_path):
    metadata = {"pruning": _claim(HALF_2_4)}
    bundle = dataclasses.replace(tiny_bundle, params=pruned_2_4.params, masks=pruned_2_4.masks, metadata=metadata)
    save_model(tmp_path / "pruned", bundle)
    report = verify_model(tmp_path / "pruned")
    assert report["ok"] and report["masks_checked"]
    assert report["towers"] == verify_params(pruned_2_4.params, pruned_2_4.masks, _claim(HALF_2_4))["towers"]
    assert [c["tower"] for c in report["claims"]] == ["vision", "language"]
    text = format_verify(report)
    lines = text.splitlines()
    assert lines[0].split() == ["tower", "sparsity", "2:4", "4:8", "mask", "violations"]
    assert lines[1].split() == ["vision", "0.5000", "yes", "yes", "0"]
    assert lines[2].split() == ["connector", "0.0000", "-", "-", "0"]
    assert lines[-1] == "verify: OK"
    assert json.loads(json.dumps(report)) == report

    # A model that claims 2:4 but whose saved weights are unstructured fails, through the same path.
    lying = dataclasses.replace(bundle, params=prune(tiny_bundle.params, None, HALF, "magnitude").params, masks=None)
    save_model(tmp_path / "lying", lying)
    report = verify_model(tmp_path / "lying")
    assert not report["ok"] and not report["masks_checked"]
    assert format_verify(report).splitlines()[-1] == "verify: FAILED (2 problems)"

    # LoRA restoration without remasking densifies on purpose: the recorded pruning is then history.
    restored = dataclasses.replace(lying, metadata=metadata | {"restoration": {"method": "lora", "remask": False}})
    save_model(tmp_path / "restored", restored)
    report = verify_model(tmp_path / "restored")
    assert report["ok"] and report["claims"] == [] and "dense LoRA" in report["note"]
    assert report["towers"]["language"]["sparsity"] == 0.5
