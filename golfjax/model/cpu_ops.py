"""Matmul and causal attention written for XLA:CPU, with hand-written VJPs.

Why this module exists (measured on a 2-core AVX-512 VM, docs/BENCHMARKS.md):
XLA:CPU sends a dot to its fast YNNPACK kernels only when the left operand
contracts its *last* dimension, and a bfloat16 dot only when it accumulates
into a float32 output; any other dot runs in Eigen, and a bfloat16 one is first
converted to float32 (so "bf16 compute" was no faster than float32). Autodiff's
weight gradient `x^T dy` contracts the token axis, which is the first axis of
both operands: the slow case. And XLA:CPU computes the causal mask of a query
block as a separate pass over the whole (queries x keys) logit tile.

So here:
- `linear` (the `dot_general` of every `nn.Dense` on CPU): forward `x @ W` and
  backward `dy @ W^T`, `(x^T) @ dy` with `x^T` materialised, every dot with a
  float32 accumulator and its operands kept in the compute dtype.
- `channel_scale`: a per-channel gain whose gradient is a ones-vector matmul
  instead of a reduce-window.
- `causal_attention`: blocks of query rows against their key prefix (the
  masked upper triangle is never computed), each block split into the keys
  before the block (no mask needed) and the diagonal tile (masked), a softmax
  over both parts, and a backward that reuses the forward's probabilities
  (kept in the compute dtype: ~8 MB per layer at seq 1024 in bf16; recomputing
  them from the log-sum-exp made forward+backward 1.12x slower in bf16) and
  accumulates dK and dV in place. Query heads of one KV
  head are rows of one matrix (GQA without repeating K/V).

Each equals its plain XLA path to float32 rounding (tests/test_perf_options.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
F32 = jnp.float32

ATTENTION_BLOCK = 128  # query positions per block


# ----------------------------------------------------------------------------- linear


def transposed_copy(x: Array) -> Array:
    """x with its last two axes swapped, as a real copy in row-major layout.

    A plain transpose feeding a dot is folded into the dot's dimension numbers
    (or into a column-major layout), which XLA:CPU sends to its slow path; the
    unit axis in between keeps the transpose a transpose."""
    *lead, m, n = x.shape
    k = len(lead)
    perm = (*range(k), k + 2, k + 1, k)
    return x.reshape(*lead, m, 1, n).transpose(perm).reshape(*lead, n, m)


def _dot_last_first(a: Array, b: Array) -> Array:
    """a (..., k) @ b (k, n) accumulated in float32."""
    return lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), preferred_element_type=F32)


@jax.custom_vjp
def linear(x: Array, w: Array) -> Array:
    """x (..., in) @ w (in, out) in x's dtype, accumulated in float32."""
    return _dot_last_first(x, w).astype(x.dtype)


def _linear_fwd(x: Array, w: Array):
    return linear(x, w), (x, w)


def weight_grad_lhs(x: Array) -> Array:
    """x^T (x: tokens x in) as a row-major copy, for the weight gradient x^T dy.

    float32 on one device where golfjax's C++ kernels run: their tiled transpose, since
    XLA:CPU lays this transpose out as a column-major write of x's producer (the MLP's
    relu^2: 6.8 ms at 1024 x 1024, against ~1.5 ms), the same values. Elsewhere (bf16,
    where XLA's is as fast; several devices, whose GSPMD would gather a custom call's
    operand) `transposed_copy`."""
    from golfjax.model import fused_attention  # imports nothing of this module

    if x.dtype == F32 and jax.device_count() == 1 and fused_attention.available(F32):
        return fused_attention.custom_transpose(x)
    return transposed_copy(x)


def _linear_bwd(res, dy: Array):
    x, w = res
    dy = _pin(dy.astype(x.dtype))
    dx = lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())), preferred_element_type=F32)
    dw = _dot_last_first(weight_grad_lhs(x.reshape(-1, x.shape[-1])), dy.reshape(-1, dy.shape[-1]))
    return dx.astype(x.dtype), dw.astype(w.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


def dense_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None, preferred_element_type=None):
    """A `dot_general` for `flax.linen.Dense`: `linear` for its (..., in) x (in, out) case."""
    (lc, rc), (lb, rb) = dimension_numbers
    if tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb and rhs.ndim == 2 \
            and lhs.dtype == rhs.dtype:
        return linear(lhs, rhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type)


# ----------------------------------------------------------------------------- per-channel scales


@jax.custom_vjp
def channel_scale(s: Array, h: Array) -> Array:
    """s (C,) * h (..., C) in h's dtype: the learned per-channel gains of the residual stream
    (s may span several trailing axes of h: q_gain broadcast to (heads, head_dim)).

    Autodiff's gradient of `s` is a sum of `g * h` over every token, which XLA:CPU
    runs as a slow reduce-window (16% of a bf16 baseline step, docs/BENCHMARKS.md);
    here it is a ones-vector matmul with a float32 accumulator."""
    return s.astype(h.dtype) * h


