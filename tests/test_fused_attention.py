"""The fused CPU attention kernel (golfjax.model.fused_attention) against float64 and the XLA path.

The kernel tests need an x86-64 CPU (AVX-512F for float32, AMX-BF16 for bf16) and a
C++ compiler; elsewhere they skip and say which is missing (a kernel that does not
compile fails them). The fallback and error tests run everywhere.
"""

from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golfjax.config import Config
from golfjax.model import cpu_ops, fused_attention, gpt
from golfjax.model.layers import attention_core, qk_norm_rotary
from tests.test_eval_sliding import setup  # noqa: F401  (session fixture: tokenizer, tables, documents)

F32 = jnp.float32
BF16 = jnp.bfloat16


def _need_kernel(dtype=BF16):
    reason = fused_attention.unavailable_reason(dtype)
    if reason is not None and reason.startswith("building"):
        pytest.fail(f"the fused attention kernel does not compile: {reason}")  # a bug, not a missing feature
    if reason is not None:
        pytest.skip(f"fused attention kernel unavailable here: {reason}")


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
    ours = np.asarray(jax.jit(fused_attention.causal_attention)(q, k, v).astype(F32), np.float64)
    xla = np.asarray(jax.jit(cpu_ops.causal_attention)(q, k, v).astype(F32), np.float64)
    err_ours, err_xla = np.abs(ours - exact).max(), np.abs(xla - exact).max()
    assert err_ours <= 1.25 * err_xla + 1e-3, (err_ours, err_xla)
    # the two implementations differ by bf16 output roundings at most
    np.testing.assert_allclose(ours, xla, rtol=0, atol=2 * 2.0 ** -7 * np.abs(xla).max())

    reference = _exact_grads(q, k, v, g)
    for name, a, b, r in zip("qkv", _grads(fused_attention.causal_attention, q, k, v, g),
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
    f = jax.jit(fused_attention.causal_attention)
    np.testing.assert_array_equal(np.asarray(f(q, k, v)[:, :t]), np.asarray(f(q, k2, v2)[:, :t]))
    g_early = g.at[:, t:].set(0)
    dq, dk, dv = _grads(fused_attention.causal_attention, q, k, v, g_early)
    assert not np.any(np.asarray(dk[:, t:])) and not np.any(np.asarray(dv[:, t:]))
    assert not np.any(np.asarray(dq[:, t:]))
    assert np.any(np.asarray(dk[:, :t])) and np.any(np.asarray(dv[:, :t]))


def test_kernel_under_vmap_and_scan():
    _need_kernel()
    q, k, v, _ = _inputs(2, 64, 4, 2, 32)
    direct = jax.jit(fused_attention.causal_attention)(q, k, v)
    per_seq = jax.jit(jax.vmap(lambda a, b, c: fused_attention.causal_attention(a[None], b[None], c[None])[0]))(q, k, v)
    np.testing.assert_array_equal(np.asarray(direct), np.asarray(per_seq))
    scanned = jax.lax.scan(lambda c, x: (c, fused_attention.causal_attention(*(a[None] for a in x))[0]), 0, (q, k, v))[1]
    np.testing.assert_array_equal(np.asarray(direct), np.asarray(scanned))


def _model_fused_and_blocked(compute_dtype: str):
    """Loss and gradients of a small model with attention_impl "fused" and "blocked"."""
    cfg = replace(Config().model, num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2, vocab_size=64,
                  compute_dtype=compute_dtype)
    params = gpt.init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(2), a.shape), params)
    x = jax.random.randint(jax.random.PRNGKey(3), (2, 64), 0, 64)
    run = lambda c: jax.jit(jax.value_and_grad(lambda p: gpt.loss(p, c, x, x)))(params)
    return run(replace(cfg, attention_impl="fused")), run(replace(cfg, attention_impl="blocked"))


