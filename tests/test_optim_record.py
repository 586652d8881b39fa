"""The records' optimizer options: Polar Express, MuonEq-R, decoupled weight decay,
the later LR schedule and the sharded (Parallel Muon) Newton-Schulz."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golfjax.config import Config, ConfigError, OptimConfig, with_values, validate
from golfjax.optim.build import build_optimizer, lr_multiplier, training_budget_ms
from golfjax.optim.muon import NS_COEFFICIENTS, newton_schulz, row_normalize, scale_by_muon
from golfjax.parallel import make_mesh

POLAR = NS_COEFFICIENTS["polar_express"]


def ns_float64(G: np.ndarray, table, steps: int, safety: float = 1.0, eps: float = 1e-7) -> np.ndarray:
    """Newton-Schulz on one (rows, cols) matrix in float64, from the formula."""
    X = G.astype(np.float64)
    X = X / (safety * np.linalg.norm(X) + eps)
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.T
    for i in range(steps):
        a, b, c = table[min(i, len(table) - 1)]
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if transposed else X


def test_polar_express_table_is_the_records():
    assert len(POLAR) == 5
    assert POLAR[0] == (8.156554524902461, -22.48329292557795, 15.878769915207462)
    assert POLAR[4] == (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)


@pytest.mark.parametrize("shape,safety", [((24, 40), 1.0), ((40, 24), 1.02), ((32, 32), 1.0)])
def test_polar_express_matches_float64(shape, safety):
    G = np.random.default_rng(0).normal(size=shape)
    ours = newton_schulz(jnp.asarray(G, jnp.float32), 5, "polar_express", dtype=jnp.float32, safety=safety)
    ref = ns_float64(G, POLAR, 5, safety)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5)
    # Polar Express really is a different iteration: 5 standard steps land elsewhere.
    assert np.abs(ns_float64(G, NS_COEFFICIENTS["standard"], 5) - ref).max() > 1e-2
    # and it orthogonalises closer: singular values nearer 1 than the standard quintic's
    spread = lambda X: np.abs(np.linalg.svd(X, compute_uv=False) - 1).max()
    assert spread(ref) < min(0.2, spread(ns_float64(G, NS_COEFFICIENTS["standard"], 5)))


def muon_float64(grads, m, row_norm, table, steps):
    """Nesterov momentum, optional MuonEq-R, NS, scale, on torch (out, in) = kernel.T, float64."""
    buf = np.zeros_like(grads[0].T)
    out = []
    for g_kernel in grads:
        g = g_kernel.T.astype(np.float64)
        buf = m * buf + g
        g = g + m * buf
        if row_norm:
            g = g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-7)
        X = ns_float64(g, table, steps) * np.sqrt(max(1.0, g.shape[0] / g.shape[1]))
        out.append(X.T)
    return out


@pytest.mark.parametrize("coeffs", ["standard", "polar_express"])
def test_muoneq_r_matches_float64(coeffs):
    rng = np.random.default_rng(1)
    # rows of very different sizes: row normalisation changes the direction
    grads = [rng.normal(size=(16, 24)) * rng.uniform(0.01, 10.0, size=(1, 24)) for _ in range(3)]
    tx = scale_by_muon(momentum=0.9, warmup_steps=0, ns_coeffs=coeffs, ns_dtype=jnp.float32, row_norm=True)
    state = tx.init(jnp.zeros((16, 24)))
    ref = muon_float64(grads, 0.9, True, NS_COEFFICIENTS[coeffs], 5)
    plain = muon_float64(grads, 0.9, False, NS_COEFFICIENTS[coeffs], 5)
    for g, r, p in zip(grads, ref, plain):
        d, state = tx.update(jnp.asarray(g, jnp.float32), state)
        np.testing.assert_allclose(np.asarray(d), r, atol=5e-5)
        assert np.abs(r - p).max() > 1e-2


def test_row_normalize_is_per_output_unit():
    k = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5, 7)), jnp.float32)  # (L, in, out)
    n = np.asarray(row_normalize(k))
    np.testing.assert_allclose(np.linalg.norm(n, axis=-2), 1.0, rtol=1e-6)
    assert np.isfinite(np.asarray(row_normalize(jnp.zeros((4, 4))))).all()


def tiny_params():
    rng = np.random.default_rng(3)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    return {"tok_emb": {"embedding": f(16, 8)}, "lm_head": {"kernel": f(8, 16)},
            "blocks": {"mlp": {"fc": {"kernel": f(2, 8, 12)}}, "attn_scale": f(2, 8)}, "skip_weights": f(1, 8)}


def test_decoupled_weight_decay_per_group():
    params = tiny_params()
    base = OptimConfig(muon_ns_dtype="float32")
    wd = dataclasses.replace(base, muon_wd=0.1, embed_wd=0.2, adam_wd=0.3, head_wd=0.4)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    u0, _ = build_optimizer(params, base, False).update(grads, build_optimizer(params, base, False).init(params), params)
    tx = build_optimizer(params, wd, False)
    u1, _ = tx.update(grads, tx.init(params), params)
    expect = {("tok_emb", "embedding"): (base.embed_lr, 0.2), ("lm_head", "kernel"): (base.head_lr, 0.4),
              ("blocks", "mlp", "fc", "kernel"): (base.matrix_lr, 0.1), ("blocks", "attn_scale"): (base.scalar_lr, 0.3),
              ("skip_weights",): (base.scalar_lr, 0.3)}
    for keys, (lr, d) in expect.items():
        a, b, p = u0, u1, params
        for k in keys:
            a, b, p = a[k], b[k], p[k]
        # update = -lr * (direction + wd * p): after lr_mul, p <- p (1 - lr_mul lr wd) - lr_mul lr direction
        np.testing.assert_allclose(np.asarray(b) - np.asarray(a), -lr * d * np.asarray(p), rtol=1e-5, atol=1e-7,
                                   err_msg=str(keys))


def test_later_lr_schedule_key_points():
    # the TOP record: warmdown_frac 0.85, MIN_LR 0.1, 600 s cap with a 0.5 s reserve
    f = lambda ms: lr_multiplier(100, ms, 20000, 1200, 600.0, 0.85, 0.1, 0.5)
    budget = training_budget_ms(600.0, 0.5)
    assert budget == 599_500.0
    assert f(0.0) == 1.0
    assert f(0.14 * budget) == 1.0
    assert f(0.15 * budget) == pytest.approx(1.0)
    assert f(0.575 * budget) == pytest.approx(0.5)
    assert f(0.9 * budget) == pytest.approx(0.1 / 0.85 * 1.0)  # (1 - 0.9)/0.85 = 0.1176 > floor
    assert f(0.95 * budget) == 0.1  # floor
    assert f(budget) == 0.1
    # without a cap: fraction of the iterations
    g = lambda step: lr_multiplier(step, 0.0, 1000, 0, 0.0, 0.5, 0.0, 0.0)
    assert g(499) == 1.0 and g(500) == 1.0 and g(750) == 0.5 and g(1000) == 0.0
    # min_lr also floors the reference rule; the reserve shortens its clock
    assert lr_multiplier(19999, 0.0, 20000, 1200, 0.0, 0.0, 0.2) == 0.2
    assert lr_multiplier(1000, 400_000.0, 20000, 1200, 600.0, 0.0, 0.0, 100.0) == pytest.approx(100_000 / 480_000)


def test_options_are_checked():
    bad = [("optim", "muon_ns_coeffs", "polar"), ("train", "warmdown_frac", 1.5), ("train", "ema_decay", 1.0),
           ("train", "swa_every", -1), ("data", "data_order", "random"), ("optim", "muon_wd", -0.1),
           ("train", "gptq_reserve_seconds", 700.0)]
    for section, name, value in bad:
        with pytest.raises(ConfigError, match=name):
            validate(with_values(Config(), {section: {name: value}}))


def test_sharded_newton_schulz_equals_replicated():
    mesh = make_mesh()
    assert mesh.shape["data"] == 8
    rng = np.random.default_rng(4)
    grads = {"a": jnp.asarray(rng.normal(size=(11, 24, 40)), jnp.float32),  # 11 layers: padded to 16
             "b": jnp.asarray(rng.normal(size=(3, 40, 24)), jnp.float32)}
    for dtype in (jnp.float32, jnp.bfloat16):
        outs = {}
        for sharded in (False, True):
            tx = scale_by_muon(ns_dtype=dtype, ns_coeffs="polar_express", row_norm=True,
                               shard_mesh=mesh if sharded else None)
            fn = jax.jit(lambda g, s: tx.update(g, s))
            state = tx.init(grads)
            lowered = fn.lower(grads, state).compile().as_text()
            outs[sharded] = fn(grads, state)[0]
            if sharded:
                assert "all-gather" in lowered  # each device did its share, then they were gathered
        for k in grads:
            a, b = np.asarray(outs[True][k], np.float32), np.asarray(outs[False][k], np.float32)
            if dtype == jnp.bfloat16:  # the reference precision: bit for bit
                np.testing.assert_array_equal(a, b)
            else:  # float32: XLA:CPU may pick another dot kernel for a one-matrix shard (last-bit rounding)
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
