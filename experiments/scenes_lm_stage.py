"""Which stage limits the scenes model: its LM stage trained on the tower's features or on perfect ones.

The scenes recipe (`config.pretrain_preset("scenes")`) trains a vision tower, freezes it, then trains
the connector and language model. Here that second stage runs on three kinds of frozen image tokens,
with the recipe's optimizer, batch size, steps and question/caption mixture, and is scored per
question type on the test split:

  tower    the trained tower's features (what `pretrain` gives the LM stage; features computed once)
  cells    a perfect tower for the vision stage's own targets: per patch, one-hots of the top object's
           colour, kind, style, centre column and row, the kind of a shape centred there, the patch
  objects  object tokens: a shape's colour, kind, style, centre column and row, and whether it is in
           the box, at the patch holding its centre (the box at its own); other patches empty
  relations  objects, plus each shape's relational labels (`RELATED_LABELS`), what a tower would give
           that computed the relations itself, so that the LM only looks the anchor up: the kind
           of the next shape left of / right of / above / below it and of its nearest
           (where a relation question is asked, the next shape on that side is its answer)

If the LM stage is far from the target even on `objects`, no better tower can close the gap.
`--layouts` says how question batches hold an image's questions: `single` (one per row, the recipe),
`multi-turn` (all of them as turns of one row, loss on every answer: LLaVA's conversations) or
`packed` (in one row, each attending only to the image and to itself: shared-image packing,
`data.batch.pack_by_image`; the image's tokens are computed once and no question sees another's
answer; a batch holds as many images as fill a `single` batch's positions). Each layout trains its
own LM stage on the same frozen tokens; evaluation asks one question at a time.
Accuracy is the answer word's: the argmax at the answer position (scenes answers are one word);
`tower` rows also give greedy exact match through `evaluate_vqa`, the metric of `pretrain`.

    python experiments/scenes_lm_stage.py [--features tower cells objects relations] [--steps 3000]
        [--question-types relation] [--caption-weight 0.05] [--layouts single packed] [--out results] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparsevlm.bundle import ModelBundle  # noqa: E402
from sparsevlm.config import INIT_SCHEMES, VLMConfig, _check_choice, pretrain_preset, scenes_vlm_config  # noqa: E402
from sparsevlm.data import scenes  # noqa: E402
from sparsevlm.data.batch import EncodedSet, PackedSet, encode_vqa, pack_by_image, preprocess_images, round_up  # noqa: E402
from sparsevlm.data.tokenize import build_word_tokenizer  # noqa: E402
from sparsevlm.eval.evaluate import evaluate_vqa  # noqa: E402
from sparsevlm.losses import token_cross_entropy  # noqa: E402
from sparsevlm.models.stages import run_stages  # noqa: E402
from sparsevlm.models.vlm import VLM, forward_stages  # noqa: E402
from sparsevlm.pretrain import frozen_tower, initialise, pretrain_vision  # noqa: E402
from sparsevlm.train import TrainState, make_optimizer, make_train_step  # noqa: E402

from common import markdown_table, write_outputs  # noqa: E402

STEM = "scenes_lm_stage"
FEATURES = ("tower", "cells", "objects", "relations")
LAYOUTS = ("single", "multi-turn", "packed")  # how the LM stage's question batches hold an image's questions
TYPES = scenes.QUESTION_TYPES
# Relational labels of a shape: the next shape on each side (`side_neighbour`), and its nearest (`scenes.nearest`).
RELATED_LABELS = {"left": "left of", "right": "right of", "above": "above", "below": "below", "nearest": None}


def split_at_connector(config: VLMConfig) -> int:
    """Index of the first stage after the vision tower in `forward_stages(config)`."""
    return next(i for i, s in enumerate(forward_stages(config)) if not s.prefix.startswith("vision"))


def tower_features(model: VLM, params: Any, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """The vision tower's output tokens `[N, tokens, width]` for uint8 images (what the connector reads)."""
    head = forward_stages(model.config)[: split_at_connector(model.config)]
    run = jax.jit(lambda p, x: model.apply({"params": p}, {"images": x},
                                           method=lambda m, c: run_stages(m, head, c))["x"])
    return np.concatenate([np.asarray(run(params, preprocess_images(images[i:i + batch], model.config.vision)))
                           for i in range(0, len(images), batch)])


