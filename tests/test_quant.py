"""The int8 exporter against the reference's golden outputs (bit-identical)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from golfjax.export import quant
from golfjax.export.quant import (
    INT8_CLIP_Q,
    QuantizedState,
    QuantizedTensor,
    dequantize_state,
    dequantize_tensor,
    quantize_int8_per_tensor,
    quantize_state_int8,
    torch_quantile_rows,
)

SHARED = Path(os.environ.get("GOLFJAX_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
GOLDEN = SHARED / "golden"


@pytest.fixture(scope="module")
def golden() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden data not found at {GOLDEN}")
    return GOLDEN


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def reference_layout(state_q: QuantizedState) -> dict[str, np.ndarray]:
    """Our export in the reference's key layout (quantized/, scales/, passthrough/)."""
    out = {}
    for name, qt in state_q.tensors.items():
        if qt.scheme.startswith("passthrough"):
            out[f"passthrough/{name}"] = qt.arrays["data"]
        else:
            out[f"quantized/{name}"] = qt.arrays["q"]
            out[f"scales/{name}"] = qt.arrays["scale"]
    return out


def assert_identical(ours: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(ours) == sorted(expected)
    for key, want in expected.items():
        got = ours[key]
        assert got.dtype == want.dtype, key
        assert got.shape == want.shape, key
        assert np.array_equal(got, want), f"{key}: {np.sum(got != want)} values differ"


@pytest.mark.parametrize("sub", ["", "trained"])
def test_golden_final_state_export_identical(golden: Path, sub: str) -> None:
    state = load_npz(golden / sub / "final_state.npz")
    state_q, stats = quantize_state_int8(state)
    assert_identical(reference_layout(state_q), load_npz(golden / sub / "quant_int8.npz"))
    meta = json.loads((golden / sub / "golden.json").read_text())["quant"]
    assert stats == meta["stats"]
    for name, orig in meta["meta"]["passthrough_orig_dtypes"].items():
        assert state_q.tensors[name].dtype == orig


def probe(golden: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    z = load_npz(golden / "quant_probe.npz")
    inputs = {k.removeprefix("input/"): v for k, v in z.items() if k.startswith("input/")}
    expected = {k: v for k, v in z.items() if not k.startswith("input/")}
    meta = json.loads((golden / "golden.json").read_text())["quant_probe"]
    return inputs, expected, meta


def test_probe_reaches_every_branch_identically(golden: Path) -> None:
    inputs, expected, meta = probe(golden)
    state_q, stats = quantize_state_int8(inputs)
    assert_identical(reference_layout(state_q), expected)
    assert {k: v.dtype.name for k, v in expected.items()} == meta["tensor_dtypes"]
    assert stats == meta["stats"]
    assert {n: qt.scheme for n, qt in state_q.tensors.items()} == {
        "probe.matrix": "int8_per_row",
        "probe.vector": "int8_per_tensor",
        "probe.small": "passthrough_fp16",
        "probe.attn_scale": "passthrough_fp32",
        "probe.int": "passthrough",
    }


def test_probe_dequantized_sums_and_dtypes(golden: Path) -> None:
    inputs, _, meta = probe(golden)
    restored = dequantize_state(quantize_state_int8(inputs)[0])
    assert {k: v.dtype.name for k, v in restored.items()} == meta["dequantized_dtypes"]
    assert {k: float(v.astype(np.float64).sum()) for k, v in restored.items()} == meta["dequantized_sum"]
    assert all(restored[k].shape == v.shape for k, v in inputs.items())


def test_np_quantile_would_not_match(golden: Path) -> None:
    """The float32 rank of torch.quantile matters: np.quantile's clip changes ~1% of values."""
    inputs, expected, _ = probe(golden)
    vector = inputs["probe.vector"]
    ours = torch_quantile_rows(np.abs(vector), INT8_CLIP_Q)
    numpy_clip = np.float32(np.quantile(np.abs(vector), INT8_CLIP_Q))
    assert ours != numpy_clip
    scale = np.float32(float(numpy_clip) / 127.0)
    q_numpy = np.clip(np.rint(np.clip(vector, -numpy_clip, numpy_clip) / scale), -127, 127).astype(np.int8)
    mismatch = np.mean(q_numpy != expected["quantized/probe.vector"])
    assert mismatch > 0.005
    assert np.array_equal(quantize_int8_per_tensor(vector)[0], expected["quantized/probe.vector"])


def test_quantile_matches_numpy_where_rank_is_exact() -> None:
    a = np.random.default_rng(0).random((5, 11), dtype=np.float32)
    for q in (0.0, 0.5, 1.0):
        assert np.allclose(torch_quantile_rows(a, q), np.quantile(a, q, axis=-1), rtol=0, atol=1e-7)


def test_routing_and_dtype_restoration() -> None:
    rng = np.random.default_rng(1)
    state = {
        "big3d": rng.standard_normal((2, 200, 200)).astype(np.float32),  # > 65,536, not 2-D
        "bf16.weight": rng.standard_normal((8, 8)).astype(ml_dtypes.bfloat16),
        "blocks.0.attn_scale": rng.standard_normal(8).astype(ml_dtypes.bfloat16),
        "small64": rng.standard_normal(4),  # float64 small: kept as-is
        "mask": np.array([True, False]),
        "zeros": np.zeros((300, 300), np.float32),
    }
    state_q, stats = quantize_state_int8(state)
    schemes = {n: qt.scheme for n, qt in state_q.tensors.items()}
    assert schemes == {
        "big3d": "int8_per_tensor",
        "bf16.weight": "passthrough_fp16",
        "blocks.0.attn_scale": "passthrough_fp32",
        "small64": "passthrough",
        "mask": "passthrough",
        "zeros": "int8_per_row",
    }
    assert stats["num_float_tensors"] == 2 and stats["num_nonfloat_tensors"] == 1
    assert stats["baseline_tensor_bytes"] == sum(v.nbytes for v in state.values())
    restored = dequantize_state(state_q)
    for name, value in state.items():
        assert restored[name].dtype == value.dtype and restored[name].shape == value.shape, name
    assert np.array_equal(restored["small64"], state["small64"])
    assert np.array_equal(restored["mask"], state["mask"])
    assert np.array_equal(restored["blocks.0.attn_scale"], state["blocks.0.attn_scale"])
    assert np.array_equal(restored["zeros"], state["zeros"])
    assert state_q.tensors["zeros"].arrays["scale"].dtype == np.float16
    big, scale = state["big3d"], float(state_q.tensors["big3d"].arrays["scale"])
    inside = np.abs(big) <= torch_quantile_rows(np.abs(big).reshape(-1), INT8_CLIP_Q)
    assert np.abs(restored["big3d"] - big)[inside].max() <= scale * 0.5001


def test_per_tensor_zero_clip_uses_unit_scale() -> None:
    q, scale = quantize_int8_per_tensor(np.zeros(70_000, np.float32))
    assert scale.dtype == np.float32 and scale.shape == () and float(scale) == 1.0
    assert not q.any()


def test_every_scheme_has_a_dequantizer_and_unknown_schemes_fail() -> None:
    assert set(quant._DEQUANTIZERS) == set(quant.SCHEME_ARRAYS)
    bogus = QuantizedTensor("int3_magic", "float32", (2,), {"q": np.zeros(2, np.int8)})
    with pytest.raises(ValueError, match="int3_magic"):
        dequantize_tensor(bogus)
