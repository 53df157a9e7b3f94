"""Scenes VQA: a seeded, download-free VQA + captioning dataset whose answers need vision across patches.

Unlike shapes VQA (one flat shape per 16-px patch), a scene holds 2–4 shapes of varied size at
free positions (not on the patch grid, each spanning 2–3 of the scenes model's 16-px patches of a
64-px image), drawn filled, outlined, or outlined and striped, overlapping each other, and about
40% of the scenes have a large outlined box that shapes sit in (half are drawn with one; a boxed
scene that cannot fit two shapes is redrawn). Questions (one-word answers, all need the image):
  count     "how many circles are there ?"               (zero … four)
  color     "what color is the circle ?"                 (asked only about a shape that occurs once)
  style     "what style is the red circle ?"             (filled / outlined / striped)
  relation  "what shape is left of the red circle ?"      (left of / right of / above / below; asked only
                                                          where exactly one shape is, CLEVR's "relate")
  nearest   "what shape is nearest to the red circle ?"
  inside    "how many circles are in the box ?"          (or "how many shapes …"; scenes with a box)
Every image also has a caption listing its objects left to right.

The geometry is part of the scene (centres and sizes as fractions of the image side), so every
answer is computed from it, and it is drawn the same at any image size. Rules that keep answers
unambiguous (the generator redraws a placement that breaks one):
  visibility  shapes are painted in order, later over earlier; at least `MIN_VISIBLE` of every
              shape's silhouette (the box: of its outline) lies outside every later shape's
              silhouette, so every object counts and shows its shape (none is a sliver);
  relations   asked only when every other centre differs from the anchor's by at least `RELATION_MARGIN`
              along the axis, and exactly one lies on the asked side;
  nearest     asked only when the nearest centre is `NEAREST_MARGIN` closer than the next one;
  distractor  relation and nearest questions only where a third shape of another kind than the answer
              exists, so "the other shape's kind" is no answer (it was for 83% of them without the rule);
  inside      a shape's bounding square lies inside the box's inner edge by `BOX_MARGIN`, or its
              bounding square clears the box's outer edge by `BOX_MARGIN`;
  referents   "the red circle" is used only where exactly one object is a red circle.

Splits are disjoint by scene, as in shapes VQA: a scene's hash decides its split.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Iterator

import numpy as np

from sparsevlm.data.shapes import CAPTION_PROMPT, COLORS, SPLITS, _article, captioning_view, features, question_rows

if TYPE_CHECKING:  # imported where a split is built, so the library imports without `datasets`
    import datasets

__all__ = ["CAPTION_PROMPT", "SPLITS", "captioning_view", "features", "build_split", "vocabulary"]

SHAPES = ("circle", "square", "triangle", "diamond")
BOX = "box"
STYLES = ("filled", "outlined", "striped")
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("count", "color", "style", "relation", "nearest", "inside")
RELATIONS = ("left of", "right of", "above", "below")
SPLIT_IMAGES = {"train": 8000, "validation": 250, "test": 500}
_SPLIT_SEED_OFFSET = {"train": 0, "validation": 1, "test": 2}

# Geometry, in fractions of the image side.
RADIUS = (0.16, 0.24)  # shapes: 10–15 px radius at 64 px, spanning 2–3 patches of 16 px
IN_BOX_RADIUS = (0.12, 0.20)  # 7.5–13 px
BOX_HALF = (0.30, 0.40)
BOX_ROOM = 0.03
LINE = 0.05  # outline width (≈3 px at 64)
STRIPE_PERIOD = 0.14  # stripes ≈4.5 px wide at 64
MAX_SHAPES = 4
MIN_VISIBLE = 0.75
RELATION_MARGIN = 0.12
NEAREST_MARGIN = 0.08
BOX_MARGIN = 0.03
# Visibility is measured on this fixed grid (not the image's), so a scene's validity never depends on image size.
_GEOMETRY_GRID = 64


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object: a shape (or the box), its colour and style, its centre `(x, y)` and size (radius / half side)."""

    kind: str
    color: str
    style: str
    x: float
    y: float
    size: float

    @property
    def key(self) -> str:
        """Canonical text of the object (coordinates to 3 decimals, as stored)."""
        return f"{self.kind}:{self.color}:{self.style}:{self.x:.3f}:{self.y:.3f}:{self.size:.3f}"

    @classmethod
    def from_key(cls, text: str) -> "SceneObject":
        """Inverse of `key`."""
        kind, color, style, x, y, size = text.split(":")
        return cls(kind, color, style, float(x), float(y), float(size))

    def extent(self) -> float:
        """Half side of the object's bounding square."""
        return self.size if self.kind == BOX else self.size * (1.1 if self.kind == "diamond" else 1.0)


