"""What every benchmark shares: the machine it ran on, its JSON output, child processes and flag types."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """Backend, device and software versions the timings were taken on."""
    import flax  # here, not at the top: a PyTorch peer's process imports this module without starting JAX
    import jax
    import jaxlib
    import numpy as np

    return {
        "platform": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "device_count": jax.device_count(),
        "host": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
    }


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write a benchmark's results and say where."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


def write_results(path: str | os.PathLike, payload: dict[str, Any], load_before: float) -> None:
    """`payload` with the machine and the host's 1-minute load average at start and end, as JSON."""
    # Other processes on the host inflate timings: compare the load with cpu_count before trusting them.
    load = {"load_average_1m": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)}}
    write_json(path, payload | machine() | load)


def run_child(script: str, args: list[str], prefix: str, env: dict[str, str] | None = None,
              timeout: float = 3600) -> Any:
    """Run `script args` in a fresh Python process (environment `env`, default this one's); return the JSON it
    printed after `prefix` (its last such line)."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=timeout)
    what = " ".join([Path(script).name, *args])
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(prefix)]
    if not lines:
        raise RuntimeError(f"{what} printed no result:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1][len(prefix):])


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def calibration_inputs(config: Any, samples: int, text_tokens: int, seed: int, bos_id: int,
                       first_text_id: int) -> tuple[Any, Any]:
    """Random images (normalised, `[B, H, W, C]` float32) and token ids `[BOS, <image> × N, text …]`, no padding.

    Text ids are drawn from `[first_text_id, vocab)`, so none is a special token. A model without an
    image placeholder token (its image tokens go before the text) gets `[BOS, text …]`.
    """
    import numpy as np

    from sparsevlm.data.batch import preprocess_images

    rng = np.random.default_rng(seed)
    size = config.vision.image_size
    images = preprocess_images(rng.integers(0, 256, (samples, size, size, 3), dtype=np.uint8), config.vision)
    image_tokens = config.num_image_tokens if config.image_token_id is not None else 0
    tokens = rng.integers(first_text_id, config.language.vocab_size, (samples, 1 + image_tokens + text_tokens))
    tokens[:, 0] = bos_id
    if image_tokens:
        tokens[:, 1 : 1 + image_tokens] = config.image_token_id
    return images.astype(np.float32), tokens.astype(np.int32)
