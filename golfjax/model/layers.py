"""Building blocks of the GPT: norm, rotary, attention, MLP, block, and the
record-stack options of each (partial RoPE, XSA, attention gates, document
masks, LeakyReLU^2, LN scale, GPT-J and two-lane parallel residuals).

Parameter names follow the reference (`c_q`, `attn_scale`, `resid_mix`, ...) so
that the mapping to its state dict in `golfjax.interop` is mechanical. Kernels
are Flax-layout `(in, out)`; the reference's `weight` is their transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from golfjax.model import cpu_ops, fused_attention

Array = jax.Array


def rms_norm(x: Array) -> Array:
    """Parameter-free RMSNorm with torch's default eps (the dtype's machine epsilon)."""
    eps = jnp.finfo(x.dtype).eps
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def rope_base(base: float, rot_dims: int, seq_len: int, train_seq_len: int) -> float:
    """NTK-style base rescale past the training length: base * (L/L_train)^(rd/(rd-2)).

    train_seq_len 0 (or a sequence no longer than it) keeps the base."""
    if train_seq_len <= 0 or seq_len <= train_seq_len or rot_dims <= 2:
        return base
    return base * (seq_len / train_seq_len) ** (rot_dims / (rot_dims - 2))


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


def apply_partial_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate only the first 2*cos.shape[-1] dims of each head; the rest carry no position."""
    rot = 2 * cos.shape[-1]
    if rot == x.shape[-1]:
        return apply_rotary(x, cos, sin)
    return jnp.concatenate((apply_rotary(x[..., :rot], cos, sin), x[..., rot:]), axis=-1)


def qk_norm_rotary(x: Array, cos: Array, sin: Array, gain: Array | None = None, matmul_impl: str = "xla") -> Array:
    """What the attention does to q (gain = q_gain) and k (no gain) as XLA ops: RMSNorm,
    (partial) rotary, per-head gain. `fused_attention.norm_rotary` is the same in one C++ pass."""
    x = apply_partial_rotary(rms_norm(x), cos, sin)
    if gain is None:
        return x
    return scale_channels(jnp.broadcast_to(gain[:, None], x.shape[2:]), x, matmul_impl)


def torch_linear_init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for an (in, out) kernel."""
    bound = 1.0 / jnp.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def kernel_init(zero_init: bool = False, ortho_init: bool = False, std: float | None = None):
    """Zero, normal(std), orthogonal (for matrices of at least 64x64) or torch.nn.Linear's default."""
    if zero_init:
        return nn.initializers.zeros_init()
    if std is not None:
        return nn.initializers.normal(std)

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        if ortho_init and min(shape) >= 64:
            return nn.initializers.orthogonal()(key, shape, dtype)
        return torch_linear_init(key, shape, dtype)

    return init


def resolve_matmul_impl(name: str) -> str:
    """'auto' is golfjax's CPU matmul (golfjax.model.cpu_ops.linear) on CPU, flax's elsewhere."""
    if name == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return name


def scale_channels(s: Array, h: Array, matmul_impl: str = "xla") -> Array:
    """s * h (s spans h's trailing axes) in h's dtype; on the CPU path its gradient avoids XLA:CPU's
    slow reduce."""
    if resolve_matmul_impl(matmul_impl) == "cpu":
        return cpu_ops.channel_scale(s, h)
    return s.astype(h.dtype) * h


def dense(features: int, name: str, dtype, zero_init: bool = False, ortho_init: bool = False,
          std: float | None = None, matmul_impl: str = "xla") -> nn.Dense:
    init = kernel_init(zero_init, ortho_init, std)
    extra = {"dot_general": cpu_ops.dense_dot_general} if resolve_matmul_impl(matmul_impl) == "cpu" else {}
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32, kernel_init=init, name=name,
                    **extra)


GRAMS = "grams"  # the collection `matrix_input_grams` makes mutable
GRAM_SUFFIX = "__gram"


