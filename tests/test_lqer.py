"""LQER: low-rank correction of the quantization error, its INT2/INT4 packing, top-k selection."""

from __future__ import annotations

import numpy as np
import pytest

from golfjax.export import lqer, quant
from golfjax.export.quant import QuantPlan, QuantRule


def structured(rows: int = 96, cols: int = 160, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    """A weight with a few outlier directions (the error of per-row int-k is then partly low-rank)."""
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((rows, 2)) @ rng.standard_normal((2, cols))
    return (scale * (rng.standard_normal((rows, cols)) + 0.8 * low)).astype(np.float32)


def fro(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b))


def test_low_rank_factors_are_the_truncated_svd() -> None:
    rng = np.random.default_rng(1)
    exact = rng.standard_normal((30, 3)) @ rng.standard_normal((3, 50))
    a, b = lqer.low_rank_factors(exact, 3)
    assert a.shape == (30, 3) and b.shape == (3, 50)
    assert np.allclose(a @ b, exact, atol=1e-4)
    assert np.allclose(b @ b.T, np.eye(3), atol=1e-5)  # B = V_r^T has orthonormal rows
    a1, b1 = lqer.low_rank_factors(exact, 1)
    s = np.linalg.svd(exact, compute_uv=False)
    assert fro(exact, a1 @ b1) == pytest.approx(float(np.sqrt(np.sum(s[1:] ** 2))), rel=1e-4)


def test_asym_packing_ranges_and_groups() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((40, 4)).astype(np.float32), rng.standard_normal((4, 50)).astype(np.float32)
    arrays = lqer.pack_asym(a, b, group=64)
    assert arrays["lqer_a"].dtype == np.int8 and arrays["lqer_a"].min() >= -2 and arrays["lqer_a"].max() <= 1
    assert arrays["lqer_a_scale"].shape == () and arrays["lqer_a_scale"].dtype == np.float16
    assert float(arrays["lqer_a_scale"]) == pytest.approx(np.abs(a).max() / 1.5, rel=1e-3)
    assert arrays["lqer_b"].shape == (4, 64)  # 200 values -> 4 groups of 64, zero padded
    assert arrays["lqer_b"].min() >= -8 and arrays["lqer_b"].max() <= 7
    groups = np.zeros(256, np.float32)
    groups[:200] = b.reshape(-1)
    want = (np.abs(groups.reshape(4, 64)).max(axis=1) / 7.5).astype(np.float16)
    assert np.array_equal(arrays["lqer_b_scale"], want)
    corr = lqer.correction(arrays, 40, 50, asym=True)
    assert corr.shape == (40, 50)
    b_hat = (arrays["lqer_b"] * want.astype(np.float32)[:, None]).reshape(-1)[:200].reshape(4, 50)
    assert np.abs(b_hat - b).max() <= np.abs(b).max() / 7.5 / 2 * 1.01


def test_sym_packing_is_int4_per_row() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((20, 2)).astype(np.float32), rng.standard_normal((2, 30)).astype(np.float32)
    arrays = lqer.pack_sym(a, b)
    assert arrays["lqer_a_scale"].shape == (20,) and arrays["lqer_b_scale"].shape == (2,)
    for key in ("lqer_a", "lqer_b"):
        assert arrays[key].min() >= -7 and arrays[key].max() <= 7
    a_hat = arrays["lqer_a"] * arrays["lqer_a_scale"].astype(np.float32)[:, None]
    assert np.all(np.abs(a_hat - a) <= np.abs(a).max(axis=1, keepdims=True) / 7 / 2 * 1.01)


@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("bits", [4, 6])
def test_lqer_lowers_the_error_it_corrects(asym: bool, bits: int) -> None:
    w = structured()
    qt = quant.quantize_tensor(w, QuantRule(bits=bits, clip="sdclip", sdclip_k=3.0))
    before = fro(w, quant.dequantize_tensor(qt))
    corrected = quant.with_lqer(qt, w, rank=4, asym=asym)
    assert corrected.scheme == f"int{bits}_per_row_lqer_{'asym' if asym else 'sym'}"
    after = fro(w, quant.dequantize_tensor(corrected))
    assert after < 0.97 * before
    # the base codes are untouched: the correction is additive
    assert np.array_equal(corrected.arrays["q"], qt.arrays["q"])
    with pytest.raises(ValueError, match="already"):
        quant.with_lqer(corrected, w, rank=4)


def test_state_lqer_corrects_the_top_k_error_matrices() -> None:
    state = {
        f"blocks.{i}.mlp.fc.weight": structured(rows=300, cols=240, seed=i, scale=s)
        for i, s in enumerate((0.01, 0.04, 0.02, 0.08))
    }
    plan = QuantPlan(mlp=QuantRule(bits=5, clip="sdclip", sdclip_k=4.0), lqer_rank=4, lqer_top_k=2)
    state_q, _ = quant.quantize_state(state, plan)
    assert sorted(quant.lqer_corrected(state_q)) == ["blocks.1.mlp.fc.weight", "blocks.3.mlp.fc.weight"]
    plain = quant.dequantize_state(quant.quantize_state(state, QuantPlan(mlp=plan.mlp))[0])
    restored = quant.dequantize_state(state_q)
    for name in quant.lqer_corrected(state_q):
        assert fro(state[name], restored[name]) < fro(state[name], plain[name])
    off = quant.quantize_state(state, QuantPlan(mlp=QuantRule(bits=5, lqer=False), lqer_rank=4))[0]
    assert quant.lqer_corrected(off) == []


def test_malformed_lqer_arrays_are_refused() -> None:
    w = structured(rows=20, cols=100)  # rank 2 x 100 = 200 values: 4 groups
    qt = quant.with_lqer(quant.quantize_tensor(w, QuantRule(bits=4)), w, rank=2)
    arrays = dict(qt.arrays, lqer_b=qt.arrays["lqer_b"][:1], lqer_b_scale=qt.arrays["lqer_b_scale"][:1])
    with pytest.raises(ValueError, match="malformed LQER"):
        quant.dequantize_tensor(quant.QuantizedTensor(qt.scheme, qt.dtype, qt.shape, arrays))
