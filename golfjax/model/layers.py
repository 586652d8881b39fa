"""Building blocks of the baseline GPT: norm, rotary, attention, MLP, block.

Parameter names follow the reference (`c_q`, `attn_scale`, `resid_mix`, ...) so
that the mapping to its state dict in `golfjax.interop` is mechanical. Kernels
are Flax-layout `(in, out)`; the reference's `weight` is their transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

Array = jax.Array


def rms_norm(x: Array) -> Array:
    """Parameter-free RMSNorm with torch's default eps (the dtype's machine epsilon)."""
    eps = jnp.finfo(x.dtype).eps
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def rotary_tables(seq_len: int, head_dim: int, base: float) -> tuple[Array, Array]:
    """cos/sin of shape (seq_len, head_dim // 2), computed in float32."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = jnp.outer(jnp.arange(seq_len, dtype=jnp.float32), inv_freq)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate the two halves of the head dimension (the reference's convention).

    x has layout (batch, seq, heads, head_dim); cos/sin are (seq, head_dim // 2).
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = cos[None, :, None, :].astype(x.dtype)
    sin = sin[None, :, None, :].astype(x.dtype)
    return jnp.concatenate((x1 * cos + x2 * sin, x2 * cos - x1 * sin), axis=-1)


def torch_linear_init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for an (in, out) kernel."""
    bound = 1.0 / jnp.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def dense(features: int, name: str, dtype, zero_init: bool = False) -> nn.Dense:
    init = nn.initializers.zeros_init() if zero_init else torch_linear_init
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32, kernel_init=init, name=name)


def attention_core(q: Array, k: Array, v: Array, implementation: str | None) -> Array:
    """Causal GQA attention on (B, T, heads, head_dim); kv heads are shared natively."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


class CausalSelfAttention(nn.Module):
    dim: int
    num_heads: int
    num_kv_heads: int
    rope_base: float
    qk_gain_init: float
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, seq, _ = x.shape
        head_dim = self.dim // self.num_heads
        kv_dim = self.num_kv_heads * head_dim
        q = dense(self.dim, "c_q", self.dtype)(x).reshape(batch, seq, self.num_heads, head_dim)
        k = dense(kv_dim, "c_k", self.dtype)(x).reshape(batch, seq, self.num_kv_heads, head_dim)
        v = dense(kv_dim, "c_v", self.dtype)(x).reshape(batch, seq, self.num_kv_heads, head_dim)
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = rotary_tables(seq, head_dim, self.rope_base)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q_gain = self.param("q_gain", nn.initializers.constant(self.qk_gain_init), (self.num_heads,), jnp.float32)
        q = q * q_gain.astype(q.dtype)[None, None, :, None]
        y = attention_core(q, k, v, self.attention_impl)
        return dense(self.dim, "proj", self.dtype, zero_init=True)(y.reshape(batch, seq, self.dim))


class MLP(nn.Module):
    """relu(x W_fc)^2 W_proj, the modded-nanogpt MLP."""

    dim: int
    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = jax.nn.relu(dense(self.hidden, "fc", self.dtype)(x))
        return dense(self.dim, "proj", self.dtype, zero_init=True)(jnp.square(h))


class Block(nn.Module):
    """x <- m0*x + m1*x0; x += a*attn(norm x); x += s*mlp(norm x)."""

    dim: int
    num_heads: int
    num_kv_heads: int
    mlp_hidden: int
    rope_base: float
    qk_gain_init: float
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: Array, x0: Array) -> Array:
        ones = nn.initializers.ones_init()
        mix = self.param("resid_mix", lambda k, s: jnp.stack([jnp.ones(s[1]), jnp.zeros(s[1])]), (2, self.dim))
        attn_scale = self.param("attn_scale", ones, (self.dim,), jnp.float32)
        mlp_scale = self.param("mlp_scale", ones, (self.dim,), jnp.float32)
        mix = mix.astype(x.dtype)
        x = mix[0] * x + mix[1] * x0
        attn = CausalSelfAttention(
            self.dim, self.num_heads, self.num_kv_heads, self.rope_base, self.qk_gain_init,
            self.dtype, self.attention_impl, name="attn",
        )
        x = x + attn_scale.astype(x.dtype) * attn(rms_norm(x))
        mlp = MLP(self.dim, self.mlp_hidden, self.dtype, name="mlp")
        return x + mlp_scale.astype(x.dtype) * mlp(rms_norm(x))