def test_model_with_fused_attention_matches_blocked():
    """A bf16 model: loss and every gradient with the kernel agree with golfjax's XLA attention."""
    _need_kernel()
    (l_fused, g_fused), (l_blk, g_blk) = _model_fused_and_blocked("bfloat16")
    assert abs(float(l_fused) - float(l_blk)) <= 2e-3 * abs(float(l_blk))
    for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_blk)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.linalg.norm(a - b) <= 3e-2 * np.linalg.norm(b) + 1e-6


def test_fused_falls_back_to_blocked_where_the_kernel_does_not_apply():
    """A sequence that is not a multiple of 32, or a document mask: the same numbers as "blocked"."""
    q, k, v, _ = _inputs(1, 48, 4, 2, 32)
    np.testing.assert_array_equal(np.asarray(attention_core(q, k, v, "fused")),
                                  np.asarray(attention_core(q, k, v, "blocked")))
    q, k, v, _ = _inputs(1, 64, 4, 2, 32)
    segments = jnp.repeat(jnp.arange(1, 3), 32)[None]
    np.testing.assert_array_equal(np.asarray(attention_core(q, k, v, "fused", segments)),
                                  np.asarray(attention_core(q, k, v, "blocked", segments)))


def test_explicit_fused_errors_say_why(monkeypatch):
    monkeypatch.setattr(fused_attention, "unavailable_reason", lambda dtype=BF16: "no C++ compiler found")
    with pytest.raises(fused_attention.KernelUnavailable, match="cannot run here: no C\\+\\+ compiler found"):
        gpt.resolve_attention_impl("fused", BF16)
    with pytest.raises(fused_attention.KernelUnavailable, match="no C\\+\\+ compiler"):
        fused_attention.causal_attention(*_inputs(1, 32, 2, 2, 32)[:3])
    # "auto" never fails: without the kernel it is the blocked XLA attention
    assert gpt.resolve_attention_impl("auto", BF16) == ("blocked" if jax.default_backend() == "cpu" else "xla")


def test_the_kernel_takes_bf16_and_float32_only():
    assert "float16" in fused_attention.unavailable_reason(jnp.float16)
    q = jnp.zeros((1, 32, 2, 32), jnp.float16)
    assert not fused_attention.supports(q, q)
    assert not fused_attention.supports(q.astype(F32), q.astype(BF16))  # mixed dtypes
    assert not fused_attention.supports(jnp.zeros((1, 32, 2, 48), F32), jnp.zeros((1, 32, 2, 48), F32))
    assert fused_attention.supports(q.astype(F32), q.astype(F32))


def test_auto_picks_the_kernel_only_on_one_device(monkeypatch):
    if jax.default_backend() != "cpu":
        pytest.skip("the kernel is for the CPU backend")
    monkeypatch.setattr(fused_attention, "unavailable_reason", lambda dtype=BF16: None)
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert gpt.resolve_attention_impl("auto", BF16) == "fused"
    assert gpt.resolve_attention_impl("auto", F32) == "fused"
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    assert gpt.resolve_attention_impl("auto", BF16) == "blocked"
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    monkeypatch.setattr(fused_attention, "unavailable_reason",
                        lambda dtype=BF16: None if jnp.dtype(dtype) == F32 else "no AMX")
    assert gpt.resolve_attention_impl("auto", BF16) == "blocked"  # per dtype: float32 may run where bf16 cannot
    assert gpt.resolve_attention_impl("auto", F32) == "fused"


@pytest.mark.parametrize("shape", [(1, 256, 8, 4, 64), (2, 64, 4, 4, 32), (1, 96, 6, 3, 64), (2, 128, 4, 1, 128)])
def test_float32_kernel_equals_the_xla_path_to_float32_rounding(shape):
    _need_kernel(F32)
    q, k, v, g = (x.astype(F32) for x in _inputs(*shape, scale=2.0))
    ours = jax.jit(fused_attention.causal_attention)(q, k, v)
    assert ours.dtype == F32
    np.testing.assert_allclose(ours, jax.jit(cpu_ops.causal_attention)(q, k, v), rtol=0, atol=2e-5)
    np.testing.assert_allclose(ours, _exact(q, k, v), rtol=0, atol=2e-5)
    for a, b in zip(_grads(fused_attention.causal_attention, q, k, v, g), _exact_grads(q, k, v, g)):
        assert a.dtype == F32
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(jnp.max(jnp.abs(b))))


