"""The CPU fast paths equal the plain ones: golfjax.model.cpu_ops (causal
attention and the Dense matmul, with their hand-written VJPs) and the
document-masked blocked attention vs jax.nn.dot_product_attention / x @ W, the
whole model with matmul_impl cpu vs xla, and the unrolled layer scan vs the
rolled one."""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golfjax.config import Config
from golfjax.model import cpu_ops, gpt
from golfjax.model.layers import blocked_causal_attention


def _qkvg(seq, heads, kv, dim=8, batch=2, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (batch, seq, heads, dim))
    k = jax.random.normal(ks[1], (batch, seq, kv, dim))
    v = jax.random.normal(ks[2], (batch, seq, kv, dim))
    return q, k, v, jax.random.normal(ks[3], (batch, seq, heads, dim))


def _xla_attention(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


# (seq, heads, kv heads, block): whole blocks, a partial last block, one block, MHA and MQA.
ATTENTION_CASES = [(64, 4, 2, 16), (50, 4, 4, 16), (32, 2, 1, 64)]


@pytest.mark.parametrize("impl", ["cpu_ops", "blocked_with_segments"])
def test_cpu_attention_equals_xla(impl):
    """Outputs and all three gradients, on every case (one compile per case and path)."""
    for seq, heads, kv, block in ATTENTION_CASES:
        q, k, v, g = _qkvg(seq, heads, kv)
        if impl == "cpu_ops":
            ours = lambda q, k, v: cpu_ops.causal_attention(q, k, v, block)
        else:  # one document per row: the mask path must equal plain causal attention
            seg = jnp.ones((2, seq), jnp.int32)
            ours = lambda q, k, v: blocked_causal_attention(q, k, v, block, segments=seg)
        np.testing.assert_allclose(jax.jit(ours)(q, k, v), jax.jit(_xla_attention)(q, k, v), rtol=0, atol=1e-6)
        grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * g), argnums=(0, 1, 2)))(q, k, v)
        for name, a, b in zip("qkv", grad(ours), grad(_xla_attention)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=f"d{name} {(seq, heads, kv, block)}")