def input_gram(x: Array) -> Array:
    """sum over all leading axes of x^T x, in float32: a Hessian proxy for GPTQ."""
    flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return jnp.einsum("ni,nj->ij", flat, flat, precision=jax.lax.Precision.HIGHEST)


def sow_gram(module: nn.Module, names: tuple[str, ...], x: Array) -> None:
    """Record the input gram of the dense layers `names` (only when grams are being collected)."""
    if module.is_mutable_collection(GRAMS):
        g = input_gram(x)
        for name in names:
            module.sow(GRAMS, name + GRAM_SUFFIX, g)


ATTENTION_BLOCK = cpu_ops.ATTENTION_BLOCK  # query rows per block


def blocked_causal_attention(q: Array, k: Array, v: Array, block: int = ATTENTION_BLOCK,
                             segments: Array | None = None) -> Array:
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
    `segments` (B, T) ints, if given, also masks keys of another document.
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
        mask = np.arange(start, end)[:, None] >= np.arange(end)[None, :]
        if segments is not None:
            same = segments[:, start:end, None] == segments[:, None, :end]  # (B, q, s)
            mask = jnp.logical_and(mask, same)[:, None, None]
        logits = jnp.where(mask, logits, large_negative)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkgqs,bksh->bkgqh", probs, vh[:, :, :end]))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, num_heads, head_dim)


def document_segments(tokens: Array, bos_id: int) -> Array:
    """Segment id of every position: the number of BOS tokens up to and including it."""
    return jnp.cumsum((tokens == bos_id).astype(jnp.int32), axis=-1)


def fused_kernel_applies(implementation: str | None, q: Array, k: Array, segments: Array | None) -> bool:
    """Whether "fused" runs the C++ kernels for these q, k (no document mask, shapes it takes)."""
    return implementation == "fused" and segments is None and fused_attention.supports(q, k)


def attention_core(q: Array, k: Array, v: Array, implementation: str | None,
                   segments: Array | None = None) -> Array:
    """Causal GQA attention on (B, T, heads, head_dim); kv heads are shared natively.

    "fused" is golfjax's fused CPU kernel (`fused_attention.causal_attention`)
    where it applies (bf16 or float32, head_dim and sequence multiples of 32, no
    document mask) and "blocked" otherwise. "blocked" (golfjax's CPU default) is
    `cpu_ops.causal_attention`, or with `segments` `blocked_causal_attention`;
    anything else goes to `jax.nn.dot_product_attention` ("xla", "cudnn", None).
    With `segments` a query only sees keys of its own document (a dense
    (B,1,T,T) mask, on XLA).
    """
    if implementation == "fused":
        if fused_kernel_applies(implementation, q, k, segments):
            return fused_attention.causal_attention(q, k, v)
        implementation = "blocked"
    if implementation == "blocked":
        if segments is None:
            return cpu_ops.causal_attention(q, k, v)
        return blocked_causal_attention(q, k, v, segments=segments)
    mask = None
    if segments is not None:
        mask = (segments[:, :, None] == segments[:, None, :])[:, None]
        # Document masks go through XLA's dense path: golfjax does not rely on an
        # arbitrary boolean mask inside the cuDNN kernel.
        implementation = "xla" if implementation == "cudnn" else implementation
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)


def exclusive_self_attention(y: Array, v: Array) -> Array:
    """XSA: remove from each head's output its component along its own token's unit value vector.

    y is (B, T, H, D), v is (B, T, Hkv, D); heads are grouped over their KV head
    by a reshape (no repeat of v)."""
    batch, seq, heads, head_dim = y.shape
    kv_heads = v.shape[2]
    yg = y.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    v32 = v.astype(jnp.float32)
    vn = (v32 / jnp.maximum(jnp.linalg.norm(v32, axis=-1, keepdims=True), 1e-12)).astype(y.dtype)[:, :, :, None]
    yg = yg - jnp.sum(yg * vn, axis=-1, keepdims=True) * vn
    return yg.reshape(batch, seq, heads, head_dim)


