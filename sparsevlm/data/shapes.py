"""Shapes VQA: a seeded, download-free VQA + captioning dataset of coloured shapes on a 3×3 grid.

Each image holds 1–4 shapes in distinct grid cells. Questions (one-word answers, all need the image):
  color  "what color is the circle ?"         (asked only about a shape that occurs once)
  count  "how many circles are there ?"       (zero … four)
  shape  "what shape is at the top left ?"    (an occupied cell)
  exist  "is there a red circle ?"            (yes / no, half the negatives differ in one attribute)
Every image also has a caption listing its shapes in reading order.

Splits are disjoint by *scene* (the set of (cell, colour, shape)): a scene's hash decides its split,
so no scene of the test split ever appears, even re-rendered, in the training split.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # imported where a split is built, so the library imports without `datasets`
    import datasets

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 35),
    "purple": (145, 55, 200),
    "orange": (245, 135, 25),
}
GRID = 3
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("color", "count", "shape", "exist")
SPLITS = ("train", "validation", "test")
CAPTION_PROMPT = "describe the image ."
# Default number of images per split; questions are ~4 per image.
SPLIT_IMAGES = {"train": 12000, "validation": 250, "test": 500}
_SPLIT_SEED_OFFSET = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One shape in one grid cell."""

    cell: int
    color: str
    shape: str


@dataclasses.dataclass(frozen=True)
class Scene:
    """The objects of one image, ordered by cell."""

    objects: tuple[ShapeObject, ...]

    @property
    def key(self) -> str:
        """Canonical text of the scene; equal scenes have equal keys."""
        return ";".join(f"{o.cell}:{o.color}:{o.shape}" for o in self.objects)

    def caption(self) -> str:
        """'a red circle at the top left and a blue square at the center .'"""
        parts = [f"{_article(o.color)} {o.color} {o.shape} at the {POSITIONS[o.cell]}" for o in self.objects]
        return " and ".join(parts) + " ."


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def scene_split(scene: Scene) -> str:
    """The split a scene belongs to, fixed by its hash (5% test, 5% validation, 90% train)."""
    bucket = int(hashlib.sha256(scene.key.encode()).hexdigest(), 16) % 20
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def sample_scene(rng: np.random.Generator) -> Scene:
    """1–4 objects in distinct cells with random colours and shapes."""
    count = int(rng.integers(1, 5))
    cells = sorted(int(c) for c in rng.choice(GRID * GRID, size=count, replace=False))
    colors = list(COLORS)
    return Scene(
        tuple(ShapeObject(c, colors[int(rng.integers(len(colors)))], SHAPES[int(rng.integers(len(SHAPES)))]) for c in cells)
    )


