"""Building blocks shared by every tower: linear, attention, MLP, norms, rotary positions, block."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsevlm.sharding import gather_late

Array = jax.Array
Dtype = Any
KVCache = dict[str, Array]  # {"k": [B, S, Hkv, D], "v": [B, S, Hkv, D]}


def activation(name: str) -> Callable[[Array], Array]:
    """Activation function by config name."""
    table: dict[str, Callable[[Array], Array]] = {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "silu": jax.nn.silu,
        "relu": jax.nn.relu,
    }
    if name not in table:
        raise ValueError(f"activation {name!r} is not supported; allowed: {', '.join(table)}")
    return table[name]


def make_norm(kind: str, eps: float, name: str, dtype: Dtype = jnp.float32) -> nn.Module:
    """LayerNorm or RMSNorm (params: `scale` [+ `bias`]); statistics are computed in float32."""
    if kind == "layernorm":
        return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name)
    if kind == "rmsnorm":
        return nn.RMSNorm(epsilon=eps, dtype=dtype, name=name)
    raise ValueError(f"norm {kind!r} is not supported; allowed: layernorm, rmsnorm")


def linear(x: Array, kernel: Array, bias: Array | None, dtype: Dtype) -> Array:
    """`x @ kernel (+ bias)` computed in `dtype`, for a Flax `[in, out]` kernel."""
    y = jnp.einsum("...i,io->...o", x.astype(dtype), kernel.astype(dtype))
    return y if bias is None else y + bias.astype(dtype)


class Linear(nn.Module):
    """`y = x @ kernel (+ bias)` with a Flax `[in, out]` kernel; the one place every prunable weight lives."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32) if self.use_bias else None
        kernel = gather_late(x, "/".join(self.path) + "/kernel", kernel)
        return linear(x, kernel, bias, self.dtype)


LinearHook = Callable[[str, "Linear", Array, Callable[[Array], Array]], Array]


@contextlib.contextmanager
def intercept_linears(hook: LinearHook) -> Iterator[None]:
    """Within this context every `Linear` call runs `hook(path, module, x, call)` instead.

    `path` is the layer's `/`-joined module path under the root module being applied (its kernel is
    at `path + "/kernel"`), and `call(x)` computes the layer as written. Calibration statistics and
    LoRA both reach layers this way.
    """

    def interceptor(next_fun, args, kwargs, context):  # noqa: ANN001, ANN202
        if not (isinstance(context.module, Linear) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        return hook("/".join(context.module.path), context.module, args[0],
                    lambda x: next_fun(x, *args[1:], **kwargs))

    with nn.intercept_methods(interceptor):
        yield


def rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos/sin tables `[B, T, D]` for rotary embeddings in the half-split (HF Llama) layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate `x` `[B, T, H, D]` by the tables (HF `rotate_half` convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def causal_mask(valid: Array, query_slots: Array) -> Array:
    """Causal mask `[B, T, S]`: query at slot `query_slots[t]` may see key slot `s <= it` that is valid."""
    key_slots = jnp.arange(valid.shape[1])
    causal = key_slots[None, None, :] <= query_slots[None, :, None]
    return causal & valid[:, None, :].astype(bool)


def attend(q: Array, k: Array, v: Array, **kwargs: Any) -> Array:
    """`jax.nn.dot_product_attention`: cuDNN's fused flash attention on a GPU for 16-bit inputs where
    it accepts the shapes, mask and bias, else XLA's (exact enough to test against transformers)."""
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kwargs)
        except (ValueError, NotImplementedError, RuntimeError):  # refused at trace time: shapes, bias or mask
            pass
    return jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)


