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
  okvqa                [val2014]     evaluation: OK-VQA test (its questions on COCO val2014)
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
  | image         | all (required)     | image, img, jpg, png, image_path, file_name, filename         |
  |               |                    | (a `filepath` folder in front; else a URL's file, `--images`) |
  | image_id      | all (optional)     | image_id, imageId, cocoid, img_id, __key__                    |
  | question      | vqa (required)     | question                                                      |
  | answers       | vqa (required)     | answers, direct_answers, answer, multiple_choice_answer       |
  | answer        | vqa (optional)     | multiple_choice_answer, answer  (else the first of answers)   |
  | answers       | caption (required) | conversations, captions, caption, sentences,                  |
  |               |                    | annotations_captions, regions,                                |
  |               |                    | phrases, phrase, text, txt, answers, answer                   |
  | question_type | all (optional)     | question_type, types (its `structural` entry), structural     |

An answers / captions cell may be a string, a list of strings, a list of records (VQAv2 / OK-VQA
`{"answer", "answer_confidence", "answer_id"}`, Karpathy `{"raw", ...}`, Visual Genome regions
`{"phrase", ...}`), LLaVA conversations `[{"from", "value"}]` (the assistant's turns) or the dict-of-lists
form `datasets` gives a sequence of records; the text is read from the first of the keys `TEXT_KEYS`.
An image cell may be a `datasets.Image`, `{"bytes", "path"}`, raw bytes, a PIL image (streamed) or a path
string; relative paths resolve against `images`, then the directory of the data file (or the local copy).

Sources: an HF hub name or a local copy of a hub repo (data files and README `configs`), read alike by
`datasets.load_dataset(path, config, split=..., data_files=<the split's files>, streaming=...)`; or a local
imagefolder (images + `metadata.jsonl` with `file_name`), a `.parquet` file, or a `.jsonl` / `.json` file
(JSON lines or one JSON array). The split's data files are resolved first and only they are read; a limit
always streams. A source with one split serves the task's default split. GQA's hub form (questions in
`…_instructions`, images in `…_images`) is joined by `imageId`; evaluation caption tasks group the rows
of one image (`group_references`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import urlparse

import datasets
import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from sparsevlm.data.tasks import CAPTION_PROMPT, TASK_SPECS, TASKS, TaskSpec

IMAGE_COLUMNS = ("image", "img", "jpg", "png", "image_path", "file_name", "filename")
IMAGE_FOLDER_COLUMNS = ("filepath",)  # a folder in front of the file name (Karpathy COCO: "val2014")
URL_COLUMNS = ("url", "coco_url", "image_url", "flickr_url")
IMAGE_ID_COLUMNS = ("image_id", "imageId", "cocoid", "img_id", "__key__")
QUESTION_COLUMNS = ("question",)
ANSWERS_COLUMNS = ("answers", "direct_answers", "answer", "multiple_choice_answer")
ANSWER_COLUMNS = ("multiple_choice_answer", "answer")
CAPTION_COLUMNS = ("conversations", "captions", "caption", "sentences", "annotations_captions", "regions", "phrases",
                   "phrase", "text", "txt", "answers", "answer")  # fmt: skip
TYPE_COLUMNS = ("question_type", "types", "structural")
TEXT_KEYS = ("answer", "raw", "caption", "phrase", "text")
ASSISTANT_ROLES = ("gpt", "assistant")  # LLaVA conversations: the turn that is the target
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
    images: str | None = None,
) -> datasets.Dataset:
    """`task`'s rows from `source` (hub name or local path) in the common format (`FEATURES`).

    Args:
      split: defaults to the task's split (`TASK_SPECS`), else the source's only split.
      limit: keep the first `limit` rows (images, for tasks that group references); a limit always streams, so
        only the files those rows are in are read.
      seed: draws the prefix-captioning split points.
      config: the dataset's configuration name (default: the task's, where the source has it).
      images: a folder of the image files the source names but does not hold.
    """
    if task not in TASK_SPECS:
        raise ValueError(f"task={task!r} is not one of {', '.join(TASKS)}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit={limit} must be positive (or None for every row)")
    if images is not None and not os.path.isdir(images):
        raise ValueError(f"images={images!r} is not a directory")
    spec = TASK_SPECS[task]
    opened = _open_source(source, spec, config, cache_dir)
    split_name = _choose_split(source, opened.files, split, spec.split)
    kwargs = dict(opened.kwargs)
    if opened.files:  # only the split's own files: `load_dataset` would otherwise prepare every split first
        kwargs["data_files"] = {split_name: opened.files[split_name]}
    raw = datasets.load_dataset(opened.path, split=split_name, streaming=streaming or limit is not None,
                                cache_dir=cache_dir, **kwargs)  # fmt: skip
    if isinstance(raw, datasets.IterableDataset):
        raw = _materialise(raw, limit, _image_key if spec.groups_references else None, split_name,
                           f"{task}: reading {source} [{split_name}]")  # fmt: skip
    if len(raw) == 0:
        raise ValueError(f"{task}: source {source!r} split {split_name!r} has no rows")
    images_by_id = _joined_images(task, raw, opened, split_name, cache_dir)
    return from_dataset(task, raw, base_dir=opened.base_dir, seed=seed, caption_prompt=caption_prompt, source=source,
                        images=images, images_by_id=images_by_id)  # fmt: skip


def from_dataset(
    task: str,
    dataset: datasets.Dataset,
    base_dir: str | None = None,
    seed: int = 0,
    caption_prompt: str = CAPTION_PROMPT,
    source: str = "dataset",
    images: str | None = None,
    images_by_id: Mapping[str, dict[str, Any]] | None = None,
) -> datasets.Dataset:
    """An already loaded dataset's rows in the common format.

    Relative image paths resolve against `images`, then `base_dir`; `images_by_id` supplies the image of each
    image id for sources that keep images apart (GQA's images config). Tasks that group references
    (`TaskSpec.groups_references`) merge the rows of one image into one row holding all its captions.
    """
    if task not in TASK_SPECS:
        raise ValueError(f"task={task!r} is not one of {', '.join(TASKS)}")
    spec = TASK_SPECS[task]
    kind = spec.kind
    present = list(dataset.column_names)
    columns = _columns(task, spec, present, source, images is not None, images_by_id is not None)
    roots = [root for root in (images, base_dir) if root is not None]
    for name in (columns.image, columns.url):
        if name is not None and isinstance(dataset.features.get(name), datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))

    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        if images_by_id is not None and columns.image is None:
            image = images_by_id[str(row[columns.id])]
        elif columns.image is None:  # URLs only: the file named by the URL, under `images`
            image = _file_cell(_url_names(str(row[columns.url])), roots, index)
        else:
            folder = row[columns.folder] if columns.folder else None
            image = _image_cell(row[columns.image], roots, index, folder)
        texts = _texts(row[columns.answers], columns.answers, index)
        if not texts:
            raise ValueError(f"{task}: source {source!r} row {index}: column {columns.answers!r} holds no answers / "
                             f"captions (the metric and training need references)")  # fmt: skip
        if len(texts) < spec.min_answers:
            raise ValueError(f"{task}: source {source!r} row {index} has {len(texts)} answer(s) in column "
                             f"{columns.answers!r} ({texts!r}); the VQA accuracy needs at least {spec.min_answers} "
                             f"human answers per question: use a copy with every human answer (e.g. {spec.hub})")
        if kind == "vqa":
            question = str(row[columns.question])
            answer = str(row[columns.answer]) if columns.answer is not None else texts[0]
        elif kind == "caption":
            question, answer = caption_prompt, texts[0]
        else:
            question, answer = split_caption(texts[0], np.random.default_rng([seed, index]))
        return {
            "image": image,
            "image_id": _image_id(row[columns.id] if columns.id else None, image),
            "question": question,
            "answer": answer,
            "answers": texts,
            "question_type": _question_type(row[columns.type] if columns.type else None, kind),
        }

    converted = dataset.map(convert, with_indices=True, remove_columns=present, features=FEATURES,
                            desc=f"{task} → common format")  # fmt: skip
    return group_references(converted) if spec.groups_references else converted


def group_references(dataset: datasets.Dataset) -> datasets.Dataset:
    """One row per image id (in order of first appearance) whose `answers` are all of that image's references.

    For caption sets stored one caption per row, so that CIDEr-D scores each image against every reference;
    a row whose references repeat an earlier row's of the same image adds nothing.
    """
    groups: dict[str, list[int]] = {}
    for index, image_id in enumerate(dataset["image_id"]):
        groups.setdefault(image_id, []).append(index)
    if len(groups) == len(dataset):
        return dataset
    answers = dataset["answers"]
    merged = []
    for members in groups.values():
        seen: list[list[str]] = []
        for index in members:
            if list(answers[index]) not in seen:
                seen.append(list(answers[index]))
        merged.append([text for texts in seen for text in texts])
    firsts = dataset.select([members[0] for members in groups.values()])
    return firsts.map(lambda row, index: {"answers": merged[index]}, with_indices=True, features=FEATURES,
                      desc="references grouped per image")  # fmt: skip


def split_caption(caption: str, rng: np.random.Generator) -> tuple[str, str]:
    """`(prefix, suffix)` cut at a uniform position in `1 … len - 1`; the suffix is never empty."""
    if not caption:
        raise ValueError("cannot split an empty caption into a prefix and a target")
    cut = int(rng.integers(1, len(caption))) if len(caption) > 1 else 0
    return caption[:cut], caption[cut:]


@dataclasses.dataclass(frozen=True)
class _Columns:
    """Which source column feeds each common field (None: absent)."""

    image: str | None
    folder: str | None
    url: str | None
    id: str | None
    question: str | None
    answers: str
    answer: str | None
    type: str | None


def _columns(task: str, spec: TaskSpec, present: Sequence[str], source: str, has_folder: bool,
             joined: bool) -> _Columns:
    """The source columns of each common field; a ValueError naming what is missing (and what is there)."""
    image = _column(present, IMAGE_COLUMNS, "image", task, source)
    url = _column(present, URL_COLUMNS, "url", task, source)
    if image is None and not joined and (url is None or not has_folder):
        if url is not None:
            raise ValueError(f"{task}: source {source!r} holds no images, only their URLs (column {url!r}); sparsevlm "
                             f"does not download images: fetch them into a folder and pass --images DIR")
        _column(present, IMAGE_COLUMNS, "image", task, source, required=True)
    folder = _column(present, IMAGE_FOLDER_COLUMNS, "folder", task, source) if image is not None else None
    if spec.kind == "vqa":
        question = _column(present, QUESTION_COLUMNS, "question", task, source, required=True)
        answers = _column(present, ANSWERS_COLUMNS, "answers", task, source, required=True)
        answer = _column([c for c in present if c != answers], ANSWER_COLUMNS, "answer", task, source)
    else:
        question = answer = None
        answers = _column(present, CAPTION_COLUMNS, "captions", task, source, required=True)
    return _Columns(image=image, folder=folder, url=url, id=_column(present, IMAGE_ID_COLUMNS, "image_id", task, source),
                    question=question, answers=answers, answer=answer,
                    type=_column(present, TYPE_COLUMNS, "question_type", task, source))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Opened:
    """A source resolved to what `datasets.load_dataset` takes, with its data files per split."""

    path: str
    kwargs: dict[str, Any]
    base_dir: str | None
    files: dict[str, list[str]]
    config: str | None


def _open_source(source: str, spec: TaskSpec, config: str | None, cache_dir: str | None) -> _Opened:
    """Resolve `source` (hub name, local copy of a hub repo, imagefolder, or data file) without reading any rows."""
    if os.path.isfile(source) or (os.path.isdir(source) and _metadata_files(source)):
        if config is not None:
            raise ValueError(f"config={config!r}: the local source {source!r} is a single data set "
                             f"({'an imagefolder' if os.path.isdir(source) else 'one file'}), with no configurations")
        if os.path.isdir(source):
            path, kwargs, files, base_dir = "imagefolder", {"data_dir": source}, _metadata_files(source), source
        else:
            extension = os.path.splitext(source)[1].lower()
            if extension not in LOCAL_FORMATS:
                raise ValueError(f"local file {source!r}: extension {extension!r} is not one of "
                                 f"{', '.join(LOCAL_FORMATS)}")  # fmt: skip
            path, kwargs, files = LOCAL_FORMATS[extension], {"data_files": source}, [source]
            base_dir = os.path.dirname(os.path.abspath(source))
        if not any(_has_rows(f) for f in files):
            # `load_dataset` fails on an empty local file with an unrelated error (StopIteration, ArrowInvalid).
            # A local source without split folders is the split `datasets` names "train".
            raise ValueError(f"local source {source!r} split 'train' has no rows")
    else:
        # A hub dataset, or a local copy of one (its files and README configs): `load_dataset` resolves both alike.
        path, base_dir = source, source if os.path.isdir(source) else None
        if config is None and spec.config is not None and spec.config in _config_names(source):
            config = spec.config
        kwargs = {"name": config} if config is not None else {}
        if config is None and spec.data_files is not None:
            try:  # LLaVA's repo: chat.json beside metadata.json and images.zip
                return _resolved(path, {"data_files": spec.data_files}, base_dir, None, cache_dir)
            except FileNotFoundError:
                pass  # the source has no such file: read it as it is
    return _resolved(path, kwargs, base_dir, config, cache_dir)


def _resolved(path: str, kwargs: dict[str, Any], base_dir: str | None, config: str | None,
              cache_dir: str | None) -> _Opened:
    try:
        builder = datasets.load_dataset_builder(path, cache_dir=cache_dir, **kwargs)
    except RuntimeError as error:
        if "scripts are no longer supported" not in str(error):
            raise
        hubs = ", ".join(sorted({spec.hub for spec in TASK_SPECS.values()}))
        raise ValueError(f"source {path!r} is a loading-script dataset, which datasets {datasets.__version__} refuses: "
                         f"use a parquet copy (tested: {hubs})") from error
    data_files = builder.config.data_files or {}
    return _Opened(path, kwargs, base_dir, {str(split): list(files) for split, files in data_files.items()}, config)


def _config_names(source: str) -> list[str]:
    return list(datasets.get_dataset_config_names(source))


def _metadata_files(folder: str) -> list[str]:
    return sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                  if name in ("metadata.jsonl", "metadata.csv", "metadata.parquet"))  # fmt: skip


