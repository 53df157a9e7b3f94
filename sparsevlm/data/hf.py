"""HF `datasets` loaders for the paper's calibration, restoration and evaluation sets, in one common format.

`load_task(task, source)` returns a `datasets.Dataset` with the columns in `FEATURES`:

  image          `datasets.Image`  the picture (bytes or a resolved file path)
  image_id       string            the source's image id; else the image path; else a hash of its bytes
  question       string            the prompt (VQA question, caption instruction, or caption prefix)
  answer         string            the target (first / majority answer, first caption, or caption suffix)
  answers        list of string    every reference answer or caption (for metrics)
  question_type  string            the source's question type where it has one, else the task's kind

so `sparsevlm.data.batch.encode_vqa(dataset, tokenizer, with_targets=...)` consumes any of them.

Tasks (`TASKS`; default split in brackets, the paper's use after it):

  vqav2                [validation]  evaluation: VQAv2 val
  okvqa                [test]        evaluation: OK-VQA test
  gqa                  [testdev]     evaluation: GQA balanced test-dev
  nocaps               [validation]  evaluation: NoCaps val, prompt `CAPTION_PROMPT`
  coco_caption         [test]        evaluation: COCO captions (Karpathy test), prompt `CAPTION_PROMPT`
  coco_caption_train   [train]       restoration training: COCO captions with `CAPTION_PROMPT`
  cc3m_instruct        [train]       restoration training: CC3M captions with `CAPTION_PROMPT`
  cc3m                 [train]       calibration: CC3M prefix captioning
  coco_caption_prefix  [train]       calibration: COCO prefix captioning
  visual_genome        [train]       calibration: Visual Genome region descriptions, prefix captioning

Prefix captioning (as the paper's calibration code does): the caption (the row's first caption) is cut at a
character position `k` drawn uniformly from `1 … len(caption) - 1` by `np.random.default_rng([seed, row])`;
`question = caption[:k]`, `answer = caption[k:]`, so both are non-empty (a one-character caption gets
`k = 0`: an empty prompt, never an empty target) and `question + answer == caption`. The draw depends only
on `seed` and the row's position, so it does not change with `limit` or with streaming. Use a prompt
format whose template is `{question}` for these rows: the prefix is the text to continue.

Columns read from a source (the first present name of each list wins):

  | common field  | tasks              | source columns, in order of preference                        |
  |---------------|--------------------|---------------------------------------------------------------|
  | image         | all (required)     | image, img, jpg, png, image_path, file_name, filepath         |
  | image_id      | all (optional)     | image_id, imageId, img_id, __key__                            |
  | question      | vqa (required)     | question                                                      |
  | answers       | vqa (required)     | answers, direct_answers, answer, multiple_choice_answer       |
  | answer        | vqa (optional)     | multiple_choice_answer, answer  (else the first of answers)   |
  | answers       | caption (required) | captions, caption, sentences, annotations_captions, regions,  |
  |               |                    | phrases, phrase, text, txt, answers, answer                   |
  | question_type | all (optional)     | question_type, types (its `structural` entry), structural     |

An answers / captions cell may be a string, a list of strings, a list of records (VQAv2 / OK-VQA
`{"answer", "answer_confidence", "answer_id"}`, Karpathy `{"raw", ...}`, Visual Genome regions
`{"phrase", ...}`) or the dict-of-lists form `datasets` gives a sequence of records; the text is read from
the first of the keys `TEXT_KEYS`. An image cell may be a `datasets.Image`, `{"bytes", "path"}`, raw
bytes, a PIL image (streamed) or a path string; relative paths resolve against the directory of the
parquet / JSON-lines file (or the imagefolder directory).

Sources: an HF hub name (`datasets.load_dataset(name, config, split=..., streaming=...)`), or a local
path: a directory in `imagefolder` form (images + `metadata.jsonl` with `file_name`), a `.parquet` file,
or a `.jsonl` / `.json` file of JSON lines. A local source without split folders is one split: the
default split falls back to it; an explicitly requested split must exist. Streaming sources are
materialised up to `limit` rows.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
from typing import Any, Sequence

import datasets
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from sparsevlm.data.tasks import CAPTION_PROMPT, TASK_SPECS, TASKS

IMAGE_COLUMNS = ("image", "img", "jpg", "png", "image_path", "file_name", "filepath")
IMAGE_ID_COLUMNS = ("image_id", "imageId", "img_id", "__key__")
QUESTION_COLUMNS = ("question",)
ANSWERS_COLUMNS = ("answers", "direct_answers", "answer", "multiple_choice_answer")
ANSWER_COLUMNS = ("multiple_choice_answer", "answer")
CAPTION_COLUMNS = ("captions", "caption", "sentences", "annotations_captions", "regions", "phrases", "phrase",
                   "text", "txt", "answers", "answer")  # fmt: skip
TYPE_COLUMNS = ("question_type", "types", "structural")
TEXT_KEYS = ("answer", "raw", "caption", "phrase", "text")
LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "image_id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")),
        "question_type": datasets.Value("string"),
    }
)


def load_task(
    task: str,
    source: str,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    streaming: bool = False,
    config: str | None = None,
    caption_prompt: str = CAPTION_PROMPT,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """`task`'s rows from `source` (hub name or local path) in the common format (`FEATURES`).

    Args:
      split: defaults to the task's split (`TASK_SPECS`).
      limit: keep the first `limit` rows (required in spirit for streaming: the stream is materialised).
      seed: draws the prefix-captioning split points.
      config: the hub dataset's configuration name, if it has several.
    """
    if task not in TASK_SPECS:
        raise ValueError(f"task={task!r} is not one of {', '.join(TASKS)}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit={limit} must be positive (or None for every row)")
    spec = TASK_SPECS[task]
    raw, base_dir, split_name = _load_source(source, split, spec.split, streaming, config, cache_dir)
    if isinstance(raw, datasets.IterableDataset):
        raw = _materialise(raw, limit)
    elif limit is not None:
        raw = raw.select(range(min(limit, len(raw))))
    if len(raw) == 0:
        raise ValueError(f"{task}: source {source!r} split {split_name!r} has no rows")
    return from_dataset(task, raw, base_dir=base_dir, seed=seed, caption_prompt=caption_prompt, source=source)


def from_dataset(
    task: str,
    dataset: datasets.Dataset,
    base_dir: str | None = None,
    seed: int = 0,
    caption_prompt: str = CAPTION_PROMPT,
    source: str = "dataset",
) -> datasets.Dataset:
    """An already loaded dataset's rows in the common format; relative image paths resolve against `base_dir`."""
    if task not in TASK_SPECS:
        raise ValueError(f"task={task!r} is not one of {', '.join(TASKS)}")
    kind = TASK_SPECS[task].kind
    present = list(dataset.column_names)
    image_column = _column(present, IMAGE_COLUMNS, "image", task, source, required=True)
    id_column = _column(present, IMAGE_ID_COLUMNS, "image_id", task, source)
    type_column = _column(present, TYPE_COLUMNS, "question_type", task, source)
    if kind == "vqa":
        question_column = _column(present, QUESTION_COLUMNS, "question", task, source, required=True)
        answers_column = _column(present, ANSWERS_COLUMNS, "answers", task, source, required=True)
        answer_column = _column([c for c in present if c != answers_column], ANSWER_COLUMNS, "answer", task, source)
    else:
        question_column = answer_column = None
        answers_column = _column(present, CAPTION_COLUMNS, "captions", task, source, required=True)
    if isinstance(dataset.features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))

    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        image = _image_cell(row[image_column], base_dir, index)
        texts = _texts(row[answers_column], answers_column, index)
        if not texts:
            raise ValueError(f"row {index}: column {answers_column!r} holds no answers / captions")
        if kind == "vqa":
            question = str(row[question_column])
            answer = str(row[answer_column]) if answer_column is not None else texts[0]
        elif kind == "caption":
            question, answer = caption_prompt, texts[0]
        else:
            question, answer = split_caption(texts[0], np.random.default_rng([seed, index]))
        return {
            "image": image,
            "image_id": _image_id(row[id_column] if id_column else None, image),
            "question": question,
            "answer": answer,
            "answers": texts,
            "question_type": _question_type(row[type_column] if type_column else None, kind),
        }

    return dataset.map(convert, with_indices=True, remove_columns=present, features=FEATURES,
                       desc=f"{task} → common format")  # fmt: skip