def test_float32_kernel_is_causal():
    _need_kernel(F32)
    q, k, v, g = (x.astype(F32) for x in _inputs(1, 128, 4, 2, 64))
    t = 45
    k2, v2 = k.at[:, t:].multiply(-3.0), v.at[:, t:].add(5.0)
    f = jax.jit(fused_attention.causal_attention)
    np.testing.assert_array_equal(np.asarray(f(q, k, v)[:, :t]), np.asarray(f(q, k2, v2)[:, :t]))
    _, dk, dv = _grads(fused_attention.causal_attention, q, k, v, g.at[:, t:].set(0))
    assert not np.any(np.asarray(dk[:, t:])) and not np.any(np.asarray(dv[:, t:]))
    assert np.any(np.asarray(dk[:, :t])) and np.any(np.asarray(dv[:, :t]))


def test_float32_model_with_fused_attention_matches_blocked():
    _need_kernel(F32)
    (l_f, g_f), (l_b, g_b) = _model_fused_and_blocked("float32")
    assert abs(float(l_f) - float(l_b)) <= 1e-5
    for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_b)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_failing_build_is_reported_not_raised_as_a_traceback(tmp_path, monkeypatch):
    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\necho 'fatal error: no such header' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("GOLFJAX_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(fused_attention.KernelUnavailable, match="failed: fatal error: no such header"):
        fused_attention.build(str(broken))
    assert not any((tmp_path / "cache").iterdir())  # no half-written library left behind


def test_build_is_cached_by_source_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("GOLFJAX_CACHE_DIR", str(tmp_path))
    a, b = fused_attention.library_path("g++"), fused_attention.library_path("clang++")
    assert a != b and a.parent == b.parent == Path(tmp_path)
    assert fused_attention.library_path("g++") == a


def test_evaluation_and_ttt_with_fused_attention(setup):  # noqa: F811  (the sliding tests' session fixture)
    """Sliding-window scores with the kernel equal the XLA attention's (same targets, same bytes, loss to
    float32 rounding), and score-first TTT through the kernel's gradient still never lets a token reach
    the weights before it is scored."""
    _need_kernel(F32)
    from golfjax.eval.evaluator import Evaluator
    from golfjax.parallel import make_mesh, put_replicated
    from tests.test_eval_sliding import eval_config
    from tests.test_eval_ttt import CHUNK, TTT, nll_by_position

    sp, tables, stream, _ = setup
    model = replace(eval_config().model, model_dim=128, num_heads=4, num_kv_heads=2)  # head_dim 32: the kernel runs
    params = gpt.init_params(model, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.PRNGKey(1), a.shape), params)
    mesh = make_mesh(jax.devices()[:1])
    tokens = stream[: 3 * CHUNK + 40].copy()

    def evaluate(impl, toks, **fields):
        cfg = eval_config(**fields)
        cfg = replace(cfg, model=replace(model, attention_impl=impl))
        ev = Evaluator(cfg, mesh, tables, bos_id=sp.bos_id(), progress=False)
        return ev.evaluate(put_replicated(params, mesh), toks, record=True)

    fused, blocked = (evaluate(impl, tokens, eval_mode="sliding", eval_stride=16) for impl in ("fused", "blocked"))
    assert fused.tokens_scored == blocked.tokens_scored == len(tokens) - 1
    assert fused.bytes == blocked.bytes
    assert abs(fused.val_loss - blocked.val_loss) <= 1e-5 and fused.val_loss != 0

    q = CHUNK + 100  # inside chunk 1
    changed = tokens.copy()
    changed[q:] = (changed[q:].astype(np.int64) * 7 + 3) % 1000 + 8
    a, b = (nll_by_position(evaluate("fused", t, **TTT), len(tokens)) for t in (tokens, changed))
    np.testing.assert_array_equal(a[1:q], b[1:q])
    assert np.all(a[2 * CHUNK + 1:] != b[2 * CHUNK + 1:])