@dataclasses.dataclass(frozen=True)
class Scene:
    """The objects of one image in painting order (the box, if any, first)."""

    objects: tuple[SceneObject, ...]

    @property
    def key(self) -> str:
        """Canonical text of the scene; equal scenes have equal keys."""
        return ";".join(o.key for o in self.objects)

    @classmethod
    def from_key(cls, text: str) -> "Scene":
        """Inverse of `key`."""
        return cls(tuple(SceneObject.from_key(part) for part in text.split(";")))

    @property
    def box(self) -> SceneObject | None:
        """The box, or None."""
        return next((o for o in self.objects if o.kind == BOX), None)

    @property
    def shapes(self) -> tuple[SceneObject, ...]:
        """The objects other than the box."""
        return tuple(o for o in self.objects if o.kind != BOX)

    def in_box(self, obj: SceneObject) -> bool:
        """Whether `obj` lies inside the box (the generator guarantees clearly inside or clearly outside)."""
        box = self.box
        return box is not None and max(abs(obj.x - box.x), abs(obj.y - box.y)) + obj.extent() < box.size - LINE

    def caption(self) -> str:
        """'a green box and a striped red circle in the box and an outlined blue square .' (left to right)."""
        parts = []
        for obj in sorted(self.objects, key=lambda o: (o.x, o.y)):
            if obj.kind == BOX:
                parts.append(f"{_article(obj.color)} {obj.color} box")
            else:
                where = " in the box" if self.in_box(obj) else ""
                parts.append(f"{_article(obj.style)} {obj.style} {obj.color} {obj.kind}{where}")
        return " and ".join(parts) + " ."


def scene_split(scene: Scene) -> str:
    """The split a scene belongs to, fixed by its hash (5% test, 5% validation, 90% train)."""
    bucket = int(hashlib.sha256(scene.key.encode()).hexdigest(), 16) % 20
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def silhouette(obj: SceneObject, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Boolean mask of the object's whole outline-filled area on coordinates `yy, xx` (fractions)."""
    dy, dx = yy - obj.y, xx - obj.x
    r = obj.size
    if obj.kind in ("square", BOX):
        half = r if obj.kind == BOX else r * 0.85
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if obj.kind == "circle":
        return dy**2 + dx**2 <= r**2
    if obj.kind == "triangle":  # apex up, base at y + 0.8 r
        top, bottom = obj.y - r, obj.y + 0.8 * r
        frac = (yy - top) / (bottom - top)
        return (yy >= top) & (yy <= bottom) & (np.abs(dx) <= frac * r)
    if obj.kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.1
    raise ValueError(f"unknown object kind {obj.kind!r}")


def painted(obj: SceneObject, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """The pixels the object paints: its silhouette, its outline band, or the outline and stripes inside."""
    inside = silhouette(obj, yy, xx)
    if obj.style == "filled":
        return inside
    shrunk = dataclasses.replace(obj, size=max(obj.size - LINE * (1.6 if obj.kind == "triangle" else 1.0), 0.0))
    outline = inside & ~silhouette(shrunk, yy, xx)
    if obj.style == "outlined":
        return outline
    phase = ((xx - obj.x) + (yy - obj.y)) / STRIPE_PERIOD  # diagonal stripes inside the outline
    return outline | (inside & (np.mod(phase, 1.0) < 0.5))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size) + 0.5) / size
    return np.meshgrid(coords, coords, indexing="ij")


