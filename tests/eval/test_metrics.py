"""Answer normalisation and exact match."""

from __future__ import annotations

import pytest

from sparsevlm.eval.metrics import exact_match, normalize_answer


@pytest.mark.parametrize(
    "raw,normal",
    [("Red", "red"), ("  the circle. ", "circle"), ("A  Blue-Square", "blue square"), ("yes!", "yes"), ("an orange", "orange")],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_exact_match():
    assert exact_match(["Red", "two", "no"], ["red", "three", "No."]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])
