"""Newton-Schulz and the Muon transform against the reference's numbers and formulas."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optax.contrib import _muon as optax_muon

from golfjax.optim.muon import (
    NS_COEFFICIENTS,
    muon_momentum,
    newton_schulz,
    orthogonalized_direction,
    scale_by_muon,
)

ABC = (3.4445, -4.7750, 2.0315)


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def golden_ns(golden_dir):
    with np.load(golden_dir / "newton_schulz.npz") as d:
        return {k: d[k] for k in d.files}


def bf16_rounded_coefficients_ns(G: np.ndarray, steps: int = 5) -> jax.Array:
    """The trap: plain bf16 JAX arithmetic, which rounds the coefficients to bf16."""
    a, b, c = ABC
    X = jnp.asarray(G, jnp.bfloat16)
    X = X / (jnp.linalg.norm(X) + 1e-7)
    transposed = X.shape[0] > X.shape[1]
    X = X.T if transposed else X
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if transposed else X


def ns_float64(G: np.ndarray, steps: int = 5, eps: float = 1e-7) -> np.ndarray:
    a, b, c = ABC
    X = G / (np.linalg.norm(G) + eps)
    transposed = X.shape[0] > X.shape[1]
    X = X.T if transposed else X
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if transposed else X


@pytest.mark.parametrize("i", [0, 1, 2])
def test_newton_schulz_float32_matches_reference(golden_ns, i):
    out = newton_schulz(jnp.asarray(golden_ns[f"input_{i}"]), dtype=jnp.float32)
    assert out.dtype == jnp.float32
    assert rel_err(out, golden_ns[f"fp32_{i}"]) <= 1e-5


@pytest.mark.parametrize("i", [0, 1, 2])
def test_newton_schulz_bfloat16_matches_reference_eager(golden_ns, i):
    G = golden_ns[f"input_{i}"]
    out = jax.jit(newton_schulz)(jnp.asarray(G))  # the form training uses
    assert out.dtype == jnp.bfloat16
    err = rel_err(out, golden_ns[f"fp32_{i}"])
    assert err <= 5e-2
    assert err < 0.045
    # Same arithmetic as torch's eager bf16 (bit-identical on CPU when measured).
    assert rel_err(out, golden_ns[f"bf16_eager_{i}"]) <= 1e-2
    # Rounding the coefficients to bf16 is clearly worse (5-7 %).
    assert err < 0.8 * rel_err(bf16_rounded_coefficients_ns(G), golden_ns[f"fp32_{i}"])


def test_newton_schulz_compiled_rounding_matches_reference_compiled(golden_ns):
    """`rounding="compiled"` against the reference's torch.compile'd NS (inductor, CPU).

    The arithmetic is inductor's (read off its generated code; torch 2.13 reproduces
    `bf16_compiled_i` bit for bit), but bf16 Newton-Schulz amplifies a single flipped
    rounding to percent level within a few steps, and XLA's float32 accumulation order
    in the matmuls is not oneDNN's (it even changes with the jit context). Measured:
    0, 1.1 %, 5e-4 (jitted; the last is bit-exact unjitted). Eager is 2.9-3.3 % off.
    """
    compiled = jax.jit(functools.partial(newton_schulz, rounding="compiled"))
    errs, eager_errs = [], []
    for i in range(3):
        G = jnp.asarray(golden_ns[f"input_{i}"])
        out = compiled(G)
        assert out.dtype == jnp.bfloat16
        errs.append(rel_err(out, golden_ns[f"bf16_compiled_{i}"]))
        eager_errs.append(rel_err(jax.jit(newton_schulz)(G), golden_ns[f"bf16_compiled_{i}"]))
        # Still an orthogonalisation of the same quality as the reference's own bf16.
        assert rel_err(out, golden_ns[f"fp32_{i}"]) < 0.045
    assert max(errs) <= 2e-2, errs
    assert np.mean(errs) <= 1e-2, errs
    assert min(eager_errs) >= 2.5e-2, eager_errs  # the eager rounding fails this test


def test_newton_schulz_compiled_rounding_normalises_in_float32():
    """Compiled: X = bf16(G / (|G| + eps)) from the float32 input, no intermediate rounding."""
    G = jnp.asarray(np.random.default_rng(5).normal(size=(2, 48, 80)), jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(G), axis=(-2, -1), keepdims=True))
    expected = (G / (norm + 1e-7)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(newton_schulz(G, steps=0, rounding="compiled")), np.asarray(expected))
    # Eager rounds G, its norm and norm + eps to bf16 first: a different starting point.
    assert not np.array_equal(np.asarray(newton_schulz(G, steps=0)), np.asarray(expected))
    # In float32 the two roundings are the same arithmetic.
    assert rel_err(newton_schulz(G, dtype=jnp.float32, rounding="compiled"), newton_schulz(G, dtype=jnp.float32)) <= 1e-6
    with pytest.raises(ValueError):
        newton_schulz(G, rounding="inductor")
    with pytest.raises(ValueError):
        scale_by_muon(ns_rounding="inductor")


def test_scale_by_muon_passes_the_rounding_through():
    # First step: buffer = g, Nesterov input = g + m * g with m = warmup_start = 0.85.
    g = {"w": jnp.asarray(np.random.default_rng(6).normal(size=(32, 48)), jnp.float32)}
    for rounding in ("eager", "compiled"):
        tx = scale_by_muon(ns_rounding=rounding)
        u, _ = tx.update(g, tx.init(g))
        np.testing.assert_array_equal(np.asarray(u["w"]),
                                      np.asarray(orthogonalized_direction(g["w"] + 0.85 * g["w"], rounding=rounding)))


def test_newton_schulz_matches_optax_oracle_float32():
    G = np.random.default_rng(0).normal(size=(2, 24, 40)).astype(np.float32)
    coeffs = jnp.asarray(NS_COEFFICIENTS["standard"], jnp.float32)
    for g in (G[0], G[1, :, :24]):
        ours = newton_schulz(jnp.asarray(g), dtype=jnp.float32)
        oracle = optax_muon.orthogonalize_via_newton_schulz(jnp.asarray(g), coeffs, eps=1e-7)
        assert rel_err(ours, oracle) <= 1e-5


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_newton_schulz_transpose_equivariant_and_batched(dtype, tol):
    # Equal up to rounding only: XLA may accumulate a transposed or batched
    # matmul in another order, and in bf16 that can flip a rounding.
    G = jnp.asarray(np.random.default_rng(1).normal(size=(2, 24, 40)), jnp.float32)
    batched = newton_schulz(G, dtype=dtype)
    assert rel_err(newton_schulz(jnp.swapaxes(G, -1, -2), dtype=dtype), jnp.swapaxes(batched, -1, -2)) <= tol
    for layer in range(2):
        assert rel_err(batched[layer], newton_schulz(G[layer], dtype=dtype)) <= tol


def test_newton_schulz_square_equivariant_in_float32():
    # Square: X X^T and X^T X round differently, so only exact math is equivariant
    # (in bf16 the two orientations differ at the bf16 noise level, ~4 %).
    S = jnp.asarray(np.random.default_rng(1).normal(size=(24, 24)), jnp.float32)
    assert rel_err(newton_schulz(S.T, dtype=jnp.float32), newton_schulz(S, dtype=jnp.float32).T) <= 1e-5


def test_coefficient_tables():
    assert NS_COEFFICIENTS["standard"] == (ABC,) * 5
    G = jnp.asarray(np.random.default_rng(2).normal(size=(8, 12)), jnp.float32)
    explicit = newton_schulz(G, steps=7, coeffs=(ABC,), dtype=jnp.float32)  # last row reused
    np.testing.assert_array_equal(np.asarray(explicit), np.asarray(newton_schulz(G, steps=7, dtype=jnp.float32)))
    with pytest.raises(ValueError):
        newton_schulz(G, coeffs="polar_express_typo")
    with pytest.raises(ValueError):
        scale_by_muon(ns_coeffs=[(1.0, 2.0)])


def test_momentum_warmup_matches_reference_log(golden_dir):
    steps = json.loads((golden_dir / "golden.json").read_text())["steps"]
    for s in steps:
        m = float(muon_momentum(s["step"] - 1, 0.95, 0.85, 500))
        assert m == pytest.approx(s["muon_momentum"], rel=2e-7)
    assert float(muon_momentum(10_000, 0.95, 0.85, 500)) == pytest.approx(0.95)
    assert float(muon_momentum(0, 0.95, 0.85, 0)) == pytest.approx(0.95)


def reference_muon_float64(kernels: list[np.ndarray], momenta: list[float]) -> list[np.ndarray]:
    """One reference Muon step per gradient in float64, on torch (out, in) weights."""
    buf = np.zeros_like(kernels[0].swapaxes(-1, -2), np.float64)
    out = []
    for g_kernel, m in zip(kernels, momenta):
        g = g_kernel.astype(np.float64).swapaxes(-1, -2)
        buf = m * buf + g
        g = g + m * buf
        mats = g.reshape((-1,) + g.shape[-2:])
        dirs = np.stack([ns_float64(w) * max(1.0, w.shape[0] / w.shape[1]) ** 0.5 for w in mats])
        out.append(dirs.reshape(g.shape).swapaxes(-1, -2))
    return out


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_scale_by_muon_matches_reference_over_three_steps(dtype, tol):
    rng = np.random.default_rng(3)
    shapes = {"fc": (2, 16, 32), "proj": (2, 32, 16), "sq": (2, 16, 16), "plain": (24, 8)}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]
    tx = scale_by_muon(momentum=0.95, warmup_start=0.85, warmup_steps=4, ns_dtype=dtype)
    update = jax.jit(tx.update)
    state = tx.init(jax.tree.map(jnp.zeros_like, grads[0]))
    ours = []
    for g in grads:
        u, state = update(jax.tree.map(jnp.asarray, g), state)
        ours.append(u)
    assert int(state.count) == 3
    momenta = [0.85, 0.875, 0.9]
    for k in shapes:
        ref = reference_muon_float64([g[k] for g in grads], momenta)
        for step in range(3):
            assert ours[step][k].dtype == jnp.float32
            assert rel_err(ours[step][k], ref[step]) <= tol, (k, step)


def test_orthogonalized_direction_bfloat16_is_rounded_after_scaling():
    g = jnp.asarray(np.random.default_rng(4).normal(size=(2, 16, 32)), jnp.float32)  # out/in = 2
    d = orthogonalized_direction(g)
    assert d.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(d), np.asarray(d.astype(jnp.bfloat16).astype(jnp.float32)))
    assert rel_err(d, orthogonalized_direction(g, dtype=jnp.float32)) <= 5e-2
    with pytest.raises(ValueError):
        orthogonalized_direction(jnp.zeros(8))


@pytest.mark.parametrize("rounding", ["eager", "compiled"])
@pytest.mark.parametrize("shape", [(3, 64, 32), (2, 32, 96), (2, 2, 48, 48)])
def test_one_matrix_at_a_time_is_bit_identical_to_the_batched_stack(rounding, shape):
    """The CPU path orthogonalises a layer stack one matrix after the other (lax.map); the bits
    must be the batched product's, in both roundings and both orientations."""
    from golfjax.optim.muon import one_matrix_at_a_time, orthogonalized_direction

    g = jax.random.normal(jax.random.PRNGKey(sum(shape)), shape)
    fn = lambda x: orthogonalized_direction(x, rounding=rounding)
    batched, mapped = jax.jit(fn)(g), jax.jit(lambda x: one_matrix_at_a_time(fn, x))(g)
    assert mapped.shape == batched.shape == shape
    np.testing.assert_array_equal(np.asarray(mapped), np.asarray(batched))
    single = jax.jit(lambda x: one_matrix_at_a_time(fn, x))(g[0] if g.ndim == 3 else g[0, 0])
    np.testing.assert_array_equal(np.asarray(single), np.asarray(batched[0] if g.ndim == 3 else batched[0, 0]))
