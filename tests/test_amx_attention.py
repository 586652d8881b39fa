"""The fused AMX attention kernel (golfjax.model.amx_attention) against float64 and the XLA path.

The kernel tests need a CPU with AMX-BF16 and a C++ compiler; elsewhere they skip
and say which is missing. The fallback and error tests run everywhere.
"""

from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golfjax.config import Config
from golfjax.model import amx_attention, cpu_ops, gpt
from golfjax.model.layers import attention_core

F32 = jnp.float32
BF16 = jnp.bfloat16


def _need_kernel():
    reason = amx_attention.unavailable_reason()
    if reason is not None and reason.startswith("building"):
        pytest.fail(f"the AMX attention kernel does not compile: {reason}")  # a bug, not a missing feature
    if reason is not None:
        pytest.skip(f"AMX attention kernel unavailable here: {reason}")


def _inputs(batch, seq, heads, kv_heads, head_dim, scale=1.0, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    shapes = [(batch, seq, h, head_dim) for h in (heads, kv_heads, kv_heads, heads)]
    return [(scale * jax.random.normal(k, s, F32)).astype(BF16) for k, s in zip(keys, shapes)]


def _exact(q, k, v):
    """Causal GQA attention in float64 NumPy on the bf16 inputs, and its gradients for output cotangent g."""
    q, k, v = (np.asarray(x.astype(F32), np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    kr, vr = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    seq, head_dim = q.shape[1], q.shape[3]
    s = np.einsum("bthd,bshd->bhts", q, kr) / np.sqrt(head_dim)
    s = np.where(np.tril(np.ones((seq, seq), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, vr)


def _grads(fn, q, k, v, g):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(F32) * g.astype(F32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _exact_grads(q, k, v, g):
    """Gradients in float32 throughout (jax.nn on the same bf16 values): far closer to exact than either bf16 path."""
    loss = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=True) * g.astype(F32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*(x.astype(F32) for x in (q, k, v)))


SHAPES = [  # batch, seq, heads, kv_heads, head_dim
    (1, 256, 8, 4, 64),   # the baseline's grouping
    (2, 64, 4, 4, 32),    # no grouping, two sequences
    (2, 128, 4, 1, 128),  # one KV head for all, wide heads
    (1, 96, 6, 3, 64),    # a sequence that is not a multiple of 64
    (3, 32, 2, 2, 32),    # the smallest: rows not a multiple of 64
]


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_is_as_close_to_float64_as_the_xla_path(shape):
    _need_kernel()
    q, k, v, g = _inputs(*shape, scale=2.0)
    exact = _exact(q, k, v)
    ours = np.asarray(jax.jit(amx_attention.causal_attention)(q, k, v).astype(F32), np.float64)
    xla = np.asarray(jax.jit(cpu_ops.causal_attention)(q, k, v).astype(F32), np.float64)
    err_ours, err_xla = np.abs(ours - exact).max(), np.abs(xla - exact).max()
    assert err_ours <= 1.25 * err_xla + 1e-3, (err_ours, err_xla)
    # the two implementations differ by bf16 output roundings at most
    np.testing.assert_allclose(ours, xla, rtol=0, atol=2 * 2.0 ** -7 * np.abs(xla).max())

    reference = _exact_grads(q, k, v, g)
    for name, a, b, r in zip("qkv", _grads(amx_attention.causal_attention, q, k, v, g),
                             _grads(cpu_ops.causal_attention, q, k, v, g), reference):
        a, b, r = (np.asarray(x, np.float32) for x in (a, b, r))
        rel = lambda x: np.linalg.norm(x - r) / np.linalg.norm(r)
        assert rel(a) <= 1.25 * rel(b) + 1e-3, (name, rel(a), rel(b))
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-3, name


def test_kernel_is_causal():
    """Changing keys and values after position t changes nothing before t, and earlier outputs
    send no gradient to later keys or values."""
    _need_kernel()
    q, k, v, g = _inputs(1, 128, 4, 2, 64)
    t = 70
    k2 = k.at[:, t:].set((3 * jax.random.normal(jax.random.PRNGKey(9), k[:, t:].shape)).astype(BF16))
    v2 = v.at[:, t:].set((3 * jax.random.normal(jax.random.PRNGKey(8), v[:, t:].shape)).astype(BF16))
    f = jax.jit(amx_attention.causal_attention)
    np.testing.assert_array_equal(np.asarray(f(q, k, v)[:, :t]), np.asarray(f(q, k2, v2)[:, :t]))
    g_early = g.at[:, t:].set(0)
    dq, dk, dv = _grads(amx_attention.causal_attention, q, k, v, g_early)
    assert not np.any(np.asarray(dk[:, t:])) and not np.any(np.asarray(dv[:, t:]))
    assert not np.any(np.asarray(dq[:, t:]))
    assert np.any(np.asarray(dk[:, :t])) and np.any(np.asarray(dv[:, :t]))


def test_kernel_under_vmap_and_scan():
    _need_kernel()
    q, k, v, _ = _inputs(2, 64, 4, 2, 32)
    direct = jax.jit(amx_attention.causal_attention)(q, k, v)
    per_seq = jax.jit(jax.vmap(lambda a, b, c: amx_attention.causal_attention(a[None], b[None], c[None])[0]))(q, k, v)
    np.testing.assert_array_equal(np.asarray(direct), np.asarray(per_seq))
    scanned = jax.lax.scan(lambda c, x: (c, amx_attention.causal_attention(*(a[None] for a in x))[0]), 0, (q, k, v))[1]
    np.testing.assert_array_equal(np.asarray(direct), np.asarray(scanned))


def test_model_with_amx_attention_matches_blocked():
    """A bf16 model: loss and every gradient with the kernel agree with golfjax's XLA attention."""
    _need_kernel()
    cfg = replace(Config().model, num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2, vocab_size=64,
                  compute_dtype="bfloat16")
    params = gpt.init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(2), a.shape), params)
    x = jax.random.randint(jax.random.PRNGKey(3), (2, 64), 0, 64)
    run = lambda c: jax.jit(jax.value_and_grad(lambda p: gpt.loss(p, c, x, x)))(params)
    (l_amx, g_amx), (l_blk, g_blk) = run(replace(cfg, attention_impl="amx")), run(replace(cfg, attention_impl="blocked"))
    assert abs(float(l_amx) - float(l_blk)) <= 2e-3 * abs(float(l_blk))
    for a, b in zip(jax.tree.leaves(g_amx), jax.tree.leaves(g_blk)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.linalg.norm(a - b) <= 3e-2 * np.linalg.norm(b) + 1e-6


def test_amx_falls_back_to_blocked_where_the_kernel_does_not_apply():
    """A sequence that is not a multiple of 32, or a document mask: the same numbers as "blocked"."""
    q, k, v, _ = _inputs(1, 48, 4, 2, 32)
    np.testing.assert_array_equal(np.asarray(attention_core(q, k, v, "amx")),
                                  np.asarray(attention_core(q, k, v, "blocked")))
    q, k, v, _ = _inputs(1, 64, 4, 2, 32)
    segments = jnp.repeat(jnp.arange(1, 3), 32)[None]
    np.testing.assert_array_equal(np.asarray(attention_core(q, k, v, "amx", segments)),
                                  np.asarray(attention_core(q, k, v, "blocked", segments)))


def test_explicit_amx_errors_say_why(monkeypatch):
    with pytest.raises(ValueError, match="compute_dtype='bfloat16'"):
        gpt.resolve_attention_impl("amx", jnp.float32)
    monkeypatch.setattr(amx_attention, "unavailable_reason", lambda: "no C++ compiler found")
    with pytest.raises(amx_attention.AmxUnavailable, match="cannot run here: no C\\+\\+ compiler found"):
        gpt.resolve_attention_impl("amx", BF16)
    with pytest.raises(amx_attention.AmxUnavailable, match="no C\\+\\+ compiler"):
        amx_attention.causal_attention(*_inputs(1, 32, 2, 2, 32)[:3])
    # "auto" never fails: without the kernel it is the blocked XLA attention
    assert gpt.resolve_attention_impl("auto", BF16) == ("blocked" if jax.default_backend() == "cpu" else "xla")


def test_auto_picks_the_kernel_only_for_bf16_on_one_device(monkeypatch):
    if jax.default_backend() != "cpu":
        pytest.skip("the kernel is for the CPU backend")
    monkeypatch.setattr(amx_attention, "unavailable_reason", lambda: None)
    assert gpt.resolve_attention_impl("auto", F32) == "blocked"
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert gpt.resolve_attention_impl("auto", BF16) == "amx"
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    assert gpt.resolve_attention_impl("auto", BF16) == "blocked"


def test_a_failing_build_is_reported_not_raised_as_a_traceback(tmp_path, monkeypatch):
    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\necho 'fatal error: no such header' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("GOLFJAX_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(amx_attention.AmxUnavailable, match="failed: fatal error: no such header"):
        amx_attention.build(str(broken))
    assert not any((tmp_path / "cache").iterdir())  # no half-written library left behind


def test_build_is_cached_by_source_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("GOLFJAX_CACHE_DIR", str(tmp_path))
    a, b = amx_attention.library_path("g++"), amx_attention.library_path("clang++")
    assert a != b and a.parent == b.parent == Path(tmp_path)
    assert amx_attention.library_path("g++") == a
