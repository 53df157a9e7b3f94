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
    """How a task reads its source: the row kind, the default split, what the paper uses it for, and hub defaults.

    `config` and `data_files` are used only when the source has them (and none is passed);
    `min_answers` is what the task's metric needs per question; `hub` the hub dataset tested for it.
    """

    kind: str
    split: str
    purpose: str
    hub: str
    config: str | None = None
    data_files: str | None = None
    min_answers: int = 1

    @property
    def groups_references(self) -> bool:
        """Whether rows of one image are merged into one row with every reference (CIDEr-D scores per image)."""
        return self.kind == "caption" and self.purpose == "evaluation"


TASK_SPECS: dict[str, TaskSpec] = {
    "vqav2": TaskSpec("vqa", "validation", "evaluation", "lmms-lab/VQAv2", min_answers=2),
    "okvqa": TaskSpec("vqa", "val2014", "evaluation", "lmms-lab/OK-VQA", min_answers=2),
    "gqa": TaskSpec("vqa", "testdev", "evaluation", "lmms-lab/GQA", config="testdev_balanced_instructions"),
    "nocaps": TaskSpec("caption", "validation", "evaluation", "lmms-lab/NoCaps"),
    "coco_caption": TaskSpec("caption", "test", "evaluation", "yerevann/coco-karpathy"),
    "coco_caption_train": TaskSpec("caption", "train", "restoration", "yerevann/coco-karpathy"),
    "cc3m_instruct": TaskSpec("caption", "train", "restoration", "liuhaotian/LLaVA-CC3M-Pretrain-595K",
                              data_files="chat.json"),
    "cc3m": TaskSpec("prefix_caption", "train", "calibration", "pixparse/cc3m-wds"),
    "coco_caption_prefix": TaskSpec("prefix_caption", "train", "calibration", "yerevann/coco-karpathy"),
    "visual_genome": TaskSpec("prefix_caption", "train", "calibration", "ranjaykrishna/visual_genome (parquet copy)"),
}
TASKS = tuple(TASK_SPECS)
# Built-in generated tasks (`sparsevlm.data.builtin`): shapes VQA (one shape per patch) and scenes VQA
# (objects across patches, relations); each is an evaluation task and names three example sets.
BUILTIN_TASKS = ("shapes", "scenes")
EVAL_TASKS = (*BUILTIN_TASKS, "vqav2", "okvqa", "gqa", "nocaps", "coco_caption")

# Built-in example sets for calibration and restoration training: captions stand in for the paper's
# CC3M captions; questions are the task's own data; mix is both.
BUILTIN_VIEWS = ("captions", "vqa", "mix")
BUILTIN_SETS = tuple(f"{task}-{view}" for task in BUILTIN_TASKS for view in BUILTIN_VIEWS)
DATA_HELP = f"{', '.join(BUILTIN_SETS)}, or TASK=SOURCE (TASK a sparsevlm.data.hf task, SOURCE a dataset name or path)"


def builtin_set(name: str) -> tuple[str, str]:
    """`(task, view)` of a built-in example set name such as `scenes-mix`."""
    if name not in BUILTIN_SETS:
        raise ValueError(f"{name!r} is not a built-in set; allowed: {', '.join(BUILTIN_SETS)}")
    task, _, view = name.partition("-")
    return task, view


def parse_data_spec(value: str) -> tuple[str, str | None]:
    """`(built-in name, None)` or `(task, source)` from a data flag; a clear error naming the value otherwise."""
    if value in BUILTIN_SETS:
        return value, None
    task, sep, source = value.partition("=")
    if not sep or not source or task not in TASKS:
        raise ValueError(f"data {value!r} is neither a built-in set nor TASK=SOURCE; allowed: {DATA_HELP} "
                         f"with TASK one of {', '.join(TASKS)}")
    return task, source