def rope_dims(cfg) -> int:
    head_dim = cfg.model_dim // cfg.num_heads
    return head_dim if cfg.rope_dims <= 0 else cfg.rope_dims


class CausalSelfAttention(nn.Module):
    """q,k,v projections, q/k RMSNorm, (partial) RoPE, q_gain, causal GQA, options, out projection.

    `cfg` is the ModelConfig (hashable). Options: value embedding added to v,
    document segments, XSA, one output gate (out / gated / sparse)."""

    cfg: object
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: Array, *, xsa: bool = False, ve: Array | None = None,
                 segments: Array | None = None) -> Array:
        c = self.cfg
        batch, seq, dim = x.shape
        head_dim = dim // c.num_heads
        kv_dim = c.num_kv_heads * head_dim
        sow_gram(self, ("c_q", "c_k", "c_v"), x)
        q = dense(dim, "c_q", self.dtype, ortho_init=c.ortho_init, matmul_impl=c.matmul_impl)(x).reshape(batch, seq, c.num_heads, head_dim)
        k = dense(kv_dim, "c_k", self.dtype, ortho_init=c.ortho_init, matmul_impl=c.matmul_impl)(x).reshape(batch, seq, c.num_kv_heads, head_dim)
        v = dense(kv_dim, "c_v", self.dtype, ortho_init=c.ortho_init, matmul_impl=c.matmul_impl)(x)
        if ve is not None:
            v = v + ve.astype(v.dtype)
        v = v.reshape(batch, seq, c.num_kv_heads, head_dim)
        rd = rope_dims(c)
        cos, sin = rotary_tables(seq, rd, rope_base(c.rope_base, rd, seq, c.rope_train_seq_len))
        q_gain = self.param("q_gain", nn.initializers.constant(c.qk_gain_init), (c.num_heads,), jnp.float32)
        if fused_kernel_applies(self.attention_impl, q, k, segments):
            # The fused attention's companion: the same maths in one C++ pass each (float32 inside)
            q, k = fused_attention.norm_rotary(q, cos, sin, q_gain), fused_attention.norm_rotary(k, cos, sin)
        else:
            q, k = qk_norm_rotary(q, cos, sin, q_gain, c.matmul_impl), qk_norm_rotary(k, cos, sin)
        y = attention_core(q, k, v, self.attention_impl, segments)
        if xsa:
            y = exclusive_self_attention(y, v)
        gate = self._gate(x)
        if gate is not None:
            y = y * gate[..., None]
        y = y.reshape(batch, seq, dim)
        sow_gram(self, ("proj",), y)
        return dense(dim, "proj", self.dtype, zero_init=True, matmul_impl=c.matmul_impl)(y)

    def _gate(self, x: Array) -> Array | None:
        """Per-head output multiplier (B, T, H) of the configured gate, or None."""
        c = self.cfg
        if c.gated_attn:
            sow_gram(self, ("attn_gate",), x)
            return jax.nn.sigmoid(dense(c.num_heads, "attn_gate", self.dtype, std=c.gated_attn_init_std,
                                          matmul_impl=c.matmul_impl)(x))
        if c.attn_out_gate or c.sparse_attn_gate:
            xw = x[..., : c.attn_gate_window]
            sow_gram(self, ("attn_gate",), xw)
            z = dense(c.num_heads, "attn_gate", self.dtype, zero_init=True, matmul_impl=c.matmul_impl)(xw)
            if c.attn_out_gate:
                return 2.0 * jax.nn.sigmoid(z)
            return jax.nn.sigmoid(c.sparse_attn_gate_scale * z)
        return None


def mlp_activation(name: str, h: Array) -> Array:
    """relu(h)^2 (reference) or leaky_relu(h, 0.5)^2 (records from 2026-03-23)."""
    if name == "relu2":
        return jnp.square(jax.nn.relu(h))
    if name == "leaky_relu2":
        return jnp.square(jax.nn.leaky_relu(h, 0.5))
    raise ValueError(f"unknown mlp_act {name!r}")