def _one_hot_rows(columns: list[tuple[np.ndarray, int]], width: int) -> np.ndarray:
    """Per row, the one-hots of each `(labels, classes)` column side by side, zero-padded to `width`."""
    out = np.zeros((len(columns[0][0]), width), np.float32)
    offset = 0
    for labels, classes in columns:
        out[np.arange(len(labels)), offset + labels] = 1.0
        offset += classes
    if offset > width:
        raise ValueError(f"{offset} one-hot features do not fit the tower's width {width}")
    return out


def cell_tokens(scene_key: str, grid: int, width: int) -> np.ndarray:
    """`[grid², width]`: the vision stage's per-patch targets (`scenes.probe_labels`) as one-hots."""
    labels = scenes.probe_labels(scene_key, grid)
    classes = scenes.probe_classes(grid)
    return _one_hot_rows([(labels[name], classes[name]) for name in classes], width)


def object_tokens(scene_key: str, grid: int, width: int, related: bool = False) -> np.ndarray:
    """`[grid², width]`: each object's attributes at the patch holding its centre (two sharing one: summed);
    `related` adds the kinds of the next shape on each side and of the nearest (`RELATED_LABELS`)."""
    scene = scenes.Scene.from_key(scene_key)
    colors, kinds = list(scenes.COLORS), (*scenes.SHAPES, scenes.BOX)
    bins = scenes.POSITION_BINS
    out = np.zeros((grid * grid, width), np.float32)
    for obj in scene.objects:
        cell = min(int(obj.y * grid), grid - 1) * grid + min(int(obj.x * grid), grid - 1)
        style = scenes.STYLES.index(obj.style)
        column, row = (min(int(v * bins), bins - 1) for v in (obj.x, obj.y))
        in_box = int(obj.kind != scenes.BOX and scene.in_box(obj))
        columns = [(colors.index(obj.color), len(colors)), (kinds.index(obj.kind), len(kinds)),
                   (style, len(scenes.STYLES)), (column, bins), (row, bins), (in_box, 2)]
        if related:
            columns += [(_related_kind(scene, obj, relation), len(scenes.SHAPES) + 1)
                        for relation in RELATED_LABELS.values()]
        out[cell] += _one_hot_rows([(np.array([v]), n) for v, n in columns], width)[0]
    return out


def side_neighbour(scene: scenes.Scene, relation: str, anchor: scenes.SceneObject) -> scenes.SceneObject | None:
    """The shape nearest `anchor` along the axis among those clearly `relation` it; None when there is none."""
    axis = "x" if relation in ("left of", "right of") else "y"
    beyond = [o for o in scene.shapes if o is not anchor and scenes.relation_holds(o, relation, anchor)]
    return min(beyond, key=lambda o: abs(getattr(o, axis) - getattr(anchor, axis)), default=None)


def _related_kind(scene: scenes.Scene, obj: scenes.SceneObject, relation: str | None) -> int:
    """`obj`'s relational label: 1 + the related shape's kind (0: none, or `obj` is the box)."""
    if obj.kind == scenes.BOX:
        return 0
    other = scenes.nearest(scene, obj) if relation is None else side_neighbour(scene, relation, obj)
    return 0 if other is None else scenes.SHAPES.index(other.kind) + 1


def image_scenes(data: Any, pool: EncodedSet) -> list[str]:
    """The scene key of every image row of `pool` (encoded from `data`)."""
    first = {}
    for example, image in enumerate(pool.image_index):
        first.setdefault(int(image), example)
    keys = data["scene"]
    return [keys[first[image]] for image in range(len(pool.images))]


def features_for(kind: str, data: Any, pool: EncodedSet, model: VLM, params: Any) -> np.ndarray:
    """Frozen image tokens of `kind` for every image row of `pool`."""
    if kind == "tower":
        return tower_features(model, params, pool.images)
    vision = model.config.vision
    grid, width = vision.image_size // vision.patch_size, vision.width
    if kind == "cells":
        return np.stack([cell_tokens(key, grid, width) for key in image_scenes(data, pool)])
    return np.stack([object_tokens(key, grid, width, kind == "relations") for key in image_scenes(data, pool)])


def batch_from(pool: EncodedSet | PackedSet, features: np.ndarray, chosen: np.ndarray, length: int, pad_id: int,
               vision: Any) -> dict[str, np.ndarray]:
    """The examples at `chosen`, their images replaced by their frozen tokens (packed rows: with `segments`)."""
    batch = pool.collate(chosen, length, pad_id, vision)
    rows = {"x": features[pool.image_rows(chosen)], "tokens": batch.tokens, "text_mask": batch.text_mask,
            "loss_mask": batch.loss_mask}
    return rows if batch.segments is None else rows | {"segments": batch.segments}