def own_area(obj: SceneObject, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """The pixels that show an object: a shape's silhouette, the box's outline band."""
    return painted(obj, yy, xx) if obj.kind == BOX else silhouette(obj, yy, xx)


def visible_fractions(scene: Scene) -> list[float]:
    """Per object, the fraction of its own area (`own_area`) outside every later shape's silhouette."""
    layers = _Layers()
    for obj in scene.objects:
        layers.add(obj, check=False)
    return layers.fractions()


def _inside_or_outside(box: SceneObject, obj: SceneObject) -> bool:
    offset = max(abs(obj.x - box.x), abs(obj.y - box.y))
    inside = offset + obj.extent() <= box.size - LINE - BOX_MARGIN
    outside = offset - obj.extent() >= box.size + BOX_MARGIN
    return inside or outside


def _window(obj: SceneObject, size: int) -> tuple[slice, slice]:
    """Rows and columns of a `size`-pixel grid that hold every pixel of `obj` (a pixel of margin each side)."""
    extent = obj.extent()

    def span(centre: float) -> slice:
        low, high = np.floor((centre - extent) * size), np.ceil((centre + extent) * size)
        return slice(max(int(low) - 1, 0), min(int(high) + 1, size))

    return span(obj.y), span(obj.x)


class _Layers:
    """The objects placed so far, each with the pixels of its own area that no later silhouette covers."""

    def __init__(self) -> None:
        self.yy, self.xx = _grid(_GEOMETRY_GRID)
        self.visible: list[np.ndarray] = []
        self.areas: list[int] = []

    def add(self, obj: SceneObject, check: bool = True) -> bool:
        """Place `obj` on top if every object (it too) keeps `MIN_VISIBLE` of its own area, or unchecked;
        whether it was placed."""
        rows, cols = _window(obj, _GEOMETRY_GRID)
        shape = silhouette(obj, self.yy[rows, cols], self.xx[rows, cols])
        if check and not shape.any():
            return False
        for visible, area in zip(self.visible, self.areas):
            if check and (visible.sum() - (visible[rows, cols] & shape).sum()) / max(area, 1) < MIN_VISIBLE:
                return False
        for visible in self.visible:
            visible[rows, cols] &= ~shape
        own = np.zeros(self.yy.shape, bool)
        own[rows, cols] = own_area(obj, self.yy[rows, cols], self.xx[rows, cols])
        self.visible.append(own)
        self.areas.append(int(own.sum()))
        return True

    def fractions(self) -> list[float]:
        """Per object placed, the fraction of its own area that no later silhouette covers."""
        return [float(visible.sum() / max(area, 1)) for visible, area in zip(self.visible, self.areas)]


def sample_scene(rng: np.random.Generator) -> Scene:
    """2–4 shapes (half the draws also a box) at free positions, each placement redrawn until the rules hold."""
    colors = list(COLORS)
    layers = _Layers()
    objects: list[SceneObject] = []
    box = None
    if rng.random() < 0.5:
        half = float(rng.uniform(*BOX_HALF))
        bx, by = (float(rng.uniform(half + 0.02, 1 - half - 0.02)) for _ in range(2))
        box = SceneObject(BOX, colors[int(rng.integers(len(colors)))], "outlined", *_round(bx, by, half))
        objects.append(box)
        layers.add(box)
    target = int(rng.integers(2, MAX_SHAPES + 1))
    tries = 0
    while len(objects) - (box is not None) < target and tries < 200:
        tries += 1
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        in_box = box is not None and rng.random() < 0.6  # most shapes of a boxed scene go in the box
        # A shape in the box may be smaller (`IN_BOX_RADIUS`), at most as large as leaves it `BOX_ROOM` of play.
        lo, hi = IN_BOX_RADIUS if in_box else RADIUS
        if in_box:
            hi = min(hi, (box.size - LINE - BOX_MARGIN - BOX_ROOM) / 1.1)
        radius = float(rng.uniform(lo, hi))
        extent = radius * 1.1
        if in_box:
            room = box.size - LINE - BOX_MARGIN - extent
            x, y = (float(c + rng.uniform(-room, room)) for c in (box.x, box.y))
        else:
            x, y = (float(rng.uniform(extent, 1 - extent)) for _ in range(2))
        candidate = SceneObject(kind, colors[int(rng.integers(len(colors)))], STYLES[int(rng.integers(len(STYLES)))],
                                *_round(x, y, radius))
        if box is not None and not _inside_or_outside(box, candidate):
            continue
        if layers.add(candidate):
            objects.append(candidate)
    if len(objects) - (box is not None) < 2:
        return sample_scene(rng)
    return Scene(tuple(objects))


def _round(x: float, y: float, size: float) -> tuple[float, float, float]:
    # The stored scene key has 3 decimals; geometry uses exactly what is stored.
    return round(x, 3), round(y, 3), round(size, 3)


def render(scene: Scene, rng: np.random.Generator, image_size: int = 64) -> np.ndarray:
    """Draw a scene as uint8 RGB `[S, S, 3]`, with colour and pixel noise (the geometry is the scene's)."""
    supersample = 2
    side = image_size * supersample
    yy, xx = _grid(side)
    background = np.array([200.0, 200.0, 200.0]) + rng.normal(0, 6, 3)
    canvas = np.broadcast_to(background, yy.shape + (3,)).copy()
    for obj in scene.objects:
        color = np.clip(np.array(COLORS[obj.color], float) + rng.normal(0, 10, 3), 0, 255)
        rows, cols = _window(obj, side)
        canvas[rows, cols][painted(obj, yy[rows, cols], xx[rows, cols])] = color
    image = canvas.reshape(image_size, supersample, image_size, supersample, 3).mean(axis=(1, 3))
    image = image + rng.normal(0, 4, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _referents(scene: Scene) -> list[SceneObject]:
    """Shapes that "the {color} {kind}" names unambiguously."""
    pairs = [(o.color, o.kind) for o in scene.shapes]
    return [o for o in scene.shapes if pairs.count((o.color, o.kind)) == 1]


def relation_holds(a: SceneObject, relation: str, b: SceneObject) -> bool | None:
    """Whether `a` is `relation` `b` by their centres; None when they are within the margin on that axis."""
    delta = {"left of": b.x - a.x, "right of": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[relation]
    return None if abs(delta) < RELATION_MARGIN else delta > 0


def related_shape(scene: Scene, relation: str, anchor: SceneObject) -> SceneObject | None:
    """The one shape that is `relation` `anchor`; None unless exactly one is and every other clearly is not."""
    holds = [(relation_holds(o, relation, anchor), o) for o in scene.shapes if o is not anchor]
    if any(h is None for h, _ in holds):
        return None
    found = [o for h, o in holds if h]
    return found[0] if len(found) == 1 else None


def nearest(scene: Scene, anchor: SceneObject) -> SceneObject | None:
    """The shape whose centre is nearest to `anchor`'s, or None when the runner-up is within the margin."""
    others = sorted((float(np.hypot(o.x - anchor.x, o.y - anchor.y)), i) for i, o in enumerate(scene.shapes)
                    if o is not anchor)
    if not others or (len(others) > 1 and others[1][0] - others[0][0] < NEAREST_MARGIN):
        return None
    return scene.shapes[others[0][1]]


def _has_distractor(scene: Scene, anchor: SceneObject, answer: SceneObject) -> bool:
    """Whether a third shape of another kind than `answer` makes the answer depend on where shapes are."""
    return any(o.kind != answer.kind for o in scene.shapes if o is not anchor and o is not answer)


def _pick(items: list, rng: np.random.Generator):
    return items[int(rng.integers(len(items)))]


def questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """`(question_type, question, answer)` triples for a scene: one per type where the type applies."""
    out: list[tuple[str, str, str]] = []
    shapes = scene.shapes
    counts = {s: sum(o.kind == s for o in shapes) for s in SHAPES}
    present = [s for s in SHAPES if counts[s]]
    asked = _pick(present, rng) if rng.random() < 0.6 else _pick(list(SHAPES), rng)
    out.append(("count", f"how many {asked}s are there ?", NUMBERS[counts[asked]]))
    unique = [o for o in shapes if counts[o.kind] == 1]
    if unique:
        obj = _pick(unique, rng)
        out.append(("color", f"what color is the {obj.kind} ?", obj.color))
    referents = _referents(scene)
    if referents:
        obj = _pick(referents, rng)
        out.append(("style", f"what style is the {obj.color} {obj.kind} ?", obj.style))
    related = [(anchor, r, related_shape(scene, r, anchor)) for anchor in referents for r in RELATIONS]
    related = [q for q in related if q[2] is not None and _has_distractor(scene, q[0], q[2])]
    if related:
        anchor, relation, other = _pick(related, rng)
        out.append(("relation", f"what shape is {relation} the {anchor.color} {anchor.kind} ?", other.kind))
    near = [(anchor, nearest(scene, anchor)) for anchor in referents]
    near = [q for q in near if q[1] is not None and _has_distractor(scene, *q)]
    if near:
        anchor, other = _pick(near, rng)
        out.append(("nearest", f"what shape is nearest to the {anchor.color} {anchor.kind} ?", other.kind))
    if scene.box is not None:
        inside = [o for o in shapes if scene.in_box(o)]
        if rng.random() < 0.5:
            out.append(("inside", "how many shapes are in the box ?", NUMBERS[len(inside)]))
        else:
            kind = _pick(list(SHAPES), rng)
            out.append(("inside", f"how many {kind}s are in the box ?", NUMBERS[sum(o.kind == kind for o in inside)]))
    return out


def iter_scenes(split: str, num_images: int, seed: int) -> Iterator[tuple[Scene, np.random.Generator]]:
    """Yield `num_images` scenes of `split`, each with the RNG that renders and questions it."""
    _check_split(split)
    rng = np.random.default_rng([seed, _SPLIT_SEED_OFFSET[split], 21])  # 21: never the shapes stream
    made = 0
    while made < num_images:
        scene = sample_scene(rng)
        if scene_split(scene) != split:
            continue
        made += 1
        yield scene, np.random.default_rng([seed, _SPLIT_SEED_OFFSET[split], 21, made])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a scenes-VQA split; allowed: {', '.join(SPLITS)}")


def build_split(split: str, num_images: int | None = None, seed: int = 0, image_size: int = 64) -> datasets.Dataset:
    """Scenes VQA `split` as a `datasets.Dataset`, one row per question (the columns of shapes VQA)."""
    _check_split(split)
    num_images = SPLIT_IMAGES[split] if num_images is None else num_images
    if num_images <= 0:
        raise ValueError(f"num_images={num_images} must be positive")
    return question_rows(split, iter_scenes(split, num_images, seed), render, questions, image_size)


def vocabulary() -> list[str]:
    """Every word the generator can emit, sorted (the tokenizer's closed vocabulary)."""
    words = {"a", "an", "and", "the", "?", ".", "what", "color", "is", "how", "many", "are", "there", "style",
             "shape", "shapes", "describe", "image", "nearest", "to", "in", "box"}  # fmt: skip
    words.update(SHAPES)
    words.update(s + "s" for s in SHAPES)
    words.update(COLORS)
    words.update(STYLES)
    words.update(NUMBERS)
    for relation in RELATIONS:
        words.update(relation.split())
    return sorted(words)


def probe_grid(patches_per_side: int) -> int:
    """Cells per side the vision stage labels: every patch."""
    return patches_per_side


POSITION_BINS = 8  # object centres are labelled in eighths of the image side


def probe_classes(grid: int) -> dict[str, int]:
    """Classes of each per-patch label of `probe_labels` (0: background, or no centre in the patch)."""
    objects = {"color": len(COLORS) + 1, "shape": len(SHAPES) + 2, "style": len(STYLES) + 1,
               "x": POSITION_BINS + 1, "y": POSITION_BINS + 1}
    return objects | {"centre": len(SHAPES) + 1, "cell": grid * grid}


def probe_labels(scene_key: str, grid: int) -> dict[str, np.ndarray]:
    """Per patch of a `grid × grid` patching `[grid²]`: the top object at the patch centre (colour, kind,
    style, and its centre's column `x` and row `y` in `POSITION_BINS`), the kind of the shape whose centre
    lies in the patch (`centre`: one token per shape, the topmost where two share a patch), and the patch index."""
    scene = Scene.from_key(scene_key)
    yy, xx = _grid(grid)
    labels = {name: np.zeros(grid * grid, np.int32) for name in ("color", "shape", "style", "x", "y", "centre")}
    bin_of = lambda v: min(int(v * POSITION_BINS), POSITION_BINS - 1) + 1  # noqa: E731
    for obj in scene.objects:  # painting order: later objects overwrite
        hit = silhouette(obj, yy, xx).reshape(-1)
        labels["color"][hit] = list(COLORS).index(obj.color) + 1
        labels["shape"][hit] = (SHAPES + (BOX,)).index(obj.kind) + 1
        labels["style"][hit] = STYLES.index(obj.style) + 1
        labels["x"][hit], labels["y"][hit] = bin_of(obj.x), bin_of(obj.y)
        if obj.kind != BOX:
            labels["centre"][min(int(obj.y * grid), grid - 1) * grid + min(int(obj.x * grid), grid - 1)] = (
                SHAPES.index(obj.kind) + 1)
    labels["cell"] = np.arange(grid * grid, dtype=np.int32)
    return labels
