"""Answer normalisation and accuracy: exact match, official VQA accuracy, GQA accuracy, and CIDEr-D for captions."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Hashable, Mapping, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace."""
    text = _PUNCT.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after normalisation."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("exact_match needs at least one prediction")
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / len(predictions)


# ---------------------------------------------------------------------------------------------------------------
# VQA accuracy, as the VQA evaluation script computes it in the copy the paper's code runs (LAVIS
# `lavis/common/vqa_tools/vqa_eval.py`, the Python 3 port of GT-Vision-Lab/VQA's `vqaEval.py`).
# ---------------------------------------------------------------------------------------------------------------

# Only these characters count as punctuation; the apostrophe, ':', '.', '*', '#', '$', '%', '&', '|', '~' are not
# in the list and survive (the period has its own rule below).
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                    "!")
_VQA_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# Verbatim from the official script. `(?!<=\d)` was presumably meant as the lookbehind `(?<!\d)`, but as written it
# is a lookahead for the text "<=digit", which never follows a '.', so the pattern acts as `\.(?!\d)`: a period is
# dropped unless a digit follows it ("3.5" and ".5" keep theirs, "5." and "e.g." lose them).
_VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official script calls `periodStrip.sub("", text, re.UNICODE)`, passing the flag where `sub` takes `count`, so
# at most re.UNICODE == 32 periods are removed; kept for fidelity (no real answer has more).
_VQA_PERIOD_STRIP_COUNT = int(re.UNICODE)
# The official map includes "none" -> "0" besides the number words.
_VQA_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_VQA_ARTICLES = frozenset({"a", "an", "the"})
# The official contractions table, one "written expanded" pair per line ("dont" becomes "don't"). Capitalised keys
# ("Im") can never match, because words are lower-cased first; they are kept so the table is the official one.
_VQA_CONTRACTIONS = dict(
    line.split()
    for line in """
    aint ain't
    arent aren't
    cant can't
    couldve could've
    couldnt couldn't
    couldn'tve couldn’t’ve
    couldnt’ve couldn’t’ve
    didnt didn’t
    doesnt doesn’t
    dont don’t
    hadnt hadn’t
    hadnt’ve hadn’t’ve
    hadn'tve hadn’t’ve
    hasnt hasn’t
    havent haven’t
    hed he’d
    hed’ve he’d’ve
    he’dve he’d’ve
    hes he’s
    howd how’d
    howll how’ll
    hows how’s
    Id’ve I’d’ve
    I’dve I’d’ve
    Im I’m
    Ive I’ve
    isnt isn’t
    itd it’d
    itd’ve it’d’ve
    it’dve it’d’ve
    itll it’ll
    let’s let’s
    maam ma’am
    mightnt mightn’t
    mightnt’ve mightn’t’ve
    mightn’tve mightn’t’ve
    mightve might’ve
    mustnt mustn’t
    mustve must’ve
    neednt needn’t
    notve not’ve
    oclock o’clock
    oughtnt oughtn’t
    ow’s’at ’ow’s’at
    ’ows’at ’ow’s’at
    ’ow’sat ’ow’s’at
    shant shan’t
    shed’ve she’d’ve
    she’dve she’d’ve
    she’s she’s
    shouldve should’ve
    shouldnt shouldn’t
    shouldnt’ve shouldn’t’ve
    shouldn’tve shouldn’t’ve
    somebody’d somebodyd
    somebodyd’ve somebody’d’ve
    somebody’dve somebody’d’ve
    somebodyll somebody’ll
    somebodys somebody’s
    someoned someone’d
    someoned’ve someone’d’ve
    someone’dve someone’d’ve
    someonell someone’ll
    someones someone’s
    somethingd something’d
    somethingd’ve something’d’ve
    something’dve something’d’ve
    somethingll something’ll
    thats that’s
    thered there’d
    thered’ve there’d’ve
    there’dve there’d’ve
    therere there’re
    theres there’s
    theyd they’d
    theyd’ve they’d’ve
    they’dve they’d’ve
    theyll they’ll
    theyre they’re
    theyve they’ve
    twas ’twas
    wasnt wasn’t
    wed’ve we’d’ve
    we’dve we’d’ve
    weve we've
    werent weren’t
    whatll what’ll
    whatre what’re
    whats what’s
    whatve what’ve
    whens when’s
    whered where’d
    wheres where's
    whereve where’ve
    whod who’d
    whod’ve who’d’ve
    who’dve who’d’ve
    wholl who’ll
    whos who’s
    whove who've
    whyll why’ll
    whyre why’re
    whys why’s
    wont won’t
    wouldve would’ve
    wouldnt wouldn’t
    wouldnt’ve wouldn’t’ve
    wouldn’tve wouldn’t’ve
    yall y’all
    yall’ll y’all’ll
    y’allll y’all’ll
    yall’d’ve y’all’d’ve
    y’alld’ve y’all’d’ve
    y’all’dve y’all’d’ve
    youd you’d
    youd’ve you’d’ve
    you’dve you’d’ve
    youll you’ll
    youre you’re
    youve you’ve
    """.replace("\u2019", "'").strip().splitlines()  # typed with ’ here; the script's table uses the ASCII '
)