def test_custom_transpose_and_the_weight_gradient_that_uses_it(monkeypatch):
    """The C++ transpose equals .T exactly (a stack too, odd sizes); with it (one device, float32) the
    Dense weight gradient is bit-identical to the XLA transposed copy's."""
    _need_kernel(F32)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 70, 45))
    np.testing.assert_array_equal(np.asarray(jax.jit(fused_attention.custom_transpose)(x)),
                                  np.asarray(jnp.swapaxes(x, -1, -2)))
    xb = x.astype(BF16)
    np.testing.assert_array_equal(np.asarray(jax.jit(fused_attention.custom_transpose)(xb)),
                                  np.asarray(jnp.swapaxes(xb, -1, -2)))
    h = jax.random.normal(jax.random.PRNGKey(1), (3, 40, 64))
    w = jax.random.normal(jax.random.PRNGKey(2), (64, 96))
    loss = lambda h, w: jnp.sum(cpu_ops.linear(jnp.square(jax.nn.relu(h)), w) ** 2)
    grads = lambda: jax.jit(jax.grad(loss, argnums=(0, 1)))(h, w)
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    assert cpu_ops.weight_grad_lhs.__module__ == "golfjax.model.cpu_ops"
    xla = grads()
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    ours = grads()
    text = jax.jit(jax.grad(loss, argnums=1)).lower(h, w).as_text()
    assert "golfjax_transpose_f32" in text  # the kernel is really on this path
    for a, b in zip(ours, xla):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("shape", [(2, 64, 4, 64, 64), (1, 96, 3, 32, 16), (1, 64, 2, 128, 96)])
def test_norm_rotary_matches_the_model_maths(dtype, shape):
    """q/k RMSNorm + (partial) rotary + per-head gain, value and gradients (x and gain): the kernel
    against the model's XLA ops in float32; in bf16 at least as close to that as the XLA chain is."""
    from golfjax.model.layers import rotary_tables
    _need_kernel(dtype)
    batch, seq, heads, head_dim, rot = shape
    keys = jax.random.split(jax.random.PRNGKey(sum(shape)), 3)
    x = (3.0 * jax.random.normal(keys[0], shape[:4], F32)).astype(dtype)
    gain = 1.5 + jax.random.normal(keys[1], (heads,), F32)
    g = jax.random.normal(keys[2], shape[:4], F32).astype(dtype)
    cos, sin = rotary_tables(seq, rot, 10000.0)

    def value_and_grads(fn, x):
        loss = lambda x, gain: jnp.sum(fn(x, cos, sin, gain).astype(F32) * g.astype(F32))
        return jax.jit(fn)(x, cos, sin, gain), jax.jit(jax.grad(loss, argnums=(0, 1)))(x, gain)

    (y, (dx, dgain)) = value_and_grads(fused_attention.norm_rotary, x)
    (y32, (dx32, dgain32)) = value_and_grads(qk_norm_rotary, x.astype(F32))
    assert y.dtype == dtype and dx.dtype == dtype and dgain.dtype == F32
    rel = lambda a, b: float(jnp.linalg.norm(a.astype(F32) - b) / jnp.linalg.norm(b))
    if dtype == F32:
        for a, b in ((y, y32), (dx, dx32), (dgain, dgain32)):
            assert rel(a, b) < 2e-6
    else:
        y_x, (dx_x, dgain_x) = value_and_grads(qk_norm_rotary, x)
        for ours, xla, exact in ((y, y_x, y32), (dx, dx_x, dx32), (dgain, dgain_x, dgain32)):
            assert rel(ours, exact) <= max(rel(xla, exact), 4e-3)
    # the rotary really acts: at a later position the same row comes out turned
    if rot:
        row = fused_attention.norm_rotary(jnp.broadcast_to(x[:1, :1], (1, seq) + x.shape[2:]), cos, sin, gain)
        assert not np.allclose(np.asarray(row[0, 0], np.float32), np.asarray(row[0, seq - 1], np.float32))
        np.testing.assert_array_equal(np.asarray(row[0, 0, :, rot:]), np.asarray(row[0, seq - 1, :, rot:]))