def test_cpu_attention_bfloat16_close_to_xla():
    q, k, v, g = (a.astype(jnp.bfloat16) for a in _qkvg(48, 4, 2, dim=16, batch=1, seed=1))
    ours = jax.jit(lambda *a: cpu_ops.causal_attention(*a, 16))(q, k, v)
    ref = jax.jit(_xla_attention)(q, k, v)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(ours), np.float32(ref), rtol=0, atol=2e-2)
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * g), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(grad(lambda *a: cpu_ops.causal_attention(*a, 16)), grad(_xla_attention)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=0, atol=0.1)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_cpu_linear_equals_matmul(dtype, tol):
    """Value, dx and dW of cpu_ops.linear vs x @ W (3-D input: the token axes are flattened for dW)."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 32)).astype(dtype)
    w = (jax.random.normal(jax.random.PRNGKey(2), (32, 24)) / 6).astype(dtype)
    dy = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 24)).astype(dtype)
    f32 = lambda a: a.astype(jnp.float32)
    ours = jax.jit(lambda x, w: jax.vjp(cpu_ops.linear, x, w))
    y1, back = ours(x, w)
    dx1, dw1 = back(dy)
    y2, back = jax.vjp(lambda x, w: f32(x) @ f32(w), x, w)
    dx2, dw2 = back(f32(dy))
    assert y1.dtype == dtype and dx1.dtype == dtype and dw1.dtype == dtype
    scale = lambda a: float(jnp.max(jnp.abs(a)))
    for a, b in ((y1, y2), (dx1, dx2), (dw1, dw2)):
        assert scale(f32(a) - f32(b)) <= tol * scale(f32(b))


@pytest.mark.parametrize("s_shape", [(32,), (4, 8)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_channel_scale_equals_the_broadcast_product(dtype, tol, s_shape):
    """Value, ds (float32, summed over every token) and dh of cpu_ops.channel_scale vs s * h,
    for a per-channel gain and one spanning two trailing axes (q_gain over heads x head_dim)."""
    s = 1 + 0.1 * jax.random.normal(jax.random.PRNGKey(0), s_shape)
    h = jax.random.normal(jax.random.PRNGKey(1), (2, 16, *s_shape)).astype(dtype)
    g = jax.random.normal(jax.random.PRNGKey(2), h.shape).astype(dtype)
    f32 = lambda a: a.astype(jnp.float32)
    y1, back = jax.jit(lambda s, h: jax.vjp(cpu_ops.channel_scale, s, h))(s, h)
    ds1, dh1 = back(g)
    y2, back = jax.vjp(lambda s, h: s * f32(h), s, h)
    ds2, dh2 = back(f32(g))
    assert y1.dtype == dtype and dh1.dtype == dtype and ds1.dtype == jnp.float32
    for a, b in ((y1, y2), (ds1, ds2), (dh1, dh2)):
        np.testing.assert_allclose(f32(a), b, rtol=tol, atol=tol)


def test_softcapped_nll_equals_the_plain_head_and_loss():
    h = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 32))
    w = 0.5 * jax.random.normal(jax.random.PRNGKey(1), (64, 32))
    y = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 64)
    g = jax.random.normal(jax.random.PRNGKey(3), (2, 16))

    def plain(h, w):
        logits = 30.0 * jnp.tanh((h @ w.T) / 30.0)
        return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[..., None], -1)[..., 0]

    ours = lambda h, w: cpu_ops.softcapped_nll(h, w, y, 30.0)
    np.testing.assert_allclose(jax.jit(ours)(h, w), plain(h, w), rtol=0, atol=1e-5)
    grads = lambda f: jax.jit(jax.grad(lambda h, w: jnp.sum(f(h, w) * g), argnums=(0, 1)))(h, w)
    for a, b in zip(grads(ours), grads(plain)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_model_with_cpu_matmuls_equals_xla_matmuls(tied):
    """Dense matmuls and the head + loss op are the only differences: loss and every gradient agree."""
    cfg = replace(Config().model, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, vocab_size=64,
                  compute_dtype="float32", attention_impl="xla", tie_embeddings=tied)
    params = gpt.init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(2), a.shape), params)
    x = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, 64)
    run = lambda c: jax.jit(jax.value_and_grad(lambda p: gpt.loss(p, c, x, x)))(params)
    (l_cpu, g_cpu), (l_xla, g_xla) = run(replace(cfg, matmul_impl="cpu")), run(replace(cfg, matmul_impl="xla"))
    assert abs(float(l_cpu) - float(l_xla)) <= 1e-6
    for a, b in zip(jax.tree.leaves(g_cpu), jax.tree.leaves(g_xla)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_unrolled_stack_equals_rolled(monkeypatch):
    cfg = replace(Config().model, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2, vocab_size=64,
                  compute_dtype="float32")
    params = gpt.init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.PRNGKey(2), a.shape), params)
    x = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, 64)
    f = lambda p: jax.value_and_grad(lambda p: gpt.loss(p, cfg, x, x))(p)
    unrolled = jax.jit(f)(params)
    monkeypatch.setattr(gpt, "MAX_UNROLLED_LAYERS", 0)
    rolled = jax.jit(f)(params)
    for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(rolled)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_auto_attention_and_matmul_are_the_cpu_ops_on_cpu():
    from golfjax.model.layers import resolve_matmul_impl

    if jax.default_backend() == "cpu":
        assert gpt.resolve_attention_impl("auto", jnp.float32) == "blocked"
        assert resolve_matmul_impl("auto") == "cpu"
    assert gpt.resolve_attention_impl("xla", jnp.float32) == "xla"
    assert resolve_matmul_impl("xla") == "xla"


def _dot_operand_dtypes(compiled_text: str) -> list[tuple[str, ...]]:
    """The operand dtypes of every dot in compiled HLO (fused dots read their fusion's parameters)."""
    import re

    dtypes = []
    for comp in re.split(r"\n(?=\S)", compiled_text):  # one computation per top-level block
        params = dict(re.findall(r"%([\w.\-]+) = (\w+)\[[\d,]*\]\S* parameter\(", comp))
        for operands in re.findall(r" dot\(([^)]*)\)", comp):
            names = [o.strip().lstrip("%") for o in operands.split(",")]
            dtypes.append(tuple(params.get(n, "?") for n in names))
    return dtypes


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's kernel choice")
def test_compiled_newton_schulz_multiplies_in_bfloat16():
    """With rounding="compiled" every Newton-Schulz matmul, X X^T included, reads bf16
    operands (XLA:CPU ran X X^T of a transposed view as a float32 matmul, 2.3x slower)."""
    from golfjax.optim.muon import newton_schulz

    G = jax.random.normal(jax.random.PRNGKey(0), (3, 64, 128))
    text = jax.jit(lambda g: newton_schulz(g, rounding="compiled")).lower(G).compile().as_text()
    dtypes = _dot_operand_dtypes(text)
    assert len(dtypes) == 15  # 5 steps x (X X^T, (cA) A, B X)
    assert all(d == ("bf16", "bf16") for d in dtypes), dtypes


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's kernel choice")
@pytest.mark.parametrize("kernel_shape", [(3, 64, 128), (3, 128, 64), (3, 96, 96)])
@pytest.mark.parametrize("rounding,float32_dots", [("compiled", 0), ("eager", 5)])
def test_muon_direction_multiplies_in_bfloat16(kernel_shape, rounding, float32_dots):
    """Muon's direction of a Flax kernel stack (in, out) transposes it to the reference's
    (out, in) and, when out > in, back again. A transposed *view* gave XLA a column-major
    layout that reached the dots, and XLA:CPU then ran 10 of the 15 matmuls in float32
    (2.5-3x slower Newton-Schulz on the baseline's stacks). Only eager X X^T (5 dots,
    float32 on purpose: torch's eager bits) may read float32."""
    from golfjax.optim.muon import orthogonalized_direction

    G = jax.random.normal(jax.random.PRNGKey(0), kernel_shape)
    fn = jax.jit(lambda g: orthogonalized_direction(g, rounding=rounding))
    dtypes = _dot_operand_dtypes(fn.lower(G).compile().as_text())
    assert len(dtypes) == 15
    assert sum(d != ("bf16", "bf16") for d in dtypes) == float32_dots, dtypes