def _choose_split(source: str, files: Mapping[str, Any], split: str | None, default_split: str) -> str:
    """The requested split (which must exist), else the task's default, else the source's only split."""
    if not files:  # a builder without data files: `load_dataset` checks the split itself
        return split or default_split
    if split is not None:
        if split not in files:
            raise ValueError(f"source {source!r} has no split {split!r}; splits: {', '.join(files)}")
        return split
    if default_split in files:
        return default_split
    if len(files) == 1:
        return next(iter(files))
    raise ValueError(f"source {source!r} has no split {default_split!r} and several others ({', '.join(files)}); "
                     f"pass split=")  # fmt: skip


def _joined_images(task: str, raw: datasets.Dataset, opened: _Opened, split: str,
                   cache_dir: str | None) -> dict[str, dict[str, Any]] | None:
    """GQA's hub form: questions and images in two configs (`…_instructions`, `…_images`), joined by `imageId`.

    Returns the image of every image id the rows name (streamed from the images config, which is read only until
    all are found), or None when the rows hold their images themselves.
    """
    present = list(raw.column_names)
    id_column = next((c for c in IMAGE_ID_COLUMNS if c in present), None)
    if any(c in present for c in IMAGE_COLUMNS) or id_column is None or opened.config is None:
        return None
    images_config = opened.config.replace("instructions", "images")
    if images_config == opened.config or images_config not in _config_names(opened.path):
        return None
    wanted = {str(value) for value in raw[id_column]}
    stream = datasets.load_dataset(opened.path, images_config, split=split, streaming=True, cache_dir=cache_dir)
    stream = stream.cast_column("image", datasets.Image(decode=False))
    found: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(wanted), desc=f"{task}: images from {images_config}", unit="image") as bar:
        for row in stream:
            key = str(row["id"])
            if key in wanted and key not in found:
                found[key] = row["image"]
                bar.update()
                if len(found) == len(wanted):
                    break
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(f"{task}: {len(missing)} image id(s) of column {id_column!r} (e.g. {missing[0]!r}) are not in "
                         f"config {images_config!r} split {split!r} of {opened.path!r}")  # fmt: skip
    return found


