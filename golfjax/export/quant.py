"""Post-training quantization of a flat state dict (reference names and layouts).

The exporter runs on the host in NumPy. Its input is the reference-layout dict
produced by ``golfjax.interop`` and its output is a :class:`QuantizedState`: per
tensor, a *scheme* name, the stored arrays and the dtype to restore. A scheme
name says how the arrays were produced and how to dequantize them, so new
schemes (int-k, GPTQ, ...) are new names with a new quantizer and a new entry
in :data:`SCHEME_ARRAYS` / ``_DEQUANTIZERS``; the container and the rest of the
pipeline do not change.

``quantize_state_int8`` is the reference exporter (``quantize_state_dict_int8``
of openai/parameter-golf ``train_gpt.py``) reproduced bit for bit, including
``torch.quantile``'s float32 interpolation (see :func:`torch_quantile_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from golfjax.model.naming import is_control_tensor

INT8_FORMAT = "int8_clean_per_row_v1"

KEEP_FLOAT_MAX_NUMEL = 65_536
INT8_CLIP_Q = 99.99984 / 100.0

# Stored array roles per scheme; the artifact reader checks a tensor against this.
SCHEME_ARRAYS: dict[str, tuple[str, ...]] = {
    "int8_per_row": ("q", "scale"),  # q int8 (rows, ...), scale float16 (rows,)
    "int8_per_tensor": ("q", "scale"),  # q int8, scale float32 ()
    "passthrough_fp16": ("data",),  # small float tensor stored as float16
    "passthrough_fp32": ("data",),  # small control tensor stored as float32
    "passthrough": ("data",),  # stored exactly as given
}


@dataclass(frozen=True)
class QuantizedTensor:
    """One exported tensor: how it is stored, and what dequantizing gives back."""

    scheme: str
    dtype: str  # dtype name restored by dequantize (the tensor's original dtype)
    shape: tuple[int, ...]
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True)
class QuantizedState:
    """An exported state dict; ``tensors`` keeps the input order."""

    tensors: dict[str, QuantizedTensor]
    format: str = INT8_FORMAT


def resolve_dtype(name: str) -> np.dtype:
    """Dtype from its name; ``bfloat16`` comes from ml_dtypes (shipped with JAX)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def is_float_dtype(dtype: np.dtype) -> bool:
    """True for float16/32/64 and bfloat16 (what torch calls floating point)."""
    return dtype.kind == "f" or dtype.name == "bfloat16"


def torch_quantile_rows(a: np.ndarray, q: float) -> np.ndarray:
    """``torch.quantile(a, q, dim=-1)`` for float32 ``a``, bit-identical.

    torch computes the rank as float32(q) * (n - 1) in float32 and lerps as
    ``lo + w*(hi-lo)`` for w < 0.5, else ``hi - (hi-lo)*(1-w)``, all in float32.
    np.quantile computes the rank in float64, which moves the clip enough to
    change ~1% of the int8 values on a heavy-tailed tensor.
    """
    a = np.asarray(a, dtype=np.float32)
    rank = np.float32(q) * np.float32(a.shape[-1] - 1)
    lo, hi = int(np.floor(rank)), int(np.ceil(rank))
    weight = rank - np.float32(lo)
    part = np.partition(a, sorted({lo, hi}), axis=-1)
    below, above = part[..., lo], part[..., hi]
    diff = above - below
    if weight < 0.5:
        return below + weight * diff
    return above - diff * (np.float32(1.0) - weight)


