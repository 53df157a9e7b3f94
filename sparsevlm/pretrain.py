"""The built-in models: tiny LLaVA-style VLMs trained from scratch on a built-in task's VQA + captions."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jax.sharding import Mesh

from sparsevlm import sharding, trainer
from sparsevlm.bundle import ModelBundle
from sparsevlm.checkpoint import TrainingCheckpoints, save_model
from sparsevlm.config import INIT_SCHEMES, RUN_ONLY_FIELDS, PretrainConfig, _check_choice, VisionConfig, VLMConfig, builtin_vlm_config
from sparsevlm.data.builtin import data_fingerprint, task_module
from sparsevlm.data.batch import (
    BatchStream,
    MixedStream,
    RandomRows,
    encode_vqa,
    iterate_batches,
    pack_by_image,
    preprocess_images,
    round_up,
)
from sparsevlm.data.tokenize import build_word_tokenizer
from sparsevlm.eval.evaluate import evaluate_vqa
from sparsevlm.models.vit import ViT
from sparsevlm.models.vlm import VLM
from sparsevlm.train import TrainState, batch_arrays, lm_loss, make_optimizer, make_train_step
from sparsevlm.tree import count_params


class CellProbe(nn.Module):
    """Vision tower + linear heads naming each grid cell's attributes (vision pretraining).

    Stands in for the CLIP pretraining a real LLaVA tower has had: the LM stage then starts from a
    tower whose tokens already say what is where. `heads` maps a label to its classes (the task's
    `probe_classes`); the heads are discarded afterwards.
    """

    config: VisionConfig
    grid: int
    heads: tuple[tuple[str, int], ...]

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        features = ViT(self.config, name="vision")(images)
        cells = pool_to_grid(features, self.grid)
        return {name: nn.Dense(size, name=f"{name}_head")(cells) for name, size in self.heads}


def pool_to_grid(features: jax.Array, grid: int) -> jax.Array:
    """Patch tokens `[B, s*s, W]` → mean per grid cell `[B, grid*grid, W]` (s divisible by grid)."""
    batch, num, width = features.shape
    side = int(round(num**0.5))
    if side * side != num or side % grid:
        raise ValueError(f"{num} patch tokens do not tile a {grid}x{grid} grid")
    per = side // grid
    pooled = features.reshape(batch, grid, per, grid, per, width).mean(axis=(2, 4))
    return pooled.reshape(batch, grid * grid, width)


def initialise(params: dict[str, Any], scheme: str, key: jax.Array) -> dict[str, Any]:
    """`params` as initialised under `scheme` (`config.INIT_SCHEMES`): "normal" keeps the modules' own init;
    "fan-in" redraws every 2-D `kernel` from N(0, 1/fan_in) (LeCun normal), keeping the other leaves."""
    _check_choice("init", scheme, INIT_SCHEMES)
    if scheme == "normal":
        return params
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    drawn = [
        jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype) / np.sqrt(leaf.shape[0])
        if leaf.ndim == 2 and getattr(path[-1], "key", None) == "kernel" else leaf
        for i, (path, leaf) in enumerate(leaves)
    ]
    return jax.tree_util.tree_unflatten(tree, drawn)


def frozen_tower(loss_fn: Any, optimizer: optax.GradientTransformation, params: dict[str, Any],
                 tower: str) -> tuple[Any, optax.GradientTransformation]:
    """`loss_fn` and `optimizer` that leave `params[tower]` exactly as it is.

    The loss sees the tower under `stop_gradient` (no backward pass through it), and the tower's
    updates are zeroed after the optimizer (so weight decay does not shrink it either).
    """

    def frozen_loss(params: Any, batch: dict[str, jax.Array]) -> Any:
        return loss_fn({**params, tower: jax.lax.stop_gradient(params[tower])}, batch)

    frozen = {name: jax.tree.map(lambda _: name == tower, value) for name, value in params.items()}
    return frozen_loss, optax.chain(optimizer, optax.masked(optax.set_to_zero(), frozen))


def _placed(loss_fn: Any, optimizer: optax.GradientTransformation, state: TrainState, example: dict[str, Any],
            mesh: Mesh | None, batch_size: int) -> tuple[Any, TrainState, Any]:
    """The jit step, the placed state and the batch placement of a full-parameter run on `mesh` (or one device).

    On a mesh each process's batches are its rows of the global batch (`sharding.host_rows`).
    """
    if mesh is None:
        return make_train_step(loss_fn, optimizer), jax.device_put(state), lambda batch: batch
    shardings = sharding.train_shardings(mesh, optimizer, state, sharding.global_batch(example, mesh, batch_size))
    return (make_train_step(loss_fn, optimizer, shardings), sharding.shard(state, shardings.state),
            lambda batch: sharding.global_batch(batch, mesh, batch_size))


def pretrain_vision(
    config: VisionConfig, images: np.ndarray, scene_keys: list[str], steps: int, batch_size: int, seed: int,
    progress: bool = True, mesh: Mesh | None = None, task: str = "shapes", init: str = "normal",
) -> tuple[dict[str, Any], dict[str, float]]:
    """Train the vision tower to name every cell's attributes (the task's `probe_labels`); its params and accuracies.

    `init` (`config.INIT_SCHEMES`) initialises the tower and its heads (`initialise`)."""
    module = task_module(task)
    grid = module.probe_grid(config.image_size // config.patch_size)
    heads = tuple(module.probe_classes(grid).items())
    labels = [module.probe_labels(key, grid) for key in scene_keys]
    targets = {name: np.stack([label[name] for label in labels]) for name, _ in heads}
    inputs = preprocess_images(images, config)
    probe = CellProbe(config, grid, heads)
    params = initialise(probe.init(jax.random.key(seed + 1), inputs[:1])["params"], init, jax.random.key(seed + 3))
    # A tenth of the steps warm up (at least one, and none for a one-step run, whose decay needs a step).
    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, min(max(steps // 10, 1), steps - 1), steps, 2e-5)
    optimizer = optax.adamw(schedule, weight_decay=0.05)

    def loss_fn(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits = probe.apply({"params": params}, batch["images"])
        losses = [optax.softmax_cross_entropy_with_integer_labels(logits[k], batch[k]).mean() for k, _ in heads]
        return sum(losses), {k: jnp.mean(jnp.argmax(logits[k], -1) == batch[k]) for k, _ in heads}

    rows = sharding.host_rows(mesh, batch_size) if mesh is not None else None
    stream = RandomRows({"images": inputs} | targets, batch_size, np.random.default_rng(seed), rows)
    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
    step, state, place = _placed(loss_fn, optimizer, state, stream.example(), mesh, batch_size)
    result = trainer.run(step, state, stream, steps, place=place, log_every=25, desc="vision", progress=progress)
    vision = sharding.to_host(result.state.params["vision"])
    return vision, {k: result.history[-1][k] for k, _ in heads}


def pretrain(
    config: PretrainConfig,
    out_dir: str | Path | None = None,
    model_config: VLMConfig | None = None,
    eval_images: int | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    mesh: Mesh | None = None,
) -> ModelBundle:
    """Train a VLM on `config.task`'s VQA (questions + captions), evaluate on its test split, optionally save.

    The architecture is the task's default (`builtin_vlm_config`) unless `model_config` is given.

    With `checkpoint_dir` and `config.checkpoint_every`, the train state, the data position and the
    random generator are saved every N steps, and a run finding checkpoints there resumes from the
    newest one (skipping the vision stage, whose result is in the saved params). With `mesh` both
    stages train sharded over it (`sharding.train_shardings`), each process loading only its rows.
    """
    if mesh is None and jax.process_count() > 1:
        raise ValueError(f"pretraining as {jax.process_count()} processes needs a mesh over their devices (--mesh)")
    data = task_module(config.task)
    tokenizer = build_word_tokenizer(data.vocabulary())
    model_config = model_config or builtin_vlm_config(config.task, len(tokenizer))
    if model_config.language.vocab_size < len(tokenizer):
        raise ValueError(
            f"language.vocab_size={model_config.language.vocab_size} is smaller than the tokenizer ({len(tokenizer)})"
        )
    train = data.build_split("train", config.train_images, seed=config.seed,
                               image_size=model_config.vision.image_size)
    captions = data.captioning_view(train)
    pools = [
        encode_vqa(train, tokenizer, with_targets=True),
        encode_vqa(captions, tokenizer, with_targets=True),
    ]
    rng = np.random.default_rng(config.seed)
    rows = sharding.host_rows(mesh, config.batch_size) if mesh is not None else None
    # Packed, captions too (one per image: the same rows), so every batch has the same arrays.
    units = [pack_by_image(p) for p in pools] if config.pack_questions else pools
    streams = [
        BatchStream(p, config.batch_size, round_up(p.max_length, 8), tokenizer.pad_token_id, model_config.vision, rng,
                    rows)
        for p in units
    ]
    # Each batch comes from the questions or the captions: in proportion to their sizes, or by `caption_weight`.
    weights = [len(p) for p in units] if config.caption_weight is None else [1 - config.caption_weight,
                                                                           config.caption_weight]
    stream = MixedStream(streams, weights, rng)

    model = VLM(model_config)
    init_batch = next(iter(iterate_batches(pools[0], 2, 8 * 2, tokenizer.pad_token_id, model_config.vision)))[0]
    params = model.init(jax.random.key(config.seed), init_batch.images, init_batch.tokens, init_batch.text_mask)["params"]
    params = initialise(params, config.init, jax.random.key(config.seed + 2))
    optimizer = make_optimizer(
        config.learning_rate, config.end_learning_rate, config.warmup_steps, config.steps,
        config.weight_decay, config.grad_clip,
    )
    checkpoints = None
    if checkpoint_dir is not None and config.checkpoint_every:
        run = {"pretrain": {k: v for k, v in dataclasses.asdict(config).items() if k not in RUN_ONLY_FIELDS},
               "model": model_config.to_dict()}
        checkpoints = TrainingCheckpoints(checkpoint_dir, run)
    if config.vision_steps and (checkpoints is None or checkpoints.latest_step() is None):
        params["vision"], probe_accuracy = pretrain_vision(
            model_config.vision, pools[1].images, list(captions["scene"]), config.vision_steps,
            config.vision_batch_size, config.seed, progress, mesh, config.task, config.init,
        )
        print(f"vision tower pretrained: per-cell accuracy {probe_accuracy}")
    loss_fn = lm_loss(model)
    if config.freeze_vision:
        loss_fn, optimizer = frozen_tower(loss_fn, optimizer, params, "vision")
    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
    step, state, place = _placed(loss_fn, optimizer, state, batch_arrays(streams[0].example()), mesh,
                                 config.batch_size)
    print(f"pretraining the {config.task} VLM: {count_params(params):,} params, {len(pools[0]):,} questions, "
          f"{len(pools[1]):,} captions, {config.steps} steps of {config.batch_size}"
          + (" images (questions packed)" if config.pack_questions else ""))

    def validate(done: int, state: TrainState) -> None:
        partial = ModelBundle(model_config, sharding.to_host(state.params), tokenizer)
        val = evaluate_vqa(partial, data.build_split("validation", image_size=model_config.vision.image_size),
                           progress=False)
        tqdm.write(f"step {done}: validation accuracy {val['accuracy']:.3f} {val['by_type']}")

    result = trainer.run(
        step, state, stream, config.steps, place=lambda batch: place(batch_arrays(batch)),
        checkpoints=checkpoints, checkpoint_every=config.checkpoint_every, skip_nonfinite=config.skip_nonfinite,
        log_every=25, hooks=[trainer.Hook(config.eval_every, validate)] if config.eval_every else [],
        desc="pretrain", progress=progress,
    )

    params = sharding.to_host(result.state.params)  # gathered from every process of a multi-process run
    bundle = ModelBundle(model_config, params, tokenizer)
    test = data.build_split("test", eval_images, image_size=model_config.vision.image_size)
    evaluation = evaluate_vqa(bundle, test, progress=progress)
    print(f"test accuracy {evaluation['accuracy']:.4f} on {evaluation['n']} questions; by type {evaluation['by_type']}")
    metadata: dict[str, Any] = {
        "pretrain": dataclasses.asdict(config),
        "data": data_fingerprint(config.task),
        "train_seconds": round(result.seconds, 1),
        "test_accuracy": evaluation["accuracy"],
        "test_by_type": evaluation["by_type"],
        "loss_history": result.history,
        "skipped_steps": result.skipped,
    }
    bundle = ModelBundle(model_config, params, tokenizer, metadata)
    if out_dir is not None:
        save_model(out_dir, bundle, overwrite=True)
        print(f"saved to {out_dir}")
    return bundle