def _has_rows(path: str) -> bool:
    """Whether a local data file holds at least one row (parquet metadata, else a non-blank data line)."""
    if path.endswith(".parquet"):
        return pq.read_metadata(path).num_rows > 0
    with open(path) as f:
        lines = (line for line in f if line.strip())
        return next(lines, None) is not None and (not path.endswith(".csv") or next(lines, None) is not None)


def _materialise(stream: datasets.IterableDataset, limit: int | None,
                 group_key: Callable[[dict[str, Any]], str | None] | None, split: str, desc: str) -> datasets.Dataset:
    """The first `limit` rows of a stream (all of them without a limit) as an in-memory dataset.

    With `group_key` the limit counts images, not rows: every row of the first `limit` images is read (their rows
    must be contiguous, else their references could not be complete without reading the whole split).
    """
    features = stream.features
    if features is not None:
        for name, feature in features.items():
            if isinstance(feature, datasets.Image):
                stream = stream.cast_column(name, datasets.Image(decode=False))
        features = stream.features
    rows = list(tqdm(_head(stream, limit, group_key) if limit is not None else stream, desc=desc, unit="row",
                     total=limit if group_key is None else None))  # fmt: skip
    if not rows:
        return datasets.Dataset.from_dict({name: [] for name in (features or {})}, features=features, split=split)
    return datasets.Dataset.from_list(rows, features=features, split=split)