class MLP(nn.Module):
    """act(x W_fc) W_proj, the modded-nanogpt MLP (act: relu^2 or leaky_relu(0.5)^2)."""

    dim: int
    hidden: int
    dtype: jnp.dtype = jnp.float32
    act: str = "relu2"
    ortho_init: bool = False
    matmul_impl: str = "xla"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        sow_gram(self, ("fc",), x)
        h = dense(self.hidden, "fc", self.dtype, ortho_init=self.ortho_init, matmul_impl=self.matmul_impl)(x)
        if self.act == "relu2":  # the reference's exact op order
            h = jnp.square(jax.nn.relu(h))
        else:
            h = mlp_activation(self.act, h)
        sow_gram(self, ("proj",), h)
        return dense(self.dim, "proj", self.dtype, zero_init=True, matmul_impl=self.matmul_impl)(h)


# How a block combines its sublayers (static per virtual layer):
SERIAL, GPTJ, LANES = "serial", "gptj", "lanes"


class Block(nn.Module):
    """x <- m0*x + m1*x0; x += a*attn(norm x); x += s*mlp(norm x).

    mode GPTJ: both sublayers read the same mixed x. mode LANES: x is a pair
    (lane0, lane1); attention reads mix(lane0, x0), the MLP reads lane1, and
    `lane_lambdas` = (r (2,), P (2 sources, 2 lanes)) route the outputs.
    `layer` is the physical block index (for the LN scale 1/sqrt(layer+1))."""

    cfg: object
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, x0: Array, layer: Array | int = 0, *, xsa: bool = False, mode: str = SERIAL,
                 ve: Array | None = None, segments: Array | None = None, lane_lambdas=None):
        c = self.cfg
        ones = nn.initializers.ones_init()
        mix = self.param("resid_mix", lambda k, s: jnp.stack([jnp.ones(s[1]), jnp.zeros(s[1])]), (2, c.model_dim))
        attn_scale = self.param("attn_scale", ones, (c.model_dim,), jnp.float32)
        mlp_scale = self.param("mlp_scale", ones, (c.model_dim,), jnp.float32)
        scale = lambda w, h: scale_channels(w, h, c.matmul_impl)
        attn = CausalSelfAttention(c, self.dtype, self.attention_impl, name="attn")
        mlp = MLP(c.model_dim, int(c.mlp_mult * c.model_dim), self.dtype, c.mlp_act, c.ortho_init, c.matmul_impl,
                  name="mlp")
        base_norm = rms_norm
        if self.attention_impl == "fused" and fused_attention.supports_norm(x0):
            base_norm = fused_attention.rms_norm
        if c.ln_scale:
            s = jax.lax.rsqrt(jnp.asarray(layer, jnp.float32) + 1.0).astype(x0.dtype)
            norm = lambda h: base_norm(h) * s
        else:
            norm = base_norm
        sub_attn = lambda h: attn(norm(h), xsa=xsa, ve=ve, segments=segments)
        if mode == LANES:
            lane0, lane1 = x
            r, p = (a.astype(x0.dtype) for a in lane_lambdas)
            a = scale(attn_scale, sub_attn(scale(mix[0], lane0) + scale(mix[1], x0)))
            m = scale(mlp_scale, mlp(norm(lane1)))
            return (r[0] * lane0 + p[0, 0] * a + p[1, 0] * m, r[1] * lane1 + p[0, 1] * a + p[1, 1] * m)
        x = scale(mix[0], x) + scale(mix[1], x0)
        if mode == GPTJ:
            return x + scale(attn_scale, sub_attn(x)) + scale(mlp_scale, mlp(norm(x)))
        x = x + scale(attn_scale, sub_attn(x))
        return x + scale(mlp_scale, mlp(norm(x)))