class Attention(nn.Module):
    """Multi-head / grouped-query attention; self or cross; optional rotary positions, score bias and KV cache."""

    num_heads: int
    head_dim: int
    out_features: int
    num_kv_heads: int | None = None
    qkv_bias: bool = True
    out_bias: bool = True
    rope_theta: float | None = None
    dtype: Dtype = jnp.float32
    scale_scores: bool = True  # False for T5, which folds the 1/sqrt(d) into its weights

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None,
        positions: Array | None = None,
        kv_input: Array | None = None,
        cache: KVCache | None = None,
        cache_index: Array | int = 0,
        score_bias: Array | None = None,
    ) -> tuple[Array, KVCache | None]:
        """Attend from `x` `[B, T, E]` over itself (or `kv_input`); `mask` `[B, T, S]` is True where allowed.

        With `cache`, the new keys/values are written at `cache_index` and attention runs over the
        whole cache (length S); the updated cache is returned. `score_bias` `[B or 1, H, T, S]` is
        added to the scores before masking (T5's relative position bias).
        """
        kv_heads = self.num_kv_heads or self.num_heads
        batch, length = x.shape[:2]
        source = x if kv_input is None else kv_input
        q = Linear(self.num_heads * self.head_dim, self.qkv_bias, self.dtype, name="q")(x)
        k = Linear(kv_heads * self.head_dim, self.qkv_bias, self.dtype, name="k")(source)
        v = Linear(kv_heads * self.head_dim, self.qkv_bias, self.dtype, name="v")(source)
        q = q.reshape(batch, length, self.num_heads, self.head_dim)
        k = k.reshape(batch, source.shape[1], kv_heads, self.head_dim)
        v = v.reshape(batch, source.shape[1], kv_heads, self.head_dim)
        if self.rope_theta is not None:
            if positions is None:
                raise ValueError("rotary attention needs `positions`")
            cos, sin = rope_tables(positions, self.head_dim, self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_cache = None
        if cache is not None:
            index = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), index)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), index)
            new_cache = {"k": k, "v": v}
        # Queries [B, T, N, D] over keys/values [B, S, K, D] (query head h reads kv head h // (N/K), as
        # HF's repeat_kv); logits and softmax are float32 even for bfloat16 inputs, and a fully masked
        # row (a left-pad query) is uniform, not NaN.
        out = attend(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            bias=None if score_bias is None else score_bias.astype(jnp.float32),
            mask=None if mask is None else mask[:, None].astype(bool),  # [B, 1, T, S]: every head
            scale=None if self.scale_scores else 1.0,  # None: 1/sqrt(head_dim)
        )
        out = out.reshape(batch, length, self.num_heads * self.head_dim)
        return Linear(self.out_features, self.out_bias, self.dtype, name="o")(out), new_cache


class MLP(nn.Module):
    """Feed-forward: `down(act(up x))`, or gated `down(act(gate x) * up x)` (SwiGLU)."""

    hidden_dim: int
    out_features: int
    act: str = "gelu"
    gated: bool = False
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        fn = activation(self.act)
        up = Linear(self.hidden_dim, self.use_bias, self.dtype, name="up")(x)
        if self.gated:
            h = fn(Linear(self.hidden_dim, self.use_bias, self.dtype, name="gate")(x)) * up
        else:
            h = fn(up)
        return Linear(self.out_features, self.use_bias, self.dtype, name="down")(h)


class Block(nn.Module):
    """Pre-norm transformer block: `x + attn(norm1 x)`, [`x + cross(norm_cross x, encoded)`], `x + mlp(norm2 x)`."""

    width: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    act: str
    norm: str
    norm_eps: float
    num_kv_heads: int | None = None
    gated_mlp: bool = False
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    rope_theta: float | None = None
    dtype: Dtype = jnp.float32
    scale_scores: bool = True
    cross_attention: bool = False  # an encoder–decoder decoder block (T5)

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None,
        positions: Array | None = None,
        cache: KVCache | None = None,
        cache_index: Array | int = 0,
        score_bias: Array | None = None,
        encoded: Array | None = None,
        encoded_mask: Array | None = None,
    ) -> tuple[Array, KVCache | None]:
        """One block; returns the new residual stream and the updated KV cache (if any).

        `score_bias` is added to the self-attention scores; `encoded` `[B, S, E]` and `encoded_mask`
        `[B, T, S]` feed the cross-attention of a `cross_attention` block.
        """

        def attention(name: str, rope_theta: float | None) -> Attention:
            return Attention(
                num_heads=self.num_heads,
                head_dim=self.head_dim,
                out_features=self.width,
                num_kv_heads=self.num_kv_heads,
                qkv_bias=self.qkv_bias,
                out_bias=self.out_bias,
                rope_theta=rope_theta,
                dtype=self.dtype,
                scale_scores=self.scale_scores,
                name=name,
            )

        h = make_norm(self.norm, self.norm_eps, "norm1", self.dtype)(x)
        h, cache = attention("attn", self.rope_theta)(
            h, mask, positions, cache=cache, cache_index=cache_index, score_bias=score_bias
        )
        x = x + h.astype(x.dtype)
        if self.cross_attention:
            if encoded is None:
                raise ValueError("a cross-attention block needs `encoded`")
            h = make_norm(self.norm, self.norm_eps, "norm_cross", self.dtype)(x)
            # Encoder outputs have no positions of their own: no rotary, no bias.
            h, _ = attention("cross", None)(h, encoded_mask, kv_input=encoded.astype(self.dtype))
            x = x + h.astype(x.dtype)
        h = make_norm(self.norm, self.norm_eps, "norm2", self.dtype)(x)
        h = MLP(self.mlp_dim, self.width, self.act, self.gated_mlp, self.mlp_bias, self.dtype, name="mlp")(h)
        return x + h.astype(x.dtype), cache