def _head(rows: Iterable[dict[str, Any]], limit: int,
          group_key: Callable[[dict[str, Any]], str | None] | None) -> Iterable[dict[str, Any]]:
    """The first `limit` rows, or every row of the first `limit` images (by `group_key`), read lazily."""
    closed: set[str] = set()
    current = None
    for count, row in enumerate(rows):
        key = group_key(row) if group_key is not None else None
        if key is None:
            if count >= limit:
                return
        elif key != current:
            if key in closed:
                raise ValueError(f"rows of image {key!r} are not contiguous (row {count} comes after other images' "
                                 f"rows), so the first {limit} images' references cannot be complete without "
                                 f"reading the whole split: drop the limit")  # fmt: skip
            if current is not None:
                closed.add(current)
            if len(closed) >= limit:
                return
            current = key
        yield row


def _image_key(row: dict[str, Any]) -> str | None:
    """The image a raw row shows: its id column, else its image path or bytes hash (None if neither)."""
    for name in IMAGE_ID_COLUMNS:
        if row.get(name) not in (None, ""):
            return str(row[name])
    for name in IMAGE_COLUMNS:
        value = row.get(name)
        if isinstance(value, dict):
            value = value.get("path") or value.get("bytes")
        if isinstance(value, str) and value:
            return value
        if isinstance(value, (bytes, bytearray)):
            return hashlib.sha1(value).hexdigest()[:16]
    return None


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


