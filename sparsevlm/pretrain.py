"""The default model: a tiny LLaVA-style VLM trained from scratch on shapes VQA + captions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from sparsevlm.checkpoint import ModelBundle, save_model
from sparsevlm.config import PretrainConfig, VLMConfig, default_vlm_config
from sparsevlm.data import shapes
from sparsevlm.data.batch import Batch, EncodedSet, encode_vqa, iterate_batches
from sparsevlm.data.tokenize import build_word_tokenizer
from sparsevlm.eval.evaluate import evaluate_vqa, round_up
from sparsevlm.models.vlm import VLM
from sparsevlm.train import TrainState, batch_arrays, make_optimizer, make_train_step
from sparsevlm.tree import count_params


def _endless(data: EncodedSet, batch_size: int, length: int, pad_id: int, model_config: VLMConfig,
             rng: np.random.Generator) -> Iterator[Batch]:
    while True:
        for batch, _ in iterate_batches(data, batch_size, length, pad_id, model_config.vision, rng, drop_remainder=True):
            yield batch


def pretrain(
    config: PretrainConfig,
    out_dir: str | Path | None = None,
    model_config: VLMConfig | None = None,
    eval_images: int | None = None,
    progress: bool = True,
) -> ModelBundle:
    """Train a VLM on shapes VQA (questions + captions), evaluate on the test split, optionally save."""
    tokenizer = build_word_tokenizer(shapes.vocabulary())
    model_config = model_config or default_vlm_config(len(tokenizer))
    if model_config.language.vocab_size < len(tokenizer):
        raise ValueError(
            f"language.vocab_size={model_config.language.vocab_size} is smaller than the tokenizer ({len(tokenizer)})"
        )
    started = time.perf_counter()
    train = shapes.build_split("train", config.train_images, seed=config.seed,
                               image_size=model_config.vision.image_size)
    pools = [
        encode_vqa(train, tokenizer, with_targets=True),
        encode_vqa(shapes.captioning_view(train), tokenizer, with_targets=True),
    ]
    pool_sizes = np.array([len(p) for p in pools], float)
    rng = np.random.default_rng(config.seed)
    streams = [
        _endless(p, config.batch_size, round_up(p.max_length, 8), tokenizer.pad_token_id, model_config, rng)
        for p in pools
    ]

    model = VLM(model_config)
    init_batch = next(iter(iterate_batches(pools[0], 2, 8 * 2, tokenizer.pad_token_id, model_config.vision)))[0]
    params = model.init(jax.random.key(config.seed), init_batch.images, init_batch.tokens, init_batch.text_mask)["params"]
    optimizer = make_optimizer(
        config.learning_rate, config.end_learning_rate, config.warmup_steps, config.steps,
        config.weight_decay, config.grad_clip,
    )
    state = TrainState(params, optimizer.init(params), np.zeros((), np.int32))
    step_fn = make_train_step(model, optimizer)
    print(f"pretraining default VLM: {count_params(params):,} params, {len(pools[0]):,} questions, "
          f"{len(pools[1]):,} captions, {config.steps} steps of {config.batch_size}")

    history: list[dict[str, float]] = []
    bar = tqdm(range(config.steps), desc="pretrain", disable=not progress, mininterval=1.0)
    running = None
    for step in bar:
        stream = streams[int(rng.choice(len(pools), p=pool_sizes / pool_sizes.sum()))]
        state, metrics = step_fn(state, batch_arrays(next(stream)))
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
    train_seconds = time.perf_counter() - started

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
    }
    bundle = ModelBundle(model_config, params, tokenizer, metadata)
    if out_dir is not None:
        save_model(out_dir, bundle, overwrite=True)
        print(f"saved to {out_dir}")
    return bundle