def test_norm_rotary_rejects_bad_shapes():
    _need_kernel(F32)
    x = jnp.zeros((1, 32, 2, 32), F32)
    cos = jnp.zeros((32, 16), F32)
    with pytest.raises(ValueError, match="norm_rotary needs"):
        fused_attention.norm_rotary(x, cos[:16], cos[:16])  # a table for another length
    with pytest.raises(ValueError, match="norm_rotary needs"):
        fused_attention.norm_rotary(x, jnp.zeros((32, 17)), jnp.zeros((32, 17)))  # R > D


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_fused_rms_norm_matches_the_model_maths(dtype):
    """The blocks' RMSNorm on the kernel (norm_rotary without rotary or gain), value and gradient."""
    from golfjax.model.layers import rms_norm
    _need_kernel(dtype)
    x = (4.0 * jax.random.normal(jax.random.PRNGKey(5), (2, 48, 320), F32)).astype(dtype)
    g = jax.random.normal(jax.random.PRNGKey(6), x.shape, F32).astype(dtype)

    def value_and_grad(fn, x):
        return jax.jit(fn)(x), jax.jit(jax.grad(lambda x: jnp.sum(fn(x).astype(F32) * g.astype(F32))))(x)

    y, dx = value_and_grad(fused_attention.rms_norm, x)
    y32, dx32 = value_and_grad(rms_norm, x.astype(F32))
    assert y.shape == x.shape and y.dtype == dtype and dx.dtype == dtype
    rel = lambda a, b: float(jnp.linalg.norm(a.astype(F32) - b) / jnp.linalg.norm(b))
    if dtype == F32:
        assert rel(y, y32) < 2e-6 and rel(dx, dx32) < 2e-6
    else:
        y_x, dx_x = value_and_grad(rms_norm, x)
        assert rel(y, y32) <= max(rel(y_x, y32), 4e-3) and rel(dx, dx32) <= max(rel(dx_x, dx32), 4e-3)
    assert fused_attention.supports_norm(x) and not fused_attention.supports_norm(jnp.zeros((2, 513), dtype))


def test_norm_kernels_under_vmap_and_grad_of_vmap():
    """vmap (sequential over the custom call) gives each slice's own result, forward and backward."""
    from golfjax.model.layers import rotary_tables
    _need_kernel(F32)
    x = jax.random.normal(jax.random.PRNGKey(7), (3, 32, 2, 32), F32)
    cos, sin = rotary_tables(32, 32, 10000.0)
    gain = jnp.asarray([1.5, 0.5])
    one = lambda xi: fused_attention.norm_rotary(xi[None], cos, sin, gain)[0]
    np.testing.assert_array_equal(np.asarray(jax.vmap(one)(x)), np.asarray(fused_attention.norm_rotary(x, cos, sin, gain)))
    g_vmapped = jax.grad(lambda x: jnp.sum(jax.vmap(one)(x) ** 2))(x)
    g_direct = jax.grad(lambda x: jnp.sum(fused_attention.norm_rotary(x, cos, sin, gain) ** 2))(x)
    np.testing.assert_allclose(np.asarray(g_vmapped), np.asarray(g_direct), rtol=1e-6, atol=1e-6)
    h = x.reshape(3, 32, 64)
    np.testing.assert_array_equal(np.asarray(jax.vmap(fused_attention.rms_norm)(h)), np.asarray(fused_attention.rms_norm(h)))
