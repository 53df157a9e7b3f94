"""LoRA and SparseLoRA as a parameterization over params.

LoRA factors live in their own tree, `{path: {"a": [r, in], "b": [out, r]}}` nested like the params
(A random, B zero, scale = alpha / r). Two modes for a pruned kernel W with keep-mask M:

- `lora` (the paper's baseline): W⊙M + s·(B@A)ᵀ — dense again once merged;
- `sparselora`: (W + s·(B@A)ᵀ)⊙M — merged weights keep exactly the mask's zeros.

(Flax kernels are `[in, out]`, hence the transpose of the PyTorch-layout B@A.) During training
the factors and masks ride along as variable collections (`adapter_variables`; masks packed to
1 bit per weight) and each `Linear` computes its own output under `lora_scope`, with its own
backward pass (`custom_vjp`, saving only the layer's inputs): the SparseLoRA effective kernel
exists only while its layer runs, forward or backward, so a step never holds a second full copy of
the weights, and the factors' gradients are reduced across batch shards at their own (rank-r)
size. `lora` mode adds the low-rank path s·(x Aᵀ) Bᵀ without building a dense update.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp

from sparsevlm.config import LORA_MODES, LoraConfig
from sparsevlm.masks import flat_masks, mask_weights, unpack_mask
from sparsevlm.models.layers import intercept_linears, linear
from sparsevlm.sharding import gather_late, sum_over_batch_shards, tie_to
from sparsevlm.tree import flatten, match_rules, unflatten

PyTree = Any
Array = jax.Array


def lora_targets(params: PyTree, config: LoraConfig) -> dict[str, int]:
    """`{kernel path: rank}` for every 2-D kernel a target pattern matches; an error if none does."""
    found: dict[str, int] = {}
    for path, value in flatten(params).items():
        rank = match_rules(path, config.rules)
        if rank is not None and getattr(value, "ndim", 0) == 2:
            found[path] = rank
    for pattern, _ in config.rules:
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
    if mode not in LORA_MODES:
        raise ValueError(f"LoRA mode {mode!r} is not one of {', '.join(LORA_MODES)}")
    delta = None
    if factors is not None:
        a, b = factors
        delta = (alpha / a.shape[0]) * (b @ a).T.astype(kernel.dtype)
    if mask is None:
        return kernel if delta is None else kernel + delta
    mask = mask.astype(bool)
    if mode == "sparselora" or delta is None:
        return mask_weights(kernel if delta is None else kernel + delta, mask)
    return mask_weights(kernel, mask) + delta


def adapter_variables(params: PyTree, lora: PyTree | None = None, masks: PyTree | None = None) -> dict[str, PyTree]:
    """The variables to apply a model with under `lora_scope`: params, and LoRA factors and masks as collections.

    Factors and masks are nested like the params (masks bool or packed, `pack_masks`; None leaves
    dropped), so Flax hands each `Linear` its own slice, also inside a scanned block stack.
    """
    variables = {"params": params}
    if lora is not None:
        variables["lora"] = lora
    if masks is not None:
        variables["masks"] = unflatten(flat_masks(masks))
    return variables


@contextlib.contextmanager
def lora_scope(alpha: float, mode: str) -> Iterator[None]:
    """Within this context, every `Linear` computes with its effective kernel under `mode`.

    A layer's mask and factors are its variables `masks/kernel` and `lora/kernel` (`adapter_variables`);
    a layer with neither computes as written.
    """

    def adapted(name: str, module: Any, x: Array, call: Callable[[Array], Array]) -> Array:
        mask = module.get_variable("masks", "kernel") if module.has_variable("masks", "kernel") else None
        factors = module.get_variable("lora", "kernel") if module.has_variable("lora", "kernel") else None
        if mask is None and factors is None:
            return call(x)
        kernel = module.get_variable("params", "kernel")
        bias = module.get_variable("params", "bias") if module.use_bias else None
        pair = None if factors is None else (factors["a"], factors["b"])
        return _adapted_linear(x, kernel, bias, mask, pair, f"{name}/kernel", alpha, mode, module.dtype)

    if mode not in LORA_MODES:
        raise ValueError(f"LoRA mode {mode!r} is not one of {', '.join(LORA_MODES)}")
    with intercept_linears(adapted):
        yield


def _linear_output(x: Array, kernel: Array, bias: Array | None, mask: Array | None,
                   factors: tuple[Array, Array] | None, alpha: float, mode: str, dtype: Any) -> Array:
    if mask is not None:
        mask = unpack_mask(mask, kernel.shape[-1])
    if mode == "lora" and factors is not None:
        base = kernel if mask is None else mask_weights(kernel, mask)
        a, b = factors
        low_rank = jnp.einsum("...i,ri->...r", x.astype(dtype), a.astype(dtype))
        update = jnp.einsum("...r,or->...o", low_rank, b.astype(dtype)) * (alpha / a.shape[0])
        return linear(x, base, bias, dtype) + update
    return linear(x, effective_kernel(kernel, mask, factors, alpha, mode), bias, dtype)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _adapted_linear(x: Array, kernel: Array, bias: Array | None, mask: Array | None,
                    factors: tuple[Array, Array] | None, path: str, alpha: float, mode: str, dtype: Any) -> Array:
    # Rematerialised by hand: only the inputs are saved for the backward pass, never the effective
    # kernel (nor the unpacked mask), which the backward pass rebuilds.
    kernel = gather_late(x, path, kernel)
    factors = tie_to(x, factors)
    return _linear_output(x, kernel, bias, mask, factors, alpha, mode, dtype)


def _adapted_linear_fwd(x, kernel, bias, mask, factors, path, alpha, mode, dtype):  # noqa: ANN001, ANN202
    return (_adapted_linear(x, kernel, bias, mask, factors, path, alpha, mode, dtype),
            (x, kernel, bias, mask, factors))


def _adapted_linear_bwd(path, alpha, mode, dtype, saved, grad):  # noqa: ANN001, ANN202
    # Tied to the incoming gradient and the (recomputed) input, the weights are gathered (on a mesh)
    # only when this layer's backward pass runs, not all at once when its block's does.
    x, kernel, bias, mask, factors = saved
    kernel = gather_late((grad, x), path, kernel)
    factors = tie_to((grad, x), factors)
    if mode == "lora" or factors is None:
        _, pullback = jax.vjp(lambda x, kernel, bias, factors: _linear_output(x, kernel, bias, mask, factors, alpha,
                                                                              mode, dtype), x, kernel, bias, factors)
        dx, dkernel, dbias, dfactors = pullback(grad)
        return dx, dkernel, dbias, None, dfactors
    # SparseLoRA: W_eff = (W + s·(B@A)ᵀ)⊙M, so with G = xᵀ·grad, ∂W = G⊙M and ∂(B@A) = s·(G⊙M)ᵀ.
    _, pullback = jax.vjp(lambda x, bias: _linear_output(x, kernel, bias, mask, factors, alpha, mode, dtype), x, bias)
    dx, dbias = pullback(grad)
    features = kernel.shape[-1]

    def weight_grad(x: Array, grad: Array, mask: Array | None) -> Array:
        g = jnp.einsum("...i,...o->io", x.astype(dtype), grad.astype(dtype)).astype(kernel.dtype)
        return g if mask is None else mask_weights(g, unpack_mask(mask, features))

    # Per batch shard, then summed: the full-size G never crosses devices, only the factors' gradients.
    factor_grads = partial(_factor_grads, scale=alpha / factors[0].shape[0], dtype=dtype, kernel_dtype=kernel.dtype)
    da, db = sum_over_batch_shards(factor_grads, (x, grad), (mask, *factors))
    return dx, weight_grad(x, grad, mask), dbias, None, (da, db)


# Largest slice of a weight gradient G that SparseLoRA's backward pass holds at a time.
_GRAD_BLOCK_BYTES = 32 * 2**20


def _factor_grads(x: Array, grad: Array, mask: Array | None, a: Array, b: Array, scale: float, dtype: Any,
                  kernel_dtype: Any) -> tuple[Array, Array]:
    """SparseLoRA's `(∂A, ∂B)` for a layer's input rows `x` and output gradient `grad`, G built a block of
    output columns at a time (never the whole `[in, out]` weight gradient)."""
    fan_in, features = a.shape[1], b.shape[0]
    rows = x.reshape(-1, fan_in).astype(dtype)
    grad = grad.reshape(-1, features).astype(dtype)
    packed = mask is not None and mask.dtype != bool  # packed 8 columns a byte: blocks of whole bytes
    step = 8 if packed else 1
    blocks = next((n for n in range(1, features + 1) if features % (n * step) == 0
                   and fan_in * (features // n) * 4 <= _GRAD_BLOCK_BYTES), 1)
    width = features // blocks

    def block(da: Array, part: tuple[Array, Array | None, Array]) -> tuple[Array, Array]:
        g_part, mask_part, b_part = part  # [rows, width], [in, width (/8 packed)], [width, r]
        g = (rows.T @ g_part).astype(kernel_dtype)
        g = g if mask_part is None else mask_weights(g, unpack_mask(mask_part, width))
        d_ba = scale * g.T.astype(jnp.float32)  # [width, in]: this block's rows of ∂(B@A)
        return da + b_part.T @ d_ba, d_ba @ a.T

    def split(v: Array, axis: int) -> Array:  # [..., n, ...] → [blocks, ..., n / blocks, ...]
        return jnp.moveaxis(v.reshape(*v.shape[:axis], blocks, v.shape[axis] // blocks, *v.shape[axis + 1:]), axis, 0)

    da, db = jax.lax.scan(block, jnp.zeros_like(a), (split(grad, 1), None if mask is None else split(mask, 1),
                                                     split(b, 0)))
    return da, db.reshape(features, -1)


_adapted_linear.defvjp(_adapted_linear_fwd, _adapted_linear_bwd)


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
    "adapter_variables", "effective_kernel", "init_lora", "lora_param_count", "lora_scope", "lora_targets", "merge",
]