def render(scene: Scene, rng: np.random.Generator, image_size: int = 48) -> np.ndarray:
    """Draw a scene as uint8 RGB `[S, S, 3]`, with jittered size, position, colour and pixel noise."""
    cell = image_size / GRID
    supersample = 2
    size = image_size * supersample
    coords = (np.arange(size) + 0.5) / supersample
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    background = np.array([200.0, 200.0, 200.0]) + rng.normal(0, 6, 3)
    canvas = np.broadcast_to(background, (size, size, 3)).copy()
    for obj in scene.objects:
        row, col = divmod(obj.cell, GRID)
        radius = cell * rng.uniform(0.30, 0.42)
        cy = (row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cx = (col + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        dy, dx = yy - cy, xx - cx
        if obj.shape == "circle":
            inside = dy**2 + dx**2 <= radius**2
        elif obj.shape == "square":
            half = radius * 0.85
            inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
        elif obj.shape == "triangle":
            # apex up; base at cy + 0.8 r
            top, bottom = cy - radius, cy + 0.8 * radius
            frac = (yy - top) / (bottom - top)
            inside = (yy >= top) & (yy <= bottom) & (np.abs(dx) <= frac * radius)
        elif obj.shape == "diamond":
            inside = np.abs(dx) + np.abs(dy) <= radius * 1.1
        else:  # pragma: no cover - SHAPES is closed
            raise ValueError(f"unknown shape {obj.shape!r}")
        color = np.clip(np.array(COLORS[obj.color], float) + rng.normal(0, 10, 3), 0, 255)
        canvas[inside] = color
    image = canvas.reshape(image_size, supersample, image_size, supersample, 3).mean(axis=(1, 3))
    image = image + rng.normal(0, 4, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """`(question_type, question, answer)` triples for a scene: one per type where the type applies."""
    out: list[tuple[str, str, str]] = []
    shape_counts = {s: sum(o.shape == s for o in scene.objects) for s in SHAPES}
    unique = [o for o in scene.objects if shape_counts[o.shape] == 1]
    if unique:
        obj = unique[int(rng.integers(len(unique)))]
        out.append(("color", f"what color is the {obj.shape} ?", obj.color))
    present = [s for s in SHAPES if shape_counts[s]]
    asked = present[int(rng.integers(len(present)))] if rng.random() < 0.6 else SHAPES[int(rng.integers(len(SHAPES)))]
    out.append(("count", f"how many {asked}s are there ?", NUMBERS[shape_counts[asked]]))
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    out.append(("shape", f"what shape is at the {POSITIONS[obj.cell]} ?", obj.shape))
    existing = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        color, shape = sorted(existing)[int(rng.integers(len(existing)))]
        answer = "yes"
    else:
        color, shape = _absent_pair(scene, existing, rng)
        answer = "no"
    out.append(("exist", f"is there {_article(color)} {color} {shape} ?", answer))
    return out


def _absent_pair(scene: Scene, existing: set[tuple[str, str]], rng: np.random.Generator) -> tuple[str, str]:
    # Half the negatives share the colour or the shape of a present object, so that answering
    # needs colour and shape bound to the same object.
    colors = list(COLORS)
    for _ in range(64):
        if rng.random() < 0.5:
            anchor = scene.objects[int(rng.integers(len(scene.objects)))]
            if rng.random() < 0.5:
                pair = (anchor.color, SHAPES[int(rng.integers(len(SHAPES)))])
            else:
                pair = (colors[int(rng.integers(len(colors)))], anchor.shape)
        else:
            pair = (colors[int(rng.integers(len(colors)))], SHAPES[int(rng.integers(len(SHAPES)))])
        if pair not in existing:
            return pair
    raise RuntimeError("could not sample an absent (color, shape) pair")  # pragma: no cover


def iter_scenes(split: str, num_images: int, seed: int) -> Iterator[tuple[Scene, np.random.Generator]]:
    """Yield `num_images` scenes of `split`, each with the RNG that renders and questions it."""
    _check_split(split)
    rng = np.random.default_rng([seed, _SPLIT_SEED_OFFSET[split]])
    made = 0
    while made < num_images:
        scene = sample_scene(rng)
        if scene_split(scene) != split:
            continue
        made += 1
        yield scene, np.random.default_rng([seed, _SPLIT_SEED_OFFSET[split], made])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a shapes-VQA split; allowed: {', '.join(SPLITS)}")


@functools.cache
def features() -> datasets.Features:
    """The columns of a split and their `datasets` types."""
    import datasets

    return datasets.Features(
        {
            "image_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "question_type": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "caption": datasets.Value("string"),
            "scene": datasets.Value("string"),
        }
    )


def build_split(split: str, num_images: int | None = None, seed: int = 0, image_size: int = 48) -> datasets.Dataset:
    """Shapes VQA `split` as a `datasets.Dataset`, one row per question (columns in `features()`)."""
    _check_split(split)
    num_images = SPLIT_IMAGES[split] if num_images is None else num_images
    if num_images <= 0:
        raise ValueError(f"num_images={num_images} must be positive")
    return question_rows(split, iter_scenes(split, num_images, seed), render, questions, image_size)


def question_rows(split: str, scenes: Iterable[tuple[Any, np.random.Generator]],
                  render_scene: Callable[..., np.ndarray], scene_questions: Callable[..., list[tuple[str, str, str]]],
                  image_size: int) -> datasets.Dataset:
    """One row per question of each generated `(scene, rng)` (columns in `features()`); every built-in task's
    `build_split` ends here, with its own scenes, renderer and question maker."""
    import datasets

    rows: dict[str, list] = {name: [] for name in features()}
    for image_id, (scene, rng) in enumerate(scenes):
        png = _png(render_scene(scene, rng, image_size))
        caption = scene.caption()
        for qtype, question, answer in scene_questions(scene, rng):
            rows["image_id"].append(image_id)
            rows["image"].append({"bytes": png, "path": None})
            rows["question_type"].append(qtype)
            rows["question"].append(question)
            rows["answer"].append(answer)
            rows["caption"].append(caption)
            rows["scene"].append(scene.key)
    return datasets.Dataset.from_dict(rows, features=features(), split=datasets.NamedSplit(split))


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def vocabulary() -> list[str]:
    """Every word the generator can emit, sorted (the tokenizer's closed vocabulary)."""
    words = {"a", "an", "and", "at", "the", "?", ".", "what", "color", "is", "how", "many", "are", "there",
             "shape", "yes", "no", "describe", "image"}  # fmt: skip
    words.update(SHAPES)
    words.update(s + "s" for s in SHAPES)
    words.update(COLORS)
    words.update(NUMBERS)
    for position in POSITIONS:
        words.update(position.split())
    return sorted(words)


def captioning_view(dataset: datasets.Dataset) -> datasets.Dataset:
    """One row per image with `question` = the caption prompt and `answer` = the caption."""
    _, first = np.unique(np.asarray(dataset["image_id"]), return_index=True)
    view = dataset.select(np.sort(first)).remove_columns(["question", "answer", "question_type"])
    view = view.add_column("question", [CAPTION_PROMPT] * len(view))
    view = view.add_column("question_type", ["caption"] * len(view))
    return view.add_column("answer", list(view["caption"]))


def cell_labels(scene_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell class ids `(color, shape)`, each `[GRID*GRID]`; 0 means an empty cell."""
    colors = np.zeros(GRID * GRID, np.int32)
    kinds = np.zeros(GRID * GRID, np.int32)
    for part in scene_key.split(";"):
        cell, color, shape = part.split(":")
        colors[int(cell)] = list(COLORS).index(color) + 1
        kinds[int(cell)] = SHAPES.index(shape) + 1
    return colors, kinds


def probe_grid(patches_per_side: int) -> int:
    """Cells per side the vision stage labels: the 3×3 grid, whatever the patching."""
    return GRID


def probe_classes(grid: int) -> dict[str, int]:
    """Classes of each per-cell label of `probe_labels` (0: an empty cell)."""
    return {"color": len(COLORS) + 1, "shape": len(SHAPES) + 1, "cell": grid * grid}


def probe_labels(scene_key: str, grid: int) -> dict[str, np.ndarray]:
    """Per grid cell: colour, shape and the cell's own index, each `[grid²]` (the vision stage's targets)."""
    colors, kinds = cell_labels(scene_key)
    return {"color": colors, "shape": kinds, "cell": np.arange(grid * grid, dtype=np.int32)}