def quantize_int8_per_row(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row int8 of a 2-D tensor: one float16 scale per output row."""
    w32 = np.asarray(w, dtype=np.float32)
    clip = torch_quantile_rows(np.abs(w32), INT8_CLIP_Q)
    clipped = np.minimum(np.maximum(w32, -clip[:, None]), clip[:, None])
    scale = np.maximum(clip / np.float32(127.0), np.float32(1.0 / 127.0))
    q = np.clip(np.rint(clipped / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float16)


def quantize_int8_per_tensor(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor int8: one float32 scale (1.0 when the clip is 0)."""
    w32 = np.asarray(w, dtype=np.float32)
    clip = torch_quantile_rows(np.abs(w32).reshape(-1), INT8_CLIP_Q)
    # The reference divides the clip as a Python float (float64), then stores float32.
    scale = np.float32(float(clip) / 127.0) if clip > 0 else np.float32(1.0)
    clipped = np.clip(w32, -clip, clip)
    q = np.clip(np.rint(clipped / scale), -127, 127).astype(np.int8)
    return q, np.asarray(scale, dtype=np.float32)


def quantize_tensor_int8(name: str, t: np.ndarray) -> QuantizedTensor:
    """The reference's routing of one tensor to a scheme."""
    dtype, shape = t.dtype.name, tuple(t.shape)

    def make(scheme: str, **arrays: np.ndarray) -> QuantizedTensor:
        return QuantizedTensor(scheme, dtype, shape, arrays)

    if not is_float_dtype(t.dtype):
        return make("passthrough", data=t.copy())
    if t.size <= KEEP_FLOAT_MAX_NUMEL:
        if is_control_tensor(name):
            return make("passthrough_fp32", data=t.astype(np.float32))
        if dtype in ("float32", "bfloat16"):
            return make("passthrough_fp16", data=t.astype(np.float16))
        return make("passthrough", data=t.copy())
    if t.ndim == 2:
        q, scale = quantize_int8_per_row(t)
        return make("int8_per_row", q=q, scale=scale)
    q, scale = quantize_int8_per_tensor(t)
    return make("int8_per_tensor", q=q, scale=scale)


def quant_stats(state_q: QuantizedState) -> dict[str, int]:
    """The reference's export statistics, derived from the exported state alone."""
    stats = dict.fromkeys(
        (
            "param_count",
            "num_tensors",
            "num_float_tensors",
            "num_nonfloat_tensors",
            "baseline_tensor_bytes",
            "int8_payload_bytes",
        ),
        0,
    )
    for qt in state_q.tensors.values():
        dtype = resolve_dtype(qt.dtype)
        numel = int(np.prod(qt.shape, dtype=np.int64))
        stats["param_count"] += numel
        stats["num_tensors"] += 1
        stats["baseline_tensor_bytes"] += numel * dtype.itemsize
        stats["int8_payload_bytes"] += sum(int(a.nbytes) for a in qt.arrays.values())
        if not qt.scheme.startswith("passthrough"):
            stats["num_float_tensors"] += 1
        elif not is_float_dtype(dtype):
            stats["num_nonfloat_tensors"] += 1
    return stats


def quantize_state_int8(state: Mapping[str, np.ndarray]) -> tuple[QuantizedState, dict[str, int]]:
    """Export a state dict with the reference int8 scheme; returns (state, stats)."""
    tensors = {name: quantize_tensor_int8(name, np.asarray(t)) for name, t in state.items()}
    state_q = QuantizedState(tensors, INT8_FORMAT)
    return state_q, quant_stats(state_q)


def _dequantize_per_row(qt: QuantizedTensor) -> np.ndarray:
    q, scale = qt.arrays["q"], qt.arrays["scale"]
    rows = scale.astype(np.float32).reshape(q.shape[0], *([1] * (q.ndim - 1)))
    return q.astype(np.float32) * rows


def _dequantize_per_tensor(qt: QuantizedTensor) -> np.ndarray:
    return qt.arrays["q"].astype(np.float32) * np.float32(qt.arrays["scale"])


def _stored(qt: QuantizedTensor) -> np.ndarray:
    return qt.arrays["data"]


_DEQUANTIZERS: dict[str, Callable[[QuantizedTensor], np.ndarray]] = {
    "int8_per_row": _dequantize_per_row,
    "int8_per_tensor": _dequantize_per_tensor,
    "passthrough_fp16": _stored,
    "passthrough_fp32": _stored,
    "passthrough": _stored,
}

def dequantize_tensor(qt: QuantizedTensor) -> np.ndarray:
    """Rebuild one tensor in its original dtype and shape."""
    try:
        dequantize = _DEQUANTIZERS[qt.scheme]
    except KeyError:
        raise ValueError(f"unknown quantization scheme {qt.scheme!r}") from None
    out = dequantize(qt).astype(resolve_dtype(qt.dtype))
    return out.reshape(qt.shape)


def dequantize_state(state_q: QuantizedState) -> dict[str, np.ndarray]:
    """Rebuild the flat state dict (reference names) from an exported state."""
    return {name: dequantize_tensor(qt) for name, qt in state_q.tensors.items()}
