"""Names of the data the library reads: built-in example sets, `TASK=SOURCE` tasks, evaluation tasks.

Kept apart from the loaders (which import `datasets`) so configs and the command line can check a
data flag without loading anything.
"""

from __future__ import annotations

import dataclasses

# Instruction prompt of captioning rows (evaluation and restoration training); InstructBLIP's wording.
CAPTION_PROMPT = "A short image caption:"
KINDS = ("vqa", "caption", "prefix_caption")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How a task reads its source: the row kind, the default split and what the paper uses it for."""

    kind: str
    split: str
    purpose: str


TASK_SPECS: dict[str, TaskSpec] = {
    "vqav2": TaskSpec("vqa", "validation", "evaluation"),
    "okvqa": TaskSpec("vqa", "test", "evaluation"),
    "gqa": TaskSpec("vqa", "testdev", "evaluation"),
    "nocaps": TaskSpec("caption", "validation", "evaluation"),
    "coco_caption": TaskSpec("caption", "test", "evaluation"),
    "coco_caption_train": TaskSpec("caption", "train", "restoration"),
    "cc3m_instruct": TaskSpec("caption", "train", "restoration"),
    "cc3m": TaskSpec("prefix_caption", "train", "calibration"),
    "coco_caption_prefix": TaskSpec("prefix_caption", "train", "calibration"),
    "visual_genome": TaskSpec("prefix_caption", "train", "calibration"),
}
TASKS = tuple(TASK_SPECS)
EVAL_TASKS = ("shapes", "vqav2", "okvqa", "gqa", "nocaps", "coco_caption")

# Built-in example sets for calibration and restoration training: captions stand in for the paper's
# CC3M captions; questions are the task's own data; mix is both.
BUILTIN_SETS = ("shapes-captions", "shapes-vqa", "shapes-mix")
DATA_HELP = f"{', '.join(BUILTIN_SETS)}, or TASK=SOURCE (TASK a sparsevlm.data.hf task, SOURCE a dataset name or path)"


def parse_data_spec(value: str) -> tuple[str, str | None]:
    """`(built-in name, None)` or `(task, source)` from a data flag; a clear error naming the value otherwise."""
    if value in BUILTIN_SETS:
        return value, None
    task, sep, source = value.partition("=")
    if not sep or not source or task not in TASKS:
        raise ValueError(f"data {value!r} is neither a built-in set nor TASK=SOURCE; allowed: {DATA_HELP} "
                         f"with TASK one of {', '.join(TASKS)}")
    return task, source