def _channel_scale_fwd(s: Array, h: Array):
    return channel_scale(s, h), (s, h)


def _channel_scale_bwd(res, g: Array):
    s, h = res
    g = g.astype(h.dtype)
    rows = (g * h).reshape(-1, s.size)
    ones = jnp.ones((1, rows.shape[0]), h.dtype)
    ds = lax.dot_general(ones, rows, (((1,), (0,)), ((), ())), preferred_element_type=F32)
    return ds.reshape(s.shape).astype(s.dtype), g * s.astype(h.dtype)


channel_scale.defvjp(_channel_scale_fwd, _channel_scale_bwd)


# ----------------------------------------------------------------------------- head + loss


def _softcap_logits(h: Array, w: Array, cap: float) -> tuple[Array, Array]:
    """(tanh(z / cap), cap * tanh(z / cap)) of z = h @ w^T, float32; w is (vocab, dim)."""
    z = lax.dot_general(h, w, (((h.ndim - 1,), (1,)), ((), ())), preferred_element_type=F32)
    t = jnp.tanh(z / cap)
    return t, cap * t


def _nll_from_logits(logits: Array, y: Array) -> Array:
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, y[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _softcapped_nll_impl(h: Array, w: Array, y: Array, cap: float) -> Array:
    return _nll_from_logits(_softcap_logits(h, w, cap)[1], y)


def _softcapped_nll_fwd(h, w, y, cap):
    t, logits = _softcap_logits(h, w, cap)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    nll = lse[..., 0] - jnp.take_along_axis(logits, y[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return nll, (h, w, y, t, lse)


def _softcapped_nll_bwd(cap, res, g):
    h, w, y, t, lse = res
    vocab = w.shape[0]
    p = jnp.exp(cap * t - lse)
    onehot = y[..., None] == jnp.arange(vocab, dtype=y.dtype)
    dz = (g[..., None] * (p - onehot.astype(F32)) * (1.0 - t * t)).astype(h.dtype)  # d nll / d z
    dh = lax.dot_general(dz, w, (((dz.ndim - 1,), (0,)), ((), ())), preferred_element_type=F32)
    dw_t = _dot_last_first(transposed_copy(h.reshape(-1, h.shape[-1])), dz.reshape(-1, vocab))  # (dim, vocab)
    return dh.astype(h.dtype), transposed_copy(dw_t).astype(w.dtype), None


_softcapped_nll = jax.custom_vjp(_softcapped_nll_impl, nondiff_argnums=(3,))
_softcapped_nll.defvjp(_softcapped_nll_fwd, _softcapped_nll_bwd)


def softcapped_nll(h: Array, w: Array, y: Array, cap: float) -> Array:
    """Per-token NLL (float32) of the soft-capped logits cap * tanh(h @ w^T / cap).

    h (..., dim), w (vocab, dim) in the compute dtype, y int targets. One op
    for head and loss so that the backward is one elementwise pass over the
    logits and two YNNPACK-shaped dots (autodiff's chain through tanh, the
    softmax and the head matmul made four passes and an Eigen dot)."""
    return _softcapped_nll(h, w, y, cap)


# ----------------------------------------------------------------------------- attention


def _pin(*xs: Array):
    """The operands as they are: an optimisation barrier keeps a bf16 operand bf16
    (XLA may otherwise feed a dot the float32 value a cast came from: "excess
    precision", which sends the dot to a float32 kernel at half the speed)."""
    if all(x.dtype == F32 for x in xs):
        return xs if len(xs) > 1 else xs[0]
    out = lax.optimization_barrier(xs)
    return out if len(xs) > 1 else out[0]


def _dot(a: Array, b: Array, a_contract: int, b_contract: int) -> Array:
    """Batched over the two leading axes (batch, kv head), float32 accumulation."""
    a, b = _pin(a, b)
    return lax.dot_general(a, b, (((a_contract,), (b_contract,)), ((0, 1), (0, 1))), preferred_element_type=F32)


def _to_rows(x: Array, kv_heads: int) -> Array:
    """(B, T, H, D) -> (B, KV, T*G, D): the G query heads of a KV head as rows, position-major."""
    b, t, h, d = x.shape
    return x.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, -1, d)


def _from_rows(x: Array, seq: int) -> Array:
    b, kv, tg, d = x.shape
    g = tg // seq
    return x.reshape(b, kv, seq, g, d).transpose(0, 2, 1, 3, 4).reshape(b, seq, kv * g, d)


def _blocks(seq: int, block: int) -> list[tuple[int, int]]:
    return [(s, min(s + block, seq)) for s in range(0, seq, block)]


def _diag_mask(start: int, end: int, group: int) -> np.ndarray:
    """Causal mask of the diagonal tile: row r is position start + r // group."""
    rows = np.repeat(np.arange(start, end), group)
    return rows[:, None] >= np.arange(start, end)[None, :]


def _block_logits(qb: Array, kh: Array, start: int, end: int, group: int):
    """(logits against keys [0, start) or None, masked logits of the diagonal tile)."""
    diag = jnp.where(_diag_mask(start, end, group), _dot(qb, kh[:, :, start:end], 3, 3), -jnp.inf)
    past = _dot(qb, kh[:, :, :start], 3, 3) if start else None
    return past, diag


def _attention_fwd(q: Array, k: Array, v: Array, block: int):
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    dtype = q.dtype
    qs = (_to_rows(q, kv_heads).astype(F32) * head_dim**-0.5).astype(dtype)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    outs, probs = [], []
    for start, end in _blocks(seq, block):
        past, diag = _block_logits(qs[:, :, start * group:end * group], kh, start, end, group)
        m = jnp.max(diag, axis=-1, keepdims=True)
        if past is not None:
            m = jnp.maximum(m, jnp.max(past, axis=-1, keepdims=True))
        p_diag = jnp.exp(diag - m)
        total = jnp.sum(p_diag, axis=-1, keepdims=True)
        p_past = None
        if past is not None:
            p_past = jnp.exp(past - m)
            total = total + jnp.sum(p_past, axis=-1, keepdims=True)
        inv = 1.0 / total
        p_diag = (p_diag * inv).astype(dtype)  # normalised, then cast (as jax.nn's XLA path)
        o = _dot(p_diag, vh[:, :, start:end], 3, 2)
        if p_past is not None:
            p_past = (p_past * inv).astype(dtype)
            o = o + _dot(p_past, vh[:, :, :start], 3, 2)
        outs.append(o.astype(dtype))
        probs.append((p_diag, p_past))
    o = jnp.concatenate(outs, axis=2)
    return _from_rows(o, seq), (qs, kh, vh, o, probs)


def _attention_bwd(block: int, res, do: Array):
    qs, kh, vh, o, probs = res
    batch, kv_heads, rows, head_dim = qs.shape
    seq = kh.shape[2]
    group = rows // seq
    dtype = qs.dtype
    dor = _to_rows(do, kv_heads).astype(dtype)
    delta = jnp.sum(dor.astype(F32) * o.astype(F32), axis=-1, keepdims=True)
    dk_t = jnp.zeros((batch, kv_heads, head_dim, seq), F32)  # dK and dV accumulate as (D, T)
    dv_t = jnp.zeros((batch, kv_heads, head_dim, seq), F32)
    dqs = []
    for (start, end), (p_diag, p_past) in zip(_blocks(seq, block), probs):
        r = slice(start * group, end * group)
        dob, delta_b = dor[:, :, r], delta[:, :, r]
        qb_t, dob_t = transposed_copy(qs[:, :, r]), transposed_copy(dob)

        def part(p, k0, k1):
            ds = (p.astype(F32) * (_dot(dob, vh[:, :, k0:k1], 3, 3) - delta_b)).astype(dtype)
            return _dot(ds, kh[:, :, k0:k1], 3, 2), _dot(qb_t, ds, 3, 2), _dot(dob_t, p, 3, 2)

        dq, dk, dv = part(p_diag, start, end)
        dk_t = dk_t.at[:, :, :, start:end].add(dk)
        dv_t = dv_t.at[:, :, :, start:end].add(dv)
        if p_past is not None:
            dq_p, dk, dv = part(p_past, 0, start)
            dq = dq + dq_p
            dk_t = dk_t.at[:, :, :, :start].add(dk)
            dv_t = dv_t.at[:, :, :, :start].add(dv)
        dqs.append(dq)
    dq = _from_rows(jnp.concatenate(dqs, axis=2) * head_dim**-0.5, seq)
    back = lambda t: jnp.swapaxes(t, 2, 3).transpose(0, 2, 1, 3).astype(dtype)  # (B,KV,D,T) -> (B,T,KV,D)
    return dq.astype(dtype), back(dk_t), back(dv_t)


def causal_attention(q: Array, k: Array, v: Array, block: int = ATTENTION_BLOCK) -> Array:
    """Causal GQA attention on (B, T, heads, head_dim) / (B, T, kv_heads, head_dim).

    Logits, softmax and accumulations in float32; the probabilities enter the
    value product in the inputs' dtype (as jax.nn.dot_product_attention does)."""
    return _causal_attention(q, k, v, block)


def _causal_attention_impl(q, k, v, block):
    return _attention_fwd(q, k, v, block)[0]


_causal_attention = jax.custom_vjp(_causal_attention_impl, nondiff_argnums=(3,))
_causal_attention.defvjp(lambda q, k, v, block: _attention_fwd(q, k, v, block), _attention_bwd)
