"""The built-in generated tasks by name: each module builds seeded splits with the same columns and API.

A task module has `SPLITS`, `QUESTION_TYPES`, `build_split(split, num_images, seed, image_size)`,
`captioning_view(dataset)` and `vocabulary()`; its vision-stage labels are `probe_grid(patches_per_side)`,
`probe_classes(grid)` and `probe_labels(scene_key, grid)` (every patch for scenes, the 3×3 cells for shapes).
Underneath, `iter_scenes(split, num_images, seed)`, `render(scene, rng)` and `questions(scene, rng)` make the rows.
"""

from __future__ import annotations

import functools
import hashlib
from types import ModuleType
from typing import Any, Mapping

import numpy as np

from sparsevlm.data import scenes, shapes
from sparsevlm.data.tasks import BUILTIN_TASKS

_MODULES = {"shapes": shapes, "scenes": scenes}
assert tuple(_MODULES) == BUILTIN_TASKS


def task_module(task: str) -> ModuleType:
    """The generator module of built-in task `task`; a clear error naming the allowed tasks otherwise."""
    if task not in _MODULES:
        raise ValueError(f"task={task!r} is not a built-in task; allowed: {', '.join(BUILTIN_TASKS)}")
    return _MODULES[task]


def model_task(metadata: Mapping[str, Any]) -> str:
    """The built-in task a saved model was pretrained on (shapes for models that do not record one)."""
    return (metadata.get("pretrain") or {}).get("task", "shapes")


def own_set(metadata: Mapping[str, Any], view: str) -> str:
    """The built-in example set `view` (captions, vqa, mix) of the task the model with `metadata` was pretrained on."""
    return f"{model_task(metadata)}-{view}"


FINGERPRINT_PATCHES = 4  # patches per side whose vision-stage targets the fingerprint covers (64-px, 16-px patches)


@functools.cache
def data_fingerprint(task: str, num_images: int = 16) -> str:
    """A hash of what built-in task `task` generates (vocabulary, and the first training scenes: their
    keys, images, questions, captions and vision-stage targets); it changes whenever the generator does."""
    module = task_module(task)
    digest = hashlib.sha256(" ".join(module.vocabulary()).encode())
    grid = module.probe_grid(FINGERPRINT_PATCHES)
    for scene, rng in module.iter_scenes("train", num_images, 0):
        digest.update(scene.key.encode())
        digest.update(module.render(scene, rng).tobytes())
        digest.update(repr(module.questions(scene, rng)).encode())
        digest.update(scene.caption().encode())
        for name, labels in sorted(module.probe_labels(scene.key, grid).items()):
            digest.update(name.encode() + np.ascontiguousarray(labels, np.int32).tobytes())
    return digest.hexdigest()[:16]
