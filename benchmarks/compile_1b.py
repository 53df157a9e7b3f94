"""First-call compile time of the `1b` restoration step (batch 8 × 624, bf16, SparseLoRA + KL), from abstract shapes.

    PYTHONPATH=. python benchmarks/compile_1b.py [--scan]      # --scan: scanned stacks + block remat

Nothing is allocated. It also runs against older checkouts (`PYTHONPATH=OLD_CHECKOUT`, which lack
`--scan`); that is how the baseline in `benchmarks/measured/compile_1b_cpu_2026-12-01.json` was taken
(commit 6ba259d, before Scale I).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: Sequence[str] | None = None) -> None:
    """Lower and compile the step; print seconds and XLA's temporaries as JSON."""
    import jax
    import jax.numpy as jnp
    from llava import hf_config, sizes

    from sparsevlm.config import LoraConfig
    from sparsevlm.hf.load import vlm_config
    from sparsevlm.lora import init_lora
    from sparsevlm.models.vlm import VLM
    from sparsevlm.train import TrainState, make_optimizer, make_train_step, restoration_loss
    from sparsevlm.tree import flatten, unflatten

    try:
        from sparsevlm.masks import is_prunable
    except ImportError:  # checkouts before the masks module moved up
        from sparsevlm.pruning.masks import is_prunable

    scan = "--scan" in (sys.argv[1:] if argv is None else argv)
    config = vlm_config(hf_config(sizes("1b")), (0.5,) * 3, (0.5,) * 3)
    size, batch_size, length = config.vision.image_size, 8, 624

    def build():  # noqa: ANN202
        params = VLM(config).init(jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1, 4), jnp.int32),
                                  jnp.ones((1, 4), bool))["params"]
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
        masks = unflatten({p: jnp.ones(v.shape, bool) if is_prunable(p, v) else None for p, v in flatten(params).items()})
        lora = init_lora(params, LoraConfig(), jax.random.key(0))
        if scan:
            from sparsevlm.models.vlm import scan_stacks
            from sparsevlm.restoration import step_inputs

            params, masks, lora = step_inputs(params, masks, lora, scan_stacks(config))
        return params, masks, lora

    params, masks, lora = jax.eval_shape(build)
    optimizer = make_optimizer(1e-3, 1e-5, 0, 100, 0.0, 1.0)
    state = jax.eval_shape(lambda f: TrainState(f, optimizer.init(f), jnp.zeros((), jnp.int32)), lora)
    spec = jax.ShapeDtypeStruct
    batch = {"images": spec((batch_size, size, size, 3), jnp.float32), "tokens": spec((batch_size, length), jnp.int32),
             "text_mask": spec((batch_size, length), bool), "loss_mask": spec((batch_size, length), bool),
             "instruction_tokens": None, "instruction_mask": None}
    model = VLM(config, jnp.bfloat16, scan_layers=True, remat="block") if scan else VLM(config, jnp.bfloat16)
    step = make_train_step(restoration_loss(model, 16.0, "sparselora", 0.1, 1.0), optimizer)
    started = time.perf_counter()
    lowered = step.lower(state, batch, params, masks)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    print(json.dumps({"scan": scan, "device": jax.devices()[0].device_kind, "lower_s": round(lowered_at - started, 1),
                      "compile_s": round(done - lowered_at, 1), "total_s": round(done - started, 1),
                      "temp_gib": round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 2)}))


if __name__ == "__main__":
    main()