def _image_cell(value: object, roots: Sequence[str], index: int, folder: object = None) -> dict[str, Any]:
    """A `{"bytes", "path"}` cell whose image PIL can read; a ValueError naming the row and file if not.

    A file name resolves against each of `roots` in turn, inside `folder` first where the source gives one.
    """
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        cell = {"bytes": buffer.getvalue(), "path": None}
    elif isinstance(value, dict) and value.get("bytes") is not None:
        cell = {"bytes": value["bytes"], "path": value.get("path")}
    elif isinstance(value, (bytes, bytearray)):
        cell = {"bytes": bytes(value), "path": None}
    else:
        name = value.get("path") if isinstance(value, dict) else value
        if not isinstance(name, str) or not name:
            raise ValueError(f"row {index}: cannot read an image from a {type(value).__name__} cell")
        names = [os.path.join(str(folder), name), name] if folder not in (None, "") else [name]
        return _file_cell(names, roots, index)
    _check_image(cell, index)
    return cell


def _file_cell(names: Sequence[str], roots: Sequence[str], index: int) -> dict[str, Any]:
    """The first of `names` that exists under one of `roots` (an absolute name as it is), checked readable."""
    if os.path.isabs(names[0]):
        candidates = [names[0]]
    elif not roots:
        raise ValueError(f"row {index}: image {names[0]!r} is a file name and the source holds no image files: "
                         f"pass --images DIR (a folder holding it)")  # fmt: skip
    else:
        candidates = [os.path.join(root, name) for root in roots for name in names]
    path = next((c for c in candidates if os.path.exists(c)), candidates[0])
    cell = {"bytes": None, "path": path}
    _check_image(cell, index)
    return cell


def _url_names(url: str) -> list[str]:
    """File names an image URL may be saved under: its last two path parts ("val2014/x.jpg"), then the last."""
    parts = [part for part in urlparse(url).path.split("/") if part]
    return [os.path.join(*parts[-2:]), parts[-1]] if len(parts) > 1 else parts


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
    if _is_conversation(value):  # LLaVA: [{"from", "value"}, ...] (or its dict-of-lists form): the assistant's turns
        turns = zip(value["from"], value["value"]) if isinstance(value, dict) else ((t["from"], t["value"]) for t in value)
        return [str(text) for role, text in turns if role in ASSISTANT_ROLES]
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


def _is_conversation(value: object) -> bool:
    if isinstance(value, dict):
        return "from" in value and "value" in value
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(t, dict) and "from" in t and "value" in t for t in value)


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