def split_caption(caption: str, rng: np.random.Generator) -> tuple[str, str]:
    """`(prefix, suffix)` cut at a uniform position in `1 … len - 1`; the suffix is never empty."""
    if not caption:
        raise ValueError("cannot split an empty caption into a prefix and a target")
    cut = int(rng.integers(1, len(caption))) if len(caption) > 1 else 0
    return caption[:cut], caption[cut:]


def _load_source(
    source: str, split: str | None, default_split: str, streaming: bool, config: str | None, cache_dir: str | None
) -> tuple[datasets.Dataset | datasets.IterableDataset, str | None, str]:
    """The raw split, the directory relative image paths resolve against, and the split's name."""
    if not os.path.exists(source):
        name = split or default_split
        # A hub dataset (or anything else `load_dataset` resolves): its own errors say what went wrong.
        loaded = datasets.load_dataset(source, config, split=name, streaming=streaming, cache_dir=cache_dir)
        return loaded, None, name
    if os.path.isdir(source):
        files = sorted(os.path.join(folder, name) for folder, _, names in os.walk(source) for name in names
                       if name in ("metadata.jsonl", "metadata.csv", "metadata.parquet"))  # fmt: skip
        if not files:
            raise ValueError(f"local directory {source!r} has no metadata.jsonl (imagefolder form expected)")
        builder, kwargs, base_dir = "imagefolder", {"data_dir": source}, source
    else:
        extension = os.path.splitext(source)[1].lower()
        if extension not in LOCAL_FORMATS:
            raise ValueError(f"local file {source!r}: extension {extension!r} is not one of "
                             f"{', '.join(LOCAL_FORMATS)}")  # fmt: skip
        builder, kwargs, files = LOCAL_FORMATS[extension], {"data_files": source}, [source]
        base_dir = os.path.dirname(os.path.abspath(source))
    if not any(_has_rows(f) for f in files):
        # `load_dataset` fails on an empty local file with an unrelated error (StopIteration, ArrowInvalid).
        # A local source without split folders is the split `datasets` names "train".
        raise ValueError(f"local source {source!r} split {split or 'train'!r} has no rows")
    loaded = datasets.load_dataset(builder, streaming=streaming, cache_dir=cache_dir, **kwargs)
    if split is not None and split not in loaded:
        raise ValueError(f"local source {source!r} has no split {split!r}; splits: {', '.join(loaded)}")
    if split is None:
        split = default_split if default_split in loaded else next(iter(loaded)) if len(loaded) == 1 else None
        if split is None:
            raise ValueError(f"local source {source!r} has no split {default_split!r} and several others "
                             f"({', '.join(loaded)}); pass split=")  # fmt: skip
    return loaded[split], base_dir, split


