"""int-k per-row quantizers: ranges, clip rules (row max, percentile, GPTQ-lite search, SDClip),
bit packing, per-tensor rules and the artifact round trip of the new schemes."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest

from golfjax.config import Config
from golfjax.export import artifact, quant
from golfjax.export.quant import QuantPlan, QuantRule


def heavy_tailed(rows: int = 48, cols: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, size=(rows, cols)) * 0.02).astype(np.float32)


def test_int_ranges_by_bits_and_mode() -> None:
    for bits in quant.INT_BITS:
        top = 2 ** (bits - 1) - 1
        assert quant.int_range(bits, "symmetric") == (-top, top)
        assert quant.int_range(bits, "full") == (-top - 1, top)
    assert quant.int_range(6, "symmetric") == (-31, 31) and quant.int_range(6, "full") == (-32, 31)
    with pytest.raises(ValueError, match="bits"):
        quant.int_range(3)
    with pytest.raises(ValueError, match="range"):
        quant.int_range(6, "asym")


def test_full_range_reaches_the_lowest_code_only_when_asked() -> None:
    scale = quant.stored_scale(np.array([0.01], np.float32))
    w = np.array([[-0.32, -0.31, 0.31, 0.5]], np.float32)
    assert quant.quantize_rows(w, scale, *quant.int_range(6, "full")).tolist() == [[-32, -31, 31, 31]]
    assert quant.quantize_rows(w, scale, *quant.int_range(6, "symmetric")).tolist() == [[-31, -31, 31, 31]]


@pytest.mark.parametrize("bits", quant.INT_BITS)
@pytest.mark.parametrize("clip", ["rowmax", "percentile", "search", "sdclip"])
@pytest.mark.parametrize("mode", ["symmetric", "full"])
def test_round_trip_error_within_half_a_step(bits: int, clip: str, mode: str) -> None:
    w = heavy_tailed()
    rule = QuantRule(bits=bits, clip=clip, clip_q=0.999, sdclip_k=3.0, int_range=mode)
    qt = quant.quantize_tensor(w, rule)
    assert qt.scheme == f"int{bits}_per_row"
    q, scale = qt.arrays["q"], qt.arrays["scale"]
    assert q.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == (w.shape[0],)
    qmin, qmax = quant.int_range(bits, mode)
    assert q.min() >= qmin and q.max() <= qmax
    restored = quant.dequantize_tensor(qt)
    s = scale.astype(np.float32)[:, None]
    # values inside the grid [qmin - 1/2, qmax + 1/2] * scale are off by at most scale / 2
    inside = (w >= s * (qmin - 0.5)) & (w <= s * (qmax + 0.5))
    err = np.abs(restored - w)
    assert np.all(err[inside] <= np.broadcast_to(s, w.shape)[inside] * 0.5 * (1 + 1e-5))
    # clipped values land on the end codes
    out = ~inside
    assert np.allclose(np.abs(restored[out]), (s * np.where(w < 0, -qmin, qmax))[out], rtol=1e-6)
    if clip == "rowmax":
        assert not out.any()
    if clip == "sdclip":
        assert out.any()  # k=3 clips a t(3) tail


def test_error_shrinks_with_bits() -> None:
    w = heavy_tailed()
    errs = [quant.matrix_mse(w, quant.dequantize_tensor(quant.quantize_tensor(w, QuantRule(bits=b))))
            for b in quant.INT_BITS]
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_percentile_clip_is_the_row_quantile() -> None:
    w = heavy_tailed()
    assert np.array_equal(quant.percentile_clip(w, 1.0), np.abs(w).max(axis=1))
    assert np.allclose(quant.percentile_clip(w, 0.99), np.quantile(np.abs(w), 0.99, axis=1), rtol=1e-6)


def test_clip_search_picks_the_min_mse_percentile() -> None:
    w = heavy_tailed(rows=64, cols=512, seed=3)
    candidates = (0.9, 0.99, 0.999, 1.0)
    best, scale, mses = quant.search_clip(w, 4, "symmetric", candidates)
    # recompute each candidate's whole-matrix MSE independently
    want = []
    for p in candidates:
        s = (np.quantile(np.abs(w), p, axis=1) / 7.0).astype(np.float16).astype(np.float32)
        q = np.clip(np.rint(w / s[:, None]), -7, 7)
        want.append(float(np.mean((w.astype(np.float64) - q * s[:, None]) ** 2)))
    assert np.allclose(mses, want, rtol=1e-5)
    assert best == candidates[int(np.argmin(want))]
    assert best < 1.0  # heavy tails: clipping below the max wins at 4 bits
    # quantize_tensor with clip="search" stores exactly the winner
    qt = quant.quantize_tensor(w, QuantRule(bits=4, clip="search", percentiles=candidates))
    assert np.array_equal(qt.arrays["scale"], scale)
    assert quant.matrix_mse(w, quant.dequantize_tensor(qt)) == pytest.approx(min(want), rel=1e-5)


def test_sdclip_scale_formula() -> None:
    w = heavy_tailed()
    for bits, k in ((6, 12.85), (7, 14.0), (5, 11.5)):
        want = (k * w.astype(np.float64).std(axis=1, ddof=1) / (2 ** (bits - 1) - 1)).astype(np.float32)
        assert np.allclose(quant.sdclip_scale(w, k, bits), want, rtol=1e-6)
        qt = quant.quantize_tensor(w, QuantRule(bits=bits, clip="sdclip", sdclip_k=k))
        assert np.array_equal(qt.arrays["scale"], want.astype(np.float16))


def test_zero_rows_get_a_positive_scale_and_restore_exactly() -> None:
    w = np.zeros((4, 300), np.float32)
    for clip in ("rowmax", "sdclip", "search"):
        qt = quant.quantize_tensor(w, QuantRule(bits=6, clip=clip))
        assert np.all(qt.arrays["scale"] > 0)
        assert np.array_equal(quant.dequantize_tensor(qt), w)


@pytest.mark.parametrize("bits", quant.INT_BITS)
def test_bit_packing_round_trips(bits: int) -> None:
    rng = np.random.default_rng(bits)
    lo, hi = quant.int_range(bits, "full")
    for count in (1, 7, 1001):
        q = rng.integers(lo, hi + 1, size=count).astype(np.int8)
        q[0] = lo
        packed = quant.pack_codes(q, bits)
        assert packed.dtype == np.uint8 and packed.size == -(-count * bits // 8)
        assert np.array_equal(quant.unpack_codes(packed, bits, count), q)
    with pytest.raises(ValueError, match="expected"):
        quant.unpack_codes(packed[:-1], bits, count)
    if bits < 8:
        with pytest.raises(ValueError, match="outside"):
            quant.pack_codes(np.array([hi + 1], np.int8), bits)


def test_packed_scheme_dequantizes_like_the_unpacked_one() -> None:
    w = heavy_tailed(rows=10, cols=33)
    for bits in (4, 5, 6, 7):
        plain = quant.quantize_tensor(w, QuantRule(bits=bits))
        packed = quant.quantize_tensor(w, QuantRule(bits=bits), pack=True)
        assert packed.scheme == f"int{bits}_packed_per_row"
        assert packed.arrays["packed"].nbytes == -(-w.size * bits // 8)
        assert np.array_equal(quant.dequantize_tensor(packed), quant.dequantize_tensor(plain))


def test_dtype_and_shape_restored() -> None:
    w = heavy_tailed(rows=8, cols=40).astype(ml_dtypes.bfloat16)
    out = quant.dequantize_tensor(quant.quantize_tensor(w, QuantRule(bits=6)))
    assert out.dtype == w.dtype and out.shape == w.shape
    v = heavy_tailed(rows=1, cols=90).reshape(90)
    out = quant.dequantize_tensor(quant.quantize_tensor(v, QuantRule(bits=8)))
    assert out.shape == (90,) and np.abs(out - v).max() <= np.abs(v).max() / 127 / 2 * 1.01


def test_malformed_int_k_arrays_are_refused() -> None:
    qt = quant.quantize_tensor(heavy_tailed(rows=4, cols=10), QuantRule(bits=6))
    bad = dataclasses.replace(qt, arrays={"q": qt.arrays["q"], "scale": qt.arrays["scale"][:3]})
    with pytest.raises(ValueError, match="scale"):
        quant.dequantize_tensor(bad)
    bad = dataclasses.replace(qt, arrays={"q": qt.arrays["q"][:2], "scale": qt.arrays["scale"]})
    with pytest.raises(ValueError, match="codes"):
        quant.dequantize_tensor(bad)


def test_rule_validation() -> None:
    with pytest.raises(ValueError, match="bits"):
        QuantRule(bits=9)
    with pytest.raises(ValueError, match="clip method"):
        QuantRule(clip="magic")
    with pytest.raises(ValueError, match="SDClip"):
        QuantRule(sdclip_k=0.0)


def small_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    f = lambda *shape: (rng.standard_normal(shape) * 0.02).astype(np.float32)  # noqa: E731
    return {
        "tok_emb.weight": f(256, 300),
        "blocks.0.attn.c_q.weight": f(300, 300),
        "blocks.0.mlp.fc.weight": f(600, 300),
        "blocks.0.attn_gate.weight": f(8, 12),
        "blocks.0.attn_scale": f(300),
        "blocks.0.resid_mix": f(2, 300),
        "bigram.weight": f(300, 240),
        "small.weight": f(16, 16),
        "count": np.arange(5, dtype=np.int64),
    }


def test_quantize_state_routes_by_rule() -> None:
    state = small_state()
    plan = QuantPlan(attn=QuantRule(bits=6), mlp=QuantRule(bits=5), embed=QuantRule(bits=7),
                     other=QuantRule(bits=8, clip="sdclip"))
    state_q, stats = quant.quantize_state(state, plan)
    assert state_q.format == quant.QUANT_FORMAT
    assert {n: qt.scheme for n, qt in state_q.tensors.items()} == {
        "tok_emb.weight": "int7_per_row",
        "blocks.0.attn.c_q.weight": "int6_per_row",
        "blocks.0.mlp.fc.weight": "int5_per_row",
        "blocks.0.attn_gate.weight": "int8_per_row",
        "blocks.0.attn_scale": "passthrough_fp32",
        "blocks.0.resid_mix": "passthrough_fp32",
        "bigram.weight": "int8_per_row",
        "small.weight": "passthrough_fp16",
        "count": "passthrough",
    }
    gate = state_q.tensors["blocks.0.attn_gate.weight"]
    want = (np.abs(state["blocks.0.attn_gate.weight"]).max(axis=1) / 127).astype(np.float16)
    assert np.array_equal(gate.arrays["scale"], want)
    assert stats["num_tensors"] == len(state) and stats["param_count"] == sum(v.size for v in state.values())
    restored = quant.dequantize_state(state_q)
    for name, value in state.items():
        assert restored[name].shape == value.shape and restored[name].dtype == value.dtype
    q_codes = state_q.tensors["blocks.0.mlp.fc.weight"].arrays["q"]
    assert q_codes.min() >= -15 and q_codes.max() <= 15
    # the passthrough threshold is a rule too
    plan_big = dataclasses.replace(plan, passthrough_max_numel=100_000)
    assert quant.quantize_state(state, plan_big)[0].tensors["blocks.0.attn.c_q.weight"].scheme == "passthrough_fp16"


def test_plan_from_config_reads_the_quant_fields() -> None:
    cfg = Config().export
    plan = quant.plan_from_config(cfg)
    assert (plan.attn.bits, plan.mlp.bits, plan.embed.bits) == (6, 6, 7)
    assert (plan.attn.sdclip_k, plan.mlp.sdclip_k, plan.embed.sdclip_k) == (13.0, 11.5, 14.0)
    assert plan.lqer_rank == 0 and not plan.attn.gptq
    plan = quant.plan_from_config(cfg, quant_mlp_bits=5, quant_gptq=True, quant_gptq_embed=False,
                                  quant_clip="search", quant_clip_percentiles="0.99, 1.0", quant_int_range="full")
    assert plan.mlp.bits == 5 and plan.mlp.gptq and plan.attn.gptq and not plan.embed.gptq
    assert plan.attn.percentiles == (0.99, 1.0) and plan.attn.int_range == "full"
    with pytest.raises(ValueError, match="clip method"):
        quant.plan_from_config(cfg, quant_clip="nope")
    with pytest.raises(ValueError, match="percentiles"):
        quant.plan_from_config(cfg, quant_clip_percentiles="a,b")


def test_new_schemes_survive_the_artifact(tmp_path) -> None:
    state = small_state()
    plan = QuantPlan(mlp=QuantRule(bits=5), lqer_rank=2, lqer_top_k=2)
    state_q, _ = quant.quantize_state(state, plan)
    packed_q, _ = quant.quantize_state(state, dataclasses.replace(plan, pack_bits=True))
    for sq in (state_q, packed_q):
        path = tmp_path / "a.golf"
        artifact.write_artifact(path, sq, {}, codec="zlib", scheme="test")
        _, back, _ = artifact.read_artifact(path)
        assert back.format == quant.QUANT_FORMAT
        want, got = quant.dequantize_state(sq), quant.dequantize_state(back)
        assert all(np.array_equal(want[n], got[n]) for n in want)
    assert quant.lqer_corrected(state_q) and quant.lqer_corrected(packed_q)


def test_every_int_k_scheme_is_registered() -> None:
    for bits in quant.INT_BITS:
        for packed in (False, True):
            for kind in ("", "asym", "sym"):
                name = quant.intk_scheme(bits, packed, kind)
                assert name in quant.SCHEME_ARRAYS and name in quant._DEQUANTIZERS
    assert quant.REFERENCE_SCHEMES < set(quant.SCHEME_ARRAYS)


def test_rules_are_hashable_values() -> None:
    rule = QuantRule(bits=5, clip="search", percentiles=[0.99, 1])
    assert rule.percentiles == (0.99, 1.0)
    assert hash(rule) == hash(QuantRule(bits=5, clip="search", percentiles=(0.99, 1.0)))
    assert hash(QuantPlan(mlp=rule)) == hash(QuantPlan(mlp=rule))
