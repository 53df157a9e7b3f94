"""Answer metrics: exact match, official VQA accuracy, GQA accuracy, CIDEr-D (against a dense re-computation)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sparsevlm.eval.metrics import (
    caption_tokens,
    cider_d,
    exact_match,
    gqa_accuracy,
    gqa_normalize,
    normalize_answer,
    vqa_accuracy,
    vqa_answer_normalize,
    vqa_score,
)


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


# --- official VQA accuracy -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,normal",
    [
        ("two", "2"),  # number words become digits...
        ("Ten", "10"),
        ("none", "0"),  # ...and the official map also has "none" -> "0"
        ("a dog", "dog"),  # articles dropped
        ("The Dog", "dog"),  # lower-cased before the article test
        ("dont", "don't"),  # contractions table
        ("cant", "can't"),
        ("don't", "don't"),  # the apostrophe is not in the punctuation list, so "dont" and "don't" meet
        # digit,digit anywhere: every punctuation mark is deleted, not spaced, so 1,000 stays one number
        ("1,000", "1000"),
        ("red, white", "red white"),  # ", " touches a space: deleted
        ("red,white", "red white"),  # no space, no digit-comma-digit: replaced by a space
        ("3.5", "3.5"),  # a period followed by a digit stays
        (".5", ".5"),
        ("yes.", "yes"),  # trailing period stripped
        ("e.g.", "eg"),
        ("  two\tdogs\n", "2 dogs"),  # tabs/newlines -> spaces, outer whitespace stripped
        ("yes!", "yes"),  # '!' touches nothing: replaced by a space, then stripped by the word split
        ("t-shirt", "t shirt"),  # '-' is punctuation, not next to a space: becomes a space
        ("12:30", "12:30"),  # ':' is not in the list
        ("what?", "what"),
    ],
)
def test_vqa_answer_normalize(raw, normal):
    assert vqa_answer_normalize(raw) == normal


def test_vqa_normalize_keeps_legacy_normalize_answer():
    # The built-in shapes evaluation relies on the simple normaliser; the VQA one must not replace it.
    assert normalize_answer("an orange") == "orange"
    assert vqa_answer_normalize("an orange") == "orange"
    assert normalize_answer("3.5") == "3 5"
    assert vqa_answer_normalize("3.5") == "3.5"


# m of 10 annotators agree with the prediction. Leaving out one of the m agreeing annotators leaves m - 1 matches,
# leaving out one of the 10 - m others leaves m; each subset scores min(matches / 3, 1):
#   m=0:  0
#   m=1:  (1*min(0/3,1) + 9*min(1/3,1)) / 10 = 3/10              = 0.3
#   m=2:  (2*(1/3) + 8*(2/3)) / 10          = (2/3 + 16/3) / 10   = 0.6
#   m=3:  (3*(2/3) + 7*1) / 10              = (2 + 7) / 10        = 0.9
#   m=4:  (4*1 + 6*1) / 10                                        = 1.0
#   m=10: (10*1) / 10                                             = 1.0
@pytest.mark.parametrize("agree,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_agreement(agree, expected):
    answers = ["2"] * agree + ["3"] * (10 - agree)
    assert vqa_accuracy("two", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_fewer_answers_same_formula():
    # 3 answers, all agreeing: each leave-one-out subset has 2 matches -> 2/3; best reachable with k < 4.
    assert vqa_accuracy("yes", ["yes", "yes", "yes"]) == pytest.approx(2 / 3)
    # 5 answers, 2 agree: (2*(1/3) + 3*(2/3)) / 5 = (2/3 + 2) / 5 = 8/15.
    assert vqa_accuracy("yes", ["yes", "yes", "no", "no", "maybe"]) == pytest.approx(8 / 15)


def test_vqa_accuracy_ground_truth_processing_is_official():
    # Differing answers get processPunctuation only: "yes." -> "yes" (3 matches, 7 others -> 0.9).
    assert vqa_accuracy("yes", ["yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)
    # Identical answers are left untouched, so "yes." never equals the normalised prediction "yes".
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0
    # No digit/article processing on the answers: a raw "two" does not match the prediction "two" (-> "2").
    assert vqa_accuracy("two", ["two"] * 5 + ["3"] * 5) == 0.0
    assert vqa_accuracy("the dog", ["dog"] * 10) == 1.0


def test_vqa_score():
    predictions = ["Two.", "a cat", "yes"]
    answers = [["2"] * 10, ["cat"] * 2 + ["dog"] * 8, ["no"] * 10]
    assert vqa_score(predictions, answers) == pytest.approx((1.0 + 0.6 + 0.0) / 3)


def test_vqa_bad_input():
    with pytest.raises(ValueError, match="2 predictions for 1 answer lists"):
        vqa_score(["a", "b"], [["a"] * 10])
    with pytest.raises(ValueError, match="at least one prediction"):
        vqa_score([], [])
    with pytest.raises(ValueError, match="question 1: .*at least 2 human answers, got 0"):
        vqa_score(["a", "b"], [["a"] * 10, []])
    with pytest.raises(ValueError, match="at least 2 human answers, got 1"):
        vqa_accuracy("a", ["a"])
    with pytest.raises(ValueError, match="sequence of strings"):
        vqa_accuracy("yes", "yes")


# --- GQA ---------------------------------------------------------------------------------------------------------


def test_gqa():
    assert gqa_normalize("  Yes. ") == "yes"
    assert gqa_normalize("T-shirt!") == "t-shirt"
    assert gqa_accuracy(["Yes.", "left", "the red one"], ["yes", "right", "red one"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="1 predictions for 2 answers"):
        gqa_accuracy(["yes"], ["yes", "no"])
    with pytest.raises(ValueError, match="at least one prediction"):
        gqa_accuracy([], [])


# --- CIDEr-D -----------------------------------------------------------------------------------------------------

_REFERENCES = {
    "img1": ["a man riding a horse on a beach", "a person rides a horse near the ocean", "man on a horse by the sea"],
    "img2": ["two dogs playing with a ball", "a pair of dogs chase a red ball", "dogs play in the grass"],
    "img3": ["a plate of food with broccoli", "a white plate topped with broccoli and rice", "food on a plate"],
    "img4": ["a red bus driving down a street", "a double decker bus on the road", "a bus parked by the curb",
             "a red bus on a city street"],
    "img5": ["a cat sleeping on a couch", "a cat curled up on a sofa"],
}
_CANDIDATES = {
    "img1": "a man riding a horse on the beach",
    "img2": "dogs dogs dogs play with a ball ball",  # repeats beyond the references' counts: clipping matters
    "img3": "plate",  # one word: no bigrams or longer, length penalty
    "img4": "a red bus on a city street near the curb in the rain",
    "img5": "a cat on a couch",
}


def _dense_cider_d(candidates, references, sigma=6.0):
    """CIDEr-D from its definition with dense (sentence x n-gram) count matrices, one per order n."""
    images = sorted(references)
    tokens = {key: (candidates[key].split(), [r.split() for r in references[key]]) for key in images}
    scores = {}
    mean_over_n = np.zeros(len(images))
    for n in range(1, 5):
        grams = lambda words: [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]  # noqa: E731
        vocab = sorted({g for c, refs in tokens.values() for s in [c, *refs] for g in grams(s)})
        column = {g: j for j, g in enumerate(vocab)}

        def count_row(words):
            row = np.zeros(len(vocab))
            for g in grams(words):
                row[column[g]] += 1
            return row

        cand = np.stack([count_row(tokens[k][0]) for k in images])
        refs = [np.stack([count_row(r) for r in tokens[k][1]]) for k in images]
        # df: in how many images' reference sets an n-gram occurs at all.
        df = np.sum(np.stack([(r.sum(axis=0) > 0) for r in refs]), axis=0)
        idf = np.log(len(images)) - np.log(np.maximum(df, 1.0))
        for i, key in enumerate(images):
            g = cand[i] * idf
            per_ref = []
            for j, r_counts in enumerate(refs[i]):
                r = r_counts * idf
                denominator = np.linalg.norm(g) * np.linalg.norm(r)
                cosine = 0.0 if denominator == 0 else float(np.minimum(g, r) @ r) / denominator
                # Length = bigram count (the official code's), i.e. max(words - 1, 0).
                delta = max(len(tokens[key][0]) - 1, 0) - max(len(tokens[key][1][j]) - 1, 0)
                per_ref.append(cosine * math.exp(-delta**2 / (2 * sigma**2)))
            mean_over_n[i] += np.mean(per_ref) / 4
    for i, key in enumerate(images):
        scores[key] = 10 * mean_over_n[i]
    return float(np.mean(mean_over_n) * 10), scores


def test_cider_d_matches_dense_recomputation():
    corpus, per_image = cider_d(_CANDIDATES, _REFERENCES)
    expected_corpus, expected = _dense_cider_d(_CANDIDATES, _REFERENCES)
    assert set(per_image) == set(_REFERENCES)
    for key in expected:
        assert per_image[key] == pytest.approx(expected[key], abs=1e-6), key
    assert corpus == pytest.approx(expected_corpus, abs=1e-6)
    assert per_image["img1"] > per_image["img3"] > 0


def test_cider_d_identical_high_unrelated_zero():
    same = {"img1": "a horse on a beach", "img2": "two dogs with a ball", "img3": "broccoli on a plate",
            "img4": "a red bus in the street"}
    references = {key: [caption] * 3 for key, caption in same.items()}
    _, per_image = cider_d(same, references)
    # Identical: every cosine is 1, no length penalty, so 10 * (mean over n of 1) = 10 when all orders exist.
    assert all(score == pytest.approx(10.0) for score in per_image.values())
    unrelated = dict(same, img1="quantum chromodynamics lecture notes")
    _, per_image = cider_d(unrelated, references)
    assert per_image["img1"] == 0.0


def test_cider_d_tokenisation():
    assert caption_tokens("A Man, riding a horse.") == ["a", "man", "riding", "a", "horse"]
    punctuated = {key: value.capitalize() + "." for key, value in _CANDIDATES.items()}
    assert cider_d(punctuated, _REFERENCES) == cider_d(_CANDIDATES, _REFERENCES)


def test_cider_d_bad_input():
    with pytest.raises(ValueError, match="candidate ids without references: \\['img9'\\]"):
        cider_d(dict(_CANDIDATES, img9="a cat"), _REFERENCES)
    with pytest.raises(ValueError, match="reference ids without a candidate: \\['img5'\\]"):
        cider_d({k: v for k, v in _CANDIDATES.items() if k != "img5"}, _REFERENCES)
    with pytest.raises(ValueError, match="references\\['img2'\\] must be a non-empty list"):
        cider_d(_CANDIDATES, dict(_REFERENCES, img2=[]))
    with pytest.raises(ValueError, match="references\\['img2'\\] must be a non-empty list"):
        cider_d(_CANDIDATES, dict(_REFERENCES, img2="two dogs"))
    with pytest.raises(ValueError, match="at least one candidate"):
        cider_d({}, {})


def test_vqa_accuracy_meets_contracted_and_spelled_numbers():
    # Predictions are normalised, human answers (already clean in the VQA files) only de-punctuated.
    assert vqa_accuracy("dont", ["don't"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("Two.", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("a dog", ["dog"] * 2 + ["cat"] * 8) == pytest.approx(0.6)