def _has_rows(path: str) -> bool:
    """Whether a local data file holds at least one row (parquet metadata, else a non-blank data line)."""
    if path.endswith(".parquet"):
        return pq.read_metadata(path).num_rows > 0
    with open(path) as f:
        lines = (line for line in f if line.strip())
        return next(lines, None) is not None and (not path.endswith(".csv") or next(lines, None) is not None)


def _materialise(stream: datasets.IterableDataset, limit: int | None) -> datasets.Dataset:
    """The first `limit` rows of a stream (all of them without a limit) as an in-memory dataset."""
    features = stream.features
    if features is not None:
        for name, feature in features.items():
            if isinstance(feature, datasets.Image):
                stream = stream.cast_column(name, datasets.Image(decode=False))
        features = stream.features
    rows = list(itertools.islice(stream, limit))
    if not rows:
        return datasets.Dataset.from_dict({name: [] for name in (features or {})}, features=features)
    return datasets.Dataset.from_list(rows, features=features)


def _column(
    present: Sequence[str], candidates: Sequence[str], field: str, task: str, source: str, required: bool = False
) -> str | None:
    """The first of `candidates` among the dataset's columns; a ValueError when required and none is."""
    for name in candidates:
        if name in present:
            return name
    if required:
        raise ValueError(f"{task}: source {source!r} has no {field!r} column (looked for "
                         f"{', '.join(candidates)}); columns present: {', '.join(present)}")  # fmt: skip
    return None


