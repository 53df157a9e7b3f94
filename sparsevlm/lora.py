"""LoRA and SparseLoRA as a parameterization over params.

LoRA factors live in their own tree, `{path: {"a": [r, in], "b": [out, r]}}` nested like the params
(A random, B zero, scale = alpha / r). Two modes for a pruned kernel W with keep-mask M:

- `lora` (the paper's baseline): W⊙M + s·(B@A)ᵀ — dense again once merged;
- `sparselora`: (W + s·(B@A)ᵀ)⊙M — merged weights keep exactly the mask's zeros.

(Flax kernels are `[in, out]`, hence the transpose of the PyTorch-layout B@A.) During training
each `Linear` computes its own output under `lora_scope`, rematerialised (`jax.checkpoint`): the
SparseLoRA effective kernel exists only while its layer runs, forward or backward, so a step never
holds a second full copy of the weights. `lora` mode adds the low-rank path s·(x Aᵀ) Bᵀ without
building a dense update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from functools import partial
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsevlm.models.layers import Linear, linear
from sparsevlm.pruning.masks import flat_masks
from sparsevlm.tree import flatten, match_rules, unflatten

PyTree = Any
Array = jax.Array

MODES = ("lora", "sparselora")
# Per tower, the kernels the paper adapts, as regexes over our paths. In HF names: ViT qkv, proj,
# fc1, fc2 (CLIP: q/k/v/out_proj, fc1, fc2); Q-Former query, key, value, dense; Llama/Vicuna
# q/k/v/o/gate/up/down_proj; OPT q/k/v/out_proj, fc1, fc2; T5 q, k, v, o, wi_0, wi_1, wo.
TOWER_TARGETS = {
    "vision": r"vision/blocks_\d+/(attn/(q|k|v|o)|mlp/(up|down))/kernel",
    "mlp_connector": r"connector/(up|down)/kernel",
    "qformer_connector": r"connector/blocks_\d+/((attn|cross)/(q|k|v|o)|(mlp|text_mlp)/(up|down))/kernel",
    "language": r"language/((encoder|decoder)/)?blocks_\d+/((attn|cross)/(q|k|v|o)|mlp/(gate|up|down))/kernel",
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which kernels get LoRA factors (regex over param paths → rank) and the scale numerator alpha.

    Paper defaults: vision r=4, connector (Q-Former) r=2, language r=8, alpha=16; targets the
    attention q, k, v, o and the MLP kernels.
    """

    targets: tuple[tuple[str, int], ...] = (
        (TOWER_TARGETS["vision"], 4),
        (TOWER_TARGETS["mlp_connector"], 2),
        (TOWER_TARGETS["language"], 8),
    )
    alpha: float = 16.0

    def __post_init__(self) -> None:
        for pattern, rank in self.targets:
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"LoRA rank {rank!r} for targets {pattern!r} must be a positive integer")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha {self.alpha!r} must be positive")

    @classmethod
    def with_ranks(
        cls, vision: int = 4, connector: int = 2, language: int = 8, alpha: float = 16.0, connector_kind: str = "mlp"
    ) -> "LoraConfig":
        """The paper's targets for a model with this connector kind (`mlp` or `qformer`), with per-tower ranks."""
        return cls(
            ((TOWER_TARGETS["vision"], vision), (TOWER_TARGETS[f"{connector_kind}_connector"], connector),
             (TOWER_TARGETS["language"], language)),
            alpha,
        )


def lora_targets(params: PyTree, config: LoraConfig) -> dict[str, int]:
    """`{kernel path: rank}` for every 2-D kernel a target pattern matches; an error if none does."""
    found: dict[str, int] = {}
    for path, value in flatten(params).items():
        rank = match_rules(path, config.targets)
        if rank is not None and getattr(value, "ndim", 0) == 2:
            found[path] = rank
    for pattern, _ in config.targets:
        if not any(match_rules(p, [(pattern, True)]) for p in found):
            raise ValueError(f"LoRA target pattern {pattern!r} matches no kernel of this model")
    return found


