"""The default model: a tiny LLaVA-style VLM trained from scratch on shapes VQA + captions."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from sparsevlm.checkpoint import ModelBundle, save_model
from sparsevlm.config import PretrainConfig, VisionConfig, VLMConfig, default_vlm_config
from sparsevlm.data import shapes
from sparsevlm.data.batch import (BatchStream, encode_vqa, iterate_batches, preprocess_images, rng_state,
                                  set_rng_state)
from sparsevlm.data.tokenize import build_word_tokenizer
from sparsevlm.eval.evaluate import evaluate_vqa, round_up
from sparsevlm.models.vit import ViT
from sparsevlm.models.vlm import VLM
from sparsevlm.train import (NonFiniteGuard, TrainingCheckpoints, TrainState, batch_arrays, make_optimizer,
                             make_train_step)
from sparsevlm.tree import count_params


class CellProbe(nn.Module):
    """Vision tower + linear heads for each grid cell's colour, shape and index (vision pretraining).

    Stands in for the CLIP pretraining a real LLaVA tower has had: the LM stage then starts from a
    tower whose tokens already say what is where. The heads are discarded afterwards.
    """

    config: VisionConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        features = ViT(self.config, name="vision")(images)
        cells = pool_to_grid(features, shapes.GRID)
        heads = {"color": len(shapes.COLORS) + 1, "shape": len(shapes.SHAPES) + 1, "cell": shapes.GRID**2}
        return {name: nn.Dense(size, name=f"{name}_head")(cells) for name, size in heads.items()}


def pool_to_grid(features: jax.Array, grid: int) -> jax.Array:
    """Patch tokens `[B, s*s, W]` → mean per grid cell `[B, grid*grid, W]` (s divisible by grid)."""
    batch, num, width = features.shape
    side = int(round(num**0.5))
    if side * side != num or side % grid:
        raise ValueError(f"{num} patch tokens do not tile a {grid}x{grid} grid")
    per = side // grid
    pooled = features.reshape(batch, grid, per, grid, per, width).mean(axis=(2, 4))
    return pooled.reshape(batch, grid * grid, width)


def pretrain_vision(
    config: VisionConfig, images: np.ndarray, scene_keys: list[str], steps: int, batch_size: int, seed: int,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Train the vision tower to name every cell's colour, shape and position; returns its params and accuracies."""
    labels = [shapes.cell_labels(key) for key in scene_keys]
    colors = np.stack([c for c, _ in labels])
    kinds = np.stack([k for _, k in labels])
    inputs = preprocess_images(images, config)
    probe = CellProbe(config)
    params = probe.init(jax.random.key(seed + 1), inputs[:1])["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, max(steps // 10, 1), steps, 2e-5)
    optimizer = optax.adamw(schedule, weight_decay=0.05)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params: Any, opt_state: Any, x: jax.Array, color: jax.Array, kind: jax.Array) -> tuple:
        def loss_fn(params: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
            logits = probe.apply({"params": params}, x)
            targets = {"color": color, "shape": kind, "cell": jnp.broadcast_to(jnp.arange(color.shape[1]), color.shape)}
            losses = [optax.softmax_cross_entropy_with_integer_labels(logits[k], targets[k]).mean() for k in targets]
            accuracy = {k: jnp.mean(jnp.argmax(logits[k], -1) == targets[k]) for k in targets}
            return sum(losses), accuracy

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy

    rng = np.random.default_rng(seed)
    accuracy: dict[str, Any] = {}
    for _ in tqdm(range(steps), desc="vision", disable=not progress, mininterval=1.0):
        index = rng.integers(0, len(inputs), batch_size)
        params, opt_state, _, accuracy = step(params, opt_state, inputs[index], colors[index], kinds[index])
    return params["vision"], {k: float(v) for k, v in accuracy.items()}


def pretrain(
    config: PretrainConfig,
    out_dir: str | Path | None = None,
    model_config: VLMConfig | None = None,
    eval_images: int | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
) -> ModelBundle:
    """Train a VLM on shapes VQA (questions + captions), evaluate on the test split, optionally save.

    With `checkpoint_dir` and `config.checkpoint_every`, the train state, the data position and the
    random generator are saved every N steps, and a run finding checkpoints there resumes from the
    newest one (skipping the vision stage, whose result is in the saved params).
    """
    tokenizer = build_word_tokenizer(shapes.vocabulary())
    model_config = model_config or default_vlm_config(len(tokenizer))
    if model_config.language.vocab_size < len(tokenizer):
        raise ValueError(
            f"language.vocab_size={model_config.language.vocab_size} is smaller than the tokenizer ({len(tokenizer)})"
        )
    started = time.perf_counter()
    train = shapes.build_split("train", config.train_images, seed=config.seed,
                               image_size=model_config.vision.image_size)
    captions = shapes.captioning_view(train)
    pools = [
        encode_vqa(train, tokenizer, with_targets=True),
        encode_vqa(captions, tokenizer, with_targets=True),
    ]
    pool_sizes = np.array([len(p) for p in pools], float)
    rng = np.random.default_rng(config.seed)
    streams = [
        BatchStream(p, config.batch_size, round_up(p.max_length, 8), tokenizer.pad_token_id,
                        model_config.vision, rng)
        for p in pools
    ]

    model = VLM(model_config)
    init_batch = next(iter(iterate_batches(pools[0], 2, 8 * 2, tokenizer.pad_token_id, model_config.vision)))[0]
    params = model.init(jax.random.key(config.seed), init_batch.images, init_batch.tokens, init_batch.text_mask)["params"]
    optimizer = make_optimizer(
        config.learning_rate, config.end_learning_rate, config.warmup_steps, config.steps,
        config.weight_decay, config.grad_clip,
    )
    state = jax.device_put(TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32)))
    checkpoints, resumed = None, None
    if checkpoint_dir is not None and config.checkpoint_every:
        ignored = ("checkpoint_every", "skip_nonfinite", "eval_every")
        run = {"pretrain": {k: v for k, v in dataclasses.asdict(config).items() if k not in ignored},
               "model": model_config.to_dict()}
        checkpoints = TrainingCheckpoints(checkpoint_dir, run)
        resumed = checkpoints.restore(state)
    guard = NonFiniteGuard(config.skip_nonfinite)
    history: list[dict[str, float]] = []
    first, running, earlier_seconds = 0, None, 0.0
    if resumed is not None:
        first, state, extra = resumed
        set_rng_state(rng, extra["rng"])
        for stream, saved in zip(streams, extra["data"]):
            stream.load_state(saved)
        guard.skipped, history, running = extra["skipped"], extra["history"], extra["running"]
        earlier_seconds = extra["seconds"]
        print(f"resuming from step {first} of {config.steps} ({checkpoint_dir})")
    elif config.vision_steps:
        params["vision"], probe_accuracy = pretrain_vision(
            model_config.vision, pools[1].images, list(captions["scene"]), config.vision_steps,
            config.vision_batch_size, config.seed, progress,
        )
        print(f"vision tower pretrained: per-cell accuracy {probe_accuracy}")
        state = state._replace(params=jax.device_put(params))
    step_fn = make_train_step(model, optimizer)
    print(f"pretraining default VLM: {count_params(params):,} params, {len(pools[0]):,} questions, "
          f"{len(pools[1]):,} captions, {config.steps} steps of {config.batch_size}")

    bar = tqdm(range(first, config.steps), desc="pretrain", disable=not progress, mininterval=1.0,
               initial=first, total=config.steps)
    for step in bar:
        stream = streams[int(rng.choice(len(pools), p=pool_sizes / pool_sizes.sum()))]
        state, metrics = step_fn(state, batch_arrays(next(stream)))
        if guard.check(metrics, step, last_good=checkpoints.describe_latest if checkpoints is not None else None):
            continue
        if step % 25 == 0 or step == config.steps - 1:
            loss = float(metrics["loss"])
            running = loss if running is None else 0.8 * running + 0.2 * loss
            history.append({"step": step, "loss": loss})
            bar.set_postfix(loss=f"{running:.3f}")
        if config.eval_every and step and step % config.eval_every == 0:
            partial = ModelBundle(model_config, state.params, tokenizer)
            val = evaluate_vqa(partial, shapes.build_split("validation", image_size=model_config.vision.image_size),
                               progress=False)
            tqdm.write(f"step {step}: validation accuracy {val['accuracy']:.3f} {val['by_type']}")
        if checkpoints is not None and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            extra = {"rng": rng_state(rng), "data": [s.state() for s in streams], "skipped": guard.skipped,
                     "history": history, "running": running,
                     "seconds": earlier_seconds + time.perf_counter() - started}
            checkpoints.save(step + 1, state, extra)
    if checkpoints is not None:
        checkpoints.close()
    train_seconds = earlier_seconds + time.perf_counter() - started

    params = jax.tree.map(np.asarray, state.params)
    bundle = ModelBundle(model_config, params, tokenizer)
    test = shapes.build_split("test", eval_images, image_size=model_config.vision.image_size)
    result = evaluate_vqa(bundle, test, progress=progress)
    print(f"test accuracy {result['accuracy']:.4f} on {result['n']} questions; by type {result['by_type']}")
    metadata: dict[str, Any] = {
        "pretrain": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "train_seconds": round(train_seconds, 1),
        "test_accuracy": result["accuracy"],
        "test_by_type": result["by_type"],
        "loss_history": history,
        "skipped_steps": guard.skipped,
    }
    bundle = ModelBundle(model_config, params, tokenizer, metadata)
    if out_dir is not None:
        save_model(out_dir, bundle, overwrite=True)
        print(f"saved to {out_dir}")
    return bundle
