"""Building blocks of the baseline GPT: norm, rotary, attention, MLP, block.

Parameter names follow the reference (`c_q`, `attn_scale`, `resid_mix`, ...) so
that the mapping to its state dict in `golfjax.interop` is mechanical. Kernels
are Flax-layout `(in, out)`; the reference's `weight` is their transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

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


ATTENTION_BLOCK = 128  # query rows per block of `blocked_causal_attention`


def blocked_causal_attention(q: Array, k: Array, v: Array, block: int = ATTENTION_BLOCK) -> Array:
    """Causal GQA attention computed per block of queries against its key prefix.

    The arithmetic of `jax.nn.dot_product_attention(..., implementation="xla")`
    (logits in promote(dtype, f32), scaled after the dot, the same large negative
    mask value, float32 softmax, probs cast to the value dtype) but a query block
    only sees keys up to its own end, so the fully masked upper triangle is never
    computed: about half the attention FLOPs and memory at seq 1024 with block
    128. Masked logits contribute exactly 0 to the softmax either way; only the
    summation order of the softmax denominator can differ (ulp-level).
    Layout: heads-major (B, kv_heads, group, T, head_dim), so every dot is a
    plain batched matmul with the contraction last on both sides (no per-head
    transposes inside XLA:CPU's dot emitter).
    """
    batch, seq, num_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = num_heads // kv_heads
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q.dtype == jnp.bfloat16 else None
    scale = jnp.array(head_dim**-0.5, logits_dtype)
    large_negative = jnp.asarray(0.7 * jnp.finfo(logits_dtype).min, logits_dtype)
    qh = q.reshape(batch, seq, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    kh = k.transpose(0, 2, 1, 3)
    vh = v.transpose(0, 2, 1, 3)
    outs = []
    for start in range(0, seq, block):
        end = min(start + block, seq)
        logits = jnp.einsum("bkgqh,bksh->bkgqs", qh[:, :, :, start:end], kh[:, :, :end],
                            precision=precision, preferred_element_type=logits_dtype)
        logits = logits * scale
        causal = np.arange(start, end)[:, None] >= np.arange(end)[None, :]
        logits = jnp.where(causal, logits, large_negative)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkgqs,bksh->bkgqh", probs, vh[:, :, :end]))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, num_heads, head_dim)


def attention_core(q: Array, k: Array, v: Array, implementation: str | None) -> Array:
    """Causal GQA attention on (B, T, heads, head_dim); kv heads are shared natively.

    "blocked" is `blocked_causal_attention` (golfjax's CPU default); anything
    else goes to `jax.nn.dot_product_attention` ("xla", "cudnn", None).
    """
    if implementation == "blocked":
        return blocked_causal_attention(q, k, v)
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