def conversation_from(pool: EncodedSet, features: np.ndarray, turns: tuple[np.ndarray, ...], chosen: np.ndarray,
                      length: int, pad_id: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One row per chosen image: all its questions as turns in a random order (BOS once), left-padded to
    `length`, the loss on every answer (LLaVA's multi-turn conversations)."""
    tokens = np.full((len(chosen), length), pad_id, np.int32)
    text_mask = np.zeros((len(chosen), length), bool)
    loss_mask = np.zeros((len(chosen), length), bool)
    for row, image in enumerate(chosen):
        ids: list[int] = []
        answer: list[bool] = []
        for turn, example in enumerate(rng.permutation(turns[image])):
            seq, n_prompt = pool.sequences[example]
            skip = 1 if turn else 0  # the BOS starts the first turn only
            ids += seq[skip:]
            answer += [False] * (n_prompt - skip) + [True] * (len(seq) - n_prompt)
        if len(ids) > length:
            raise ValueError(f"a conversation of {len(ids)} tokens does not fit length={length}")
        tokens[row, length - len(ids):] = ids
        text_mask[row, length - len(ids):] = True
        loss_mask[row, length - len(ids):] = answer
    return {"x": features[chosen], "tokens": tokens, "text_mask": text_mask, "loss_mask": loss_mask}


def lm_stage_logits(model: VLM) -> Callable[[Any, dict[str, Any]], jax.Array]:
    """`logits(params, batch)` over the text positions, from frozen tokens `batch["x"]` on (connector and LM)."""
    tail = forward_stages(model.config)[split_at_connector(model.config):]

    def logits(params: Any, batch: dict[str, Any]) -> jax.Array:
        carry = {"x": batch["x"], "tokens": batch["tokens"], "text_mask": batch["text_mask"],
                 "target_mask": batch["loss_mask"]}
        if "segments" in batch:
            carry["segments"] = batch["segments"]
        out = model.apply({"params": params}, carry, method=lambda m, c: run_stages(m, tail, c))["logits"]
        return out[:, -batch["tokens"].shape[1]:]

    return logits


def answer_accuracy(logits_fn: Any, params: Any, pool: EncodedSet, features: np.ndarray, pad_id: int,
                    vision: Any, batch: int = 256) -> dict[str, Any]:
    """Accuracy of the argmax at each example's first answer position, overall and per question type."""
    length = round_up(pool.max_length, 8)
    right = []
    for start in range(0, len(pool), batch):
        chosen = np.arange(start, min(start + batch, len(pool)))
        rows = batch_from(pool, features, chosen, length, pad_id, vision)
        first = rows["loss_mask"].argmax(axis=1)
        logits = np.asarray(logits_fn(params, rows))
        predicted = logits[np.arange(len(chosen)), first - 1].argmax(-1)
        right.append(predicted == rows["tokens"][np.arange(len(chosen)), first])
    hits = np.concatenate(right)
    types = np.asarray(pool.question_types)
    return {"accuracy": float(hits.mean()), "n": int(hits.size),
            "by_type": {t: float(hits[types == t].mean()) for t in TYPES if (types == t).any()}}


def question_rows(layout: str, pool: EncodedSet, batch_size: int, image_tokens: int) -> tuple[Any, int, int]:
    """The question units of `layout` (`LAYOUTS`), their padded text length and how many a batch holds.

    `single` and `multi-turn` batches hold `batch_size` units; `packed` ones as many images as fill
    the positions (image tokens included) of a `single` batch, so that a step costs about the same.
    """
    single = round_up(pool.max_length, 8)
    if layout == "single":
        return pool, single, batch_size
    packed = pack_by_image(pool)
    if layout == "multi-turn":
        return packed, round_up(max(len(g) for g in packed.groups) * pool.max_length, 8), batch_size
    length = round_up(packed.max_length, 8)
    return packed, length, max(1, batch_size * (single + image_tokens) // (length + image_tokens))


def run(features: list[str], steps: int, images: int, vision_steps: int, question_types: list[str] | None,
        caption_weight: float | None, seed: int, eval_images: int | None,
        layouts: tuple[str, ...] = ("single",), learning_rate: float | None = None,
        batch_size: int | None = None, init: str | None = None,
        vision_init: str | None = None) -> list[dict[str, Any]]:
    """Train the LM stage once per kind of frozen tokens and question layout; test accuracy per question type.

    `layouts` (`LAYOUTS`): one question per row; `multi-turn`, each image's questions as turns of one
    row (`conversation_from`); `packed`, in one row each attending only to the image and itself
    (`pack_by_image`). Multi-turn and packed batches count images, also for the question pool's size
    in the mixture; caption batches are the same in every layout. `learning_rate`, `batch_size` and
    `init` (`config.INIT_SCHEMES`) override the recipe's (None: keep them); `vision_init` overrides
    `init` for the vision stage alone."""
    for layout in layouts:
        _check_choice("layout", layout, LAYOUTS)
    preset = pretrain_preset("scenes")
    overrides = {k: v for k, v in (("learning_rate", learning_rate), ("batch_size", batch_size), ("init", init))
                 if v is not None}
    recipe = dataclasses.replace(preset, steps=steps, train_images=images, vision_steps=vision_steps, seed=seed,
                                 warmup_steps=min(preset.warmup_steps, steps // 10),  # a short run warms up less
                                 **overrides)
    tokenizer = build_word_tokenizer(scenes.vocabulary())
    config = scenes_vlm_config(len(tokenizer))
    size = config.vision.image_size
    train = scenes.build_split("train", images, seed=seed, image_size=size)
    asked = train if not question_types else train.filter(lambda t: t in question_types,
                                                          input_columns="question_type")
    captions = scenes.captioning_view(train)
    test = scenes.build_split("test", eval_images, seed=seed, image_size=size)
    data = [asked, captions]
    pools = [encode_vqa(d, tokenizer, with_targets=True) for d in data]
    test_pool = encode_vqa(test, tokenizer, with_targets=True)
    model = VLM(config)
    init = pools[0].collate(np.arange(2), round_up(pools[0].max_length, 8), tokenizer.pad_token_id, config.vision)
    params = model.init(jax.random.key(seed), init.images, init.tokens, init.text_mask)["params"]
    params = initialise(params, recipe.init, jax.random.key(seed + 2))
    tower_stats, vision_init = None, vision_init or recipe.init
    if "tower" in features:
        params["vision"], tower_stats = pretrain_vision(config.vision, pools[1].images, list(captions["scene"]),
                                                        vision_steps, recipe.vision_batch_size, seed, False,
                                                        task="scenes", init=vision_init)
    logits_fn = lm_stage_logits(model)

    def loss_fn(params: Any, batch: dict[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
        total, count = token_cross_entropy(logits_fn(params, batch), batch["tokens"], batch["loss_mask"])
        return total / jnp.maximum(count, 1.0), {"tokens": count}

    caption_length = round_up(pools[1].max_length, 8)
    rows = []
    for kind in features:
        frozen = [features_for(kind, d, p, model, params) for d, p in zip(data, pools)]
        test_tokens = features_for(kind, test, test_pool, model, params)
        for layout in layouts:
            started = time.perf_counter()
            questions, length, per_batch = question_rows(layout, pools[0], recipe.batch_size,
                                                         config.num_image_tokens)
            sizes = [len(questions), len(pools[1])]
            weights = np.asarray(sizes, float) if caption_weight is None else np.asarray(
                [1.0 - caption_weight, caption_weight])
            optimizer = make_optimizer(recipe.learning_rate, recipe.end_learning_rate, recipe.warmup_steps, steps,
                                       recipe.weight_decay, recipe.grad_clip)
            frozen_loss, frozen_optimizer = frozen_tower(loss_fn, optimizer, params, "vision")
            step = make_train_step(frozen_loss, frozen_optimizer)
            state = TrainState(params, frozen_optimizer.init(params), jnp.zeros((), jnp.int32))
            rng = np.random.default_rng(seed)
            asked_per_step = []
            for done in range(1, steps + 1):
                if rng.choice(2, p=weights / weights.sum()) == 1:
                    chosen = rng.choice(sizes[1], recipe.batch_size, replace=False)
                    batch = batch_from(pools[1], frozen[1], chosen, caption_length, tokenizer.pad_token_id,
                                       config.vision)
                else:
                    chosen = rng.choice(sizes[0], per_batch, replace=False)
                    if layout == "multi-turn":
                        batch = conversation_from(pools[0], frozen[0], questions.groups, chosen, length,
                                                  tokenizer.pad_token_id, rng)
                    else:
                        batch = batch_from(questions, frozen[0], chosen, length, tokenizer.pad_token_id,
                                           config.vision)
                    asked_per_step.append(int(np.sum(batch["loss_mask"][:, 1:] & ~batch["loss_mask"][:, :-1])))
                state, metrics = step(state, batch)
                if done % 500 == 0:
                    print(f"{kind}, {layout}: step {done} loss {float(metrics['loss']):.3f}", flush=True)
            trained = time.perf_counter() - started
            score = answer_accuracy(jax.jit(logits_fn), state.params, test_pool, test_tokens,
                                    tokenizer.pad_token_id, config.vision)
            row = {"features": kind, "layout": layout, "steps": steps, "images": images,
                   "question_types": question_types or "all", "learning_rate": recipe.learning_rate,
                   "batch_size": per_batch, "questions_per_step": float(np.mean(asked_per_step or [0])),
                   "init": recipe.init, "vision_init": vision_init if kind == "tower" else None,
                   "final_loss": float(metrics["loss"]), "train_seconds": round(trained, 1)} | score
            if kind == "tower":
                greedy = evaluate_vqa(ModelBundle(config, jax.device_get(state.params), tokenizer), test,
                                      progress=False)
                row |= {"greedy_accuracy": greedy["accuracy"], "vision_stage": tower_stats}
            print(f"{kind}, {layout}: test {row['accuracy']:.4f} {row['by_type']} ({row['train_seconds']} s)",
                  flush=True)
            rows.append(row)
    return rows


def report(rows: list[dict[str, Any]]) -> tuple[str, Any]:
    """Table and bar chart: accuracy per question type for each kind of frozen tokens and question layout."""
    table = [[r["features"], r["layout"], r["accuracy"], *(r["by_type"].get(t, "") for t in TYPES)] for r in rows]
    markdown = f"## {STEM}\n\n" + markdown_table(["features", "layout", "test", *TYPES], table)
    figure, ax = plt.subplots(figsize=(7, 3))
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        ax.bar(np.arange(len(TYPES)) + i * width, [r["by_type"].get(t, 0.0) for t in TYPES], width,
               label=f"{r['features']}, {r['layout']} ({r['accuracy']:.3f})")
    ax.set_xticks(np.arange(len(TYPES)) + 0.4 - width / 2, TYPES)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return markdown, figure


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run the study, write the outputs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", nargs="+", default=list(FEATURES), choices=FEATURES)
    parser.add_argument("--steps", type=int, default=None, help="LM steps (default: the scenes recipe's)")
    parser.add_argument("--images", type=int, default=None, help="training images (default: the recipe's)")
    parser.add_argument("--vision-steps", type=int, default=None, help="vision stage steps (default: the recipe's)")
    parser.add_argument("--question-types", nargs="+", default=None, choices=TYPES, help="train on these only")
    parser.add_argument("--caption-weight", type=float, default=None,
                        help="share of caption batches (default: by pool size, as pretrain)")
    parser.add_argument("--eval-images", type=int, default=None, help="test images (default: the whole split)")
    parser.add_argument("--layouts", nargs="+", default=["single"], choices=LAYOUTS,
                        help="question rows: one question each, an image's questions as turns (loss on every "
                             "answer), or packed (each attends only to the image and itself); one run per layout")
    parser.add_argument("--learning-rate", type=float, default=None, help="peak LR (default: the recipe's)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step (default: the recipe's)")
    parser.add_argument("--init", default=None, choices=INIT_SCHEMES,
                        help="initial linear kernels (default: the recipe's; see PretrainConfig.init)")
    parser.add_argument("--vision-init", default=None, choices=INIT_SCHEMES,
                        help="initial linear kernels of the vision stage (default: --init's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results")
    parser.add_argument("--quick", action="store_true", help="small budgets, for CI")
    args = parser.parse_args(argv)
    if args.caption_weight is not None and not 0.0 <= args.caption_weight < 1.0:
        parser.error(f"--caption-weight={args.caption_weight} must be in [0, 1)")
    recipe = pretrain_preset("scenes")
    quick = {"steps": 30, "images": 300, "vision_steps": 10, "eval_images": 40} if args.quick else {}
    budget = {name: getattr(args, name) if getattr(args, name) is not None else quick.get(name, default)
              for name, default in (("steps", recipe.steps), ("images", recipe.train_images),
                                    ("vision_steps", recipe.vision_steps), ("eval_images", None))}
    rows = run(args.features, budget["steps"], budget["images"], budget["vision_steps"], args.question_types,
               args.caption_weight, args.seed, budget["eval_images"], tuple(args.layouts), args.learning_rate,
               args.batch_size, args.init, args.vision_init)
    markdown, figure = report(rows)
    write_outputs(args.out, STEM, {"rows": rows, "recipe": budget}, markdown, figure)


if __name__ == "__main__":
    main()