def init_lora(params: PyTree, config: LoraConfig, key: Array) -> PyTree:
    """LoRA factors for the targeted kernels: A ~ U(±1/√in) (PEFT's Kaiming init), B = 0."""
    factors = {}
    flat = flatten(params)
    for index, (path, rank) in enumerate(sorted(lora_targets(params, config).items())):
        fan_in, fan_out = flat[path].shape
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, index), (rank, fan_in), jnp.float32, -bound, bound)
        factors[f"{path}/a"] = a
        factors[f"{path}/b"] = jnp.zeros((fan_out, rank), jnp.float32)
    return unflatten(factors)


def _layer_factors(lora: PyTree) -> dict[str, tuple[Array, Array]]:
    flat = flatten(lora)
    paths = {p.rsplit("/", 1)[0] for p in flat}
    return {p: (flat[f"{p}/a"], flat[f"{p}/b"]) for p in paths}


def effective_kernel(
    kernel: Array, mask: Array | None, factors: tuple[Array, Array] | None, alpha: float, mode: str
) -> Array:
    """One layer's effective `[in, out]` kernel under `mode` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"LoRA mode {mode!r} is not one of {', '.join(MODES)}")
    delta = None
    if factors is not None:
        a, b = factors
        delta = (alpha / a.shape[0]) * (b @ a).T.astype(kernel.dtype)
    if mask is None:
        return kernel if delta is None else kernel + delta
    mask = mask.astype(bool)
    if mode == "sparselora" or delta is None:
        full = kernel if delta is None else kernel + delta
        return jnp.where(mask, full, jnp.zeros((), kernel.dtype))
    return jnp.where(mask, kernel, jnp.zeros((), kernel.dtype)) + delta


@contextlib.contextmanager
def lora_scope(lora: PyTree | None, masks: PyTree | None, alpha: float, mode: str) -> Iterator[None]:
    """Within this context, every `Linear` of a model applied from its root uses its effective kernel."""
    factors = _layer_factors(lora) if lora is not None else {}
    kept = flat_masks(masks) if masks is not None else {}

    def interceptor(next_fun, args, kwargs, context):  # noqa: ANN001, ANN202
        module = context.module
        if not (isinstance(module, Linear) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        path = "/".join(module.path) + "/kernel"
        if path not in factors and path not in kept:
            return next_fun(*args, **kwargs)
        kernel = module.get_variable("params", "kernel")
        bias = module.get_variable("params", "bias") if module.use_bias else None
        return _adapted_linear(args[0], kernel, bias, kept.get(path), factors.get(path), alpha, mode, module.dtype)

    with nn.intercept_methods(interceptor):
        yield


@partial(jax.checkpoint, static_argnums=(5, 6, 7))
def _adapted_linear(x: Array, kernel: Array, bias: Array | None, mask: Array | None,
                    factors: tuple[Array, Array] | None, alpha: float, mode: str, dtype: Any) -> Array:
    # Rematerialised: only the inputs are saved for the backward pass, never the effective kernel.
    if mode == "lora" and factors is not None:
        base = kernel if mask is None else jnp.where(mask, kernel, jnp.zeros((), kernel.dtype))
        a, b = factors
        low_rank = jnp.einsum("...i,ri->...r", x.astype(dtype), a.astype(dtype))
        update = jnp.einsum("...r,or->...o", low_rank, b.astype(dtype)) * (alpha / a.shape[0])
        return linear(x, base, bias, dtype) + update
    return linear(x, effective_kernel(kernel, mask, factors, alpha, mode), bias, dtype)


def merge(params: PyTree, lora: PyTree | None, masks: PyTree | None, alpha: float, mode: str) -> PyTree:
    """Plain params with LoRA folded in and masks applied per `mode` (what is exported or evaluated)."""
    factors = _layer_factors(lora) if lora is not None else {}
    kept = flat_masks(masks) if masks is not None else {}
    flat = dict(flatten(params))
    unknown = sorted((set(factors) | set(kept)) - set(flat))
    if unknown:
        raise ValueError(f"LoRA factors or masks name params that do not exist: {unknown[:5]}")
    for path in set(factors) | set(kept):
        flat[path] = effective_kernel(jnp.asarray(flat[path]), kept.get(path), factors.get(path), alpha, mode)
    return unflatten(flat)


def lora_param_count(lora: PyTree) -> int:
    """Number of trainable LoRA scalars."""
    return sum(int(v.size) for v in flatten(lora).values())


__all__: Sequence[str] = [
    "MODES", "LoraConfig", "effective_kernel", "init_lora", "lora_param_count",
    "lora_scope", "lora_targets", "merge",
]