def _vqa_process_punctuation(text: str) -> str:
    """The official `processPunctuation`: drop or space out punctuation, then strip periods not before a digit."""
    # Whether a mark is deleted or becomes a space is decided on the *input* text, per mark: deleted when that mark
    # already touches a space, or when the text holds a digit-comma-digit anywhere (so "1,000" -> "1000").
    has_digit_comma = _VQA_DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if touches_space or has_digit_comma else " ")
    return _VQA_PERIOD_STRIP.sub("", out, count=_VQA_PERIOD_STRIP_COUNT)


def _vqa_process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lower-case, number words -> digits, drop articles, add apostrophes."""
    words = [_VQA_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _VQA_ARTICLES]
    return " ".join(_VQA_CONTRACTIONS.get(word, word) for word in words)


def vqa_answer_normalize(text: str) -> str:
    """Normalise a predicted answer exactly as the official VQA evaluation does before matching."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_process_digit_article(_vqa_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against its human answers (10 in VQA v2), in [0, 1].

    Each answer is left out in turn and the prediction scores min(#matches among the others / 3, 1); the result is
    the mean over the len(answers) leave-one-out subsets. With fewer than 10 answers the same formula is applied
    to the k answers given (k leave-one-out subsets of k - 1), so the best reachable score is min((k - 1) / 3, 1):
    fewer than 4 answers can never score 1.
    """
    if isinstance(answers, str):
        raise ValueError(f"answers must be a sequence of strings, got the string {answers!r}")
    if len(answers) < 2:
        raise ValueError(
            f"vqa_accuracy needs at least 2 human answers, got {len(answers)} ({list(answers)!r}); with one answer "
            "every leave-one-out subset is empty and the score is always 0 (use gqa_accuracy for single answers)"
        )
    predicted = vqa_answer_normalize(prediction)
    # Faithful to the official script: the human answers get only `processPunctuation` (no digit/article/contraction
    # processing, no lower-casing or stripping), and only when they are not all identical. The official annotation
    # files are already normalised, so this rarely matters there, but a raw human answer "two" never matches.
    if len(set(answers)) > 1:
        answers = [_vqa_process_punctuation(answer) for answer in answers]
    matches = [answer == predicted for answer in answers]
    total = sum(matches)
    return sum(min(1.0, (total - hit) / 3) for hit in matches) / len(matches)


def vqa_score(predictions: Sequence[str], answers_list: Sequence[Sequence[str]]) -> float:
    """Overall official VQA accuracy: mean of `vqa_accuracy` over questions, in [0, 1] (the official prints x100)."""
    if len(predictions) != len(answers_list):
        raise ValueError(f"{len(predictions)} predictions for {len(answers_list)} answer lists")
    if not predictions:
        raise ValueError("vqa_score needs at least one prediction")
    scores = []
    for index, (prediction, answers) in enumerate(zip(predictions, answers_list)):
        try:
            scores.append(vqa_accuracy(prediction, answers))
        except ValueError as error:
            raise ValueError(f"question {index}: {error}") from error
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------------------------------


def gqa_normalize(text: str) -> str:
    """Lower-case, strip whitespace and trailing punctuation ("Yes." -> "yes")."""
    # GQA's own eval.py compares answers verbatim; VLM harnesses (e.g. LLaVA's GQA conversion) lower-case and drop
    # a trailing period first, since generated answers are sentence-cased and punctuated. Inner punctuation stays.
    return text.strip().lower().rstrip(string.punctuation + string.whitespace)


def gqa_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Share of predictions equal to their single GQA answer after `gqa_normalize`."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not predictions:
        raise ValueError("gqa_accuracy needs at least one prediction")
    hits = sum(gqa_normalize(p) == gqa_normalize(a) for p, a in zip(predictions, answers))
    return hits / len(predictions)


# ---------------------------------------------------------------------------------------------------------------
# CIDEr-D, as pycocoevalcap's `cider_scorer.py` (the COCO caption evaluation's "CIDEr", which is CIDEr-D).
# ---------------------------------------------------------------------------------------------------------------

_CIDER_MAX_N = 4
_CIDER_SIGMA = 6.0


def caption_tokens(text: str) -> list[str]:
    """Tokens for CIDEr-D: lower-case, every punctuation character replaced by a space, whitespace split.

    Stands in for the COCO PTB tokenizer (Stanford CoreNLP, then punctuation tokens dropped) on plain text; it agrees
    for lower-case words separated by spaces and punctuation, but splits "black-and-white" (PTB keeps one token) and
    gives "don't" -> "don", "t" (PTB: "do", "n't").
    """
    return _PUNCT.sub(" ", text.lower()).split()


def _ngram_counts(tokens: Sequence[str]) -> Counter[tuple[str, ...]]:
    """Counts of all 1..4-grams of `tokens`."""
    return Counter(
        tuple(tokens[start:start + n]) for n in range(1, _CIDER_MAX_N + 1) for start in range(len(tokens) - n + 1)
    )


def _tfidf(counts: Counter[tuple[str, ...]], document_frequency: Counter[tuple[str, ...]], log_images: float):
    """Per-order tf-idf vectors {ngram: weight}, their L2 norms and the sentence length used by the penalty."""
    vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(_CIDER_MAX_N)]
    for ngram, count in counts.items():
        # An n-gram absent from every reference gets df 1 (idf = log #images), as in the official code.
        vectors[len(ngram) - 1][ngram] = count * (log_images - math.log(max(1.0, document_frequency[ngram])))
    norms = [math.sqrt(sum(weight * weight for weight in vector.values())) for vector in vectors]
    # The official code counts *bigrams* as the length (its `if n == 1` tests the 0-based order); for non-empty
    # sentences that is words - 1 on both sides, so the length difference is the word-count difference.
    length = sum(counts[ngram] for ngram in vectors[1])
    return vectors, norms, length


def cider_d(
    candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> tuple[float, dict[Hashable, float]]:
    """CIDEr-D of one candidate caption per image against that image's references: (corpus mean, per-image scores).

    Document frequencies (hence the idf) come from the references of all images given, so scores depend on the
    whole set, as in the COCO evaluation; with a single image every idf is 0 and so is the score. Per order n = 1..4:
    cosine of tf-idf vectors with the candidate's weights clipped to the reference's, times the Gaussian length
    penalty exp(-(len_c - len_r)^2 / (2 * 6^2)); averaged over n and over references, times 10. Tokens come from
    `caption_tokens`. An order with an all-zero vector (e.g. no 4-grams in a 3-word caption) contributes 0, as in
    current pycocoevalcap (the original coco-caption code divided by zero and gave NaN).
    """
    missing = [image for image in candidates if image not in references]
    if missing:
        raise ValueError(f"candidate ids without references: {missing!r}")
    unscored = [image for image in references if image not in candidates]
    if unscored:
        raise ValueError(f"reference ids without a candidate: {unscored!r} (the COCO evaluation requires the same ids)")
    if not candidates:
        raise ValueError("cider_d needs at least one candidate")
    for image, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{image!r}] must be a non-empty list of strings, got {refs!r}")
    for image, candidate in candidates.items():
        if not isinstance(candidate, str):
            raise ValueError(f"candidates[{image!r}] must be a string, got {candidate!r}")

    reference_counts = {
        image: [_ngram_counts(caption_tokens(ref)) for ref in refs] for image, refs in references.items()
    }
    document_frequency: Counter[tuple[str, ...]] = Counter()
    for counts_per_ref in reference_counts.values():
        document_frequency.update(set().union(*counts_per_ref))
    log_images = math.log(len(references))

    scores: dict[Hashable, float] = {}
    for image, candidate in candidates.items():
        cand_vectors, cand_norms, cand_length = _tfidf(
            _ngram_counts(caption_tokens(candidate)), document_frequency, log_images
        )
        total = 0.0
        for counts in reference_counts[image]:
            ref_vectors, ref_norms, ref_length = _tfidf(counts, document_frequency, log_images)
            penalty = math.exp(-((cand_length - ref_length) ** 2) / (2 * _CIDER_SIGMA**2))
            for order in range(_CIDER_MAX_N):
                if cand_norms[order] == 0 or ref_norms[order] == 0:
                    continue
                ref_vector = ref_vectors[order]
                # "-D" clipping: a candidate n-gram repeated more often than in the reference earns no extra credit.
                dot = sum(
                    min(weight, ref_vector.get(ngram, 0.0)) * ref_vector.get(ngram, 0.0)
                    for ngram, weight in cand_vectors[order].items()
                )
                total += penalty * dot / (cand_norms[order] * ref_norms[order])
        scores[image] = 10.0 * total / (_CIDER_MAX_N * len(reference_counts[image]))
    return sum(scores.values()) / len(scores), scores