def _image_cell(value: object, base_dir: str | None, index: int) -> dict[str, Any]:
    """A `{"bytes", "path"}` cell whose image PIL can read; a ValueError naming the row and file if not."""
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        cell = {"bytes": buffer.getvalue(), "path": None}
    elif isinstance(value, dict) and value.get("bytes") is not None:
        cell = {"bytes": value["bytes"], "path": value.get("path")}
    elif isinstance(value, dict) and value.get("path"):
        cell = {"bytes": None, "path": _resolve(value["path"], base_dir)}
    elif isinstance(value, str) and value:
        cell = {"bytes": None, "path": _resolve(value, base_dir)}
    elif isinstance(value, (bytes, bytearray)):
        cell = {"bytes": bytes(value), "path": None}
    else:
        raise ValueError(f"row {index}: cannot read an image from a {type(value).__name__} cell")
    _check_image(cell, index)
    return cell


def _resolve(path: str, base_dir: str | None) -> str:
    return path if os.path.isabs(path) or base_dir is None else os.path.join(base_dir, path)


def _check_image(cell: dict[str, Any], index: int) -> None:
    # `verify` reads headers and (PNG) checksums without decoding pixels, so checking is cheap.
    name = cell["path"] or f"<{len(cell['bytes'])} bytes>"
    try:
        with Image.open(io.BytesIO(cell["bytes"]) if cell["bytes"] is not None else cell["path"]) as image:
            image.verify()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError … for bad files
        raise ValueError(f"row {index}: unreadable image {name}: {type(error).__name__}: {error}") from error


def _image_id(value: object, image: dict[str, Any]) -> str:
    """The source's id; else the image path; else a hash of the bytes (equal images share an id)."""
    if value is not None and value != "":
        return str(value)
    if image["path"]:
        return str(image["path"])
    return hashlib.sha1(image["bytes"]).hexdigest()[:16]


def _texts(value: object, column: str, index: int) -> list[str]:
    """Answer / caption strings from a string, list of strings, list of records or dict of lists."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        key = _text_key(value, column, index)
        inner = value[key]
        return [str(v) for v in inner] if isinstance(inner, list) else [str(inner)]
    if isinstance(value, (list, tuple)):
        texts = []
        for item in value:
            if isinstance(item, dict):
                texts.append(str(item[_text_key(item, column, index)]))
            else:
                texts.append(str(item))
        return texts
    raise ValueError(f"row {index}: column {column!r} holds a {type(value).__name__}, not text or a list of texts")


def _text_key(record: dict[str, Any], column: str, index: int) -> str:
    for key in TEXT_KEYS:
        if key in record:
            return key
    raise ValueError(f"row {index}: records in column {column!r} have none of the keys {', '.join(TEXT_KEYS)} "
                     f"(keys: {', '.join(record)})")  # fmt: skip


def _question_type(value: object, kind: str) -> str:
    if isinstance(value, dict):  # GQA's `types`: {"structural", "semantic", "detailed"}
        value = value.get("structural")
    return str(value) if value not in (None, "") else kind

