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

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from golfjax.export import gptq, lqer
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


# ----------------------------------------------------------------------------
# The record stack's quantizers: int-k per row (k = 4..8) with a clip rule
# (row max, a percentile, the GPTQ-lite percentile search, SDClip), optional
# full-Hessian GPTQ (golfjax.export.gptq) and LQER (golfjax.export.lqer),
# int8 gate rows, and per-tensor rules. The reference path above is untouched.

QUANT_FORMAT = "golfjax_quant_v1"
INT_BITS: tuple[int, ...] = (4, 5, 6, 7, 8)
CLIP_METHODS: tuple[str, ...] = ("rowmax", "percentile", "search", "sdclip")
INT_RANGES: tuple[str, ...] = ("symmetric", "full")
DEFAULT_PERCENTILES: tuple[float, ...] = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
MIN_SCALE = float(np.finfo(np.float16).smallest_subnormal)
ROLES: tuple[str, ...] = ("attn", "mlp", "embed", "other")


@dataclass(frozen=True)
class QuantRule:
    """How one tensor is quantized: int-``bits`` per row, one float16 scale per row."""

    bits: int = 8
    clip: str = "rowmax"  # rowmax | percentile | search | sdclip
    clip_q: float = 1.0  # the |w| quantile per row for clip="percentile"
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES  # candidates for clip="search"
    sdclip_k: float = 12.85  # clip="sdclip": scale = k * std(row) / (2^(bits-1) - 1)
    int_range: str = "symmetric"  # symmetric [-(2^(b-1)-1), 2^(b-1)-1] | full [-2^(b-1), 2^(b-1)-1]
    gptq: bool = False  # full-Hessian GPTQ (needs this tensor's input Hessian)
    lqer: bool = True  # may receive an LQER correction (when the plan's lqer_rank > 0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))  # hashable
        if self.bits not in INT_BITS:
            raise ValueError(f"quantization bits must be one of {INT_BITS}, got {self.bits}")
        if self.clip not in CLIP_METHODS:
            raise ValueError(f"unknown clip method {self.clip!r}; known: {', '.join(CLIP_METHODS)}")
        if self.int_range not in INT_RANGES:
            raise ValueError(f"unknown integer range {self.int_range!r}; known: {', '.join(INT_RANGES)}")
        if not 0.0 < self.clip_q <= 1.0:
            raise ValueError(f"clip percentile must be in (0, 1], got {self.clip_q}")
        if not self.percentiles or not all(0.0 < p <= 1.0 for p in self.percentiles):
            raise ValueError(f"clip search percentiles must be a non-empty list in (0, 1], got {self.percentiles}")
        if not self.sdclip_k > 0:
            raise ValueError(f"SDClip k must be > 0, got {self.sdclip_k}")


@dataclass(frozen=True)
class QuantPlan:
    """A whole-state recipe: a rule per tensor role, gates, passthrough, GPTQ and LQER settings."""

    attn: QuantRule = QuantRule(bits=6)
    mlp: QuantRule = QuantRule(bits=6)
    embed: QuantRule = QuantRule(bits=8)
    other: QuantRule = QuantRule(bits=8)
    gate_patterns: tuple[str, ...] = ("attn_gate",)  # small 2-D float tensors stored int8 per row (rowmax/127)
    passthrough_max_numel: int = KEEP_FLOAT_MAX_NUMEL
    gptq_damp: float = 0.01
    gptq_block: int = 128
    gptq_act_order: bool = True
    lqer_rank: int = 0  # 0 = off
    lqer_top_k: int = 3
    lqer_asym: bool = True
    lqer_group: int = 64
    pack_bits: bool = False  # bit-pack the codes (uint8 stream) instead of one int8 per code

    def rule(self, role: str) -> QuantRule:
        return getattr(self, role)


def int_range(bits: int, mode: str = "symmetric") -> tuple[int, int]:
    """(qmin, qmax) of int-``bits`` codes: symmetric drops the lowest code, full keeps it."""
    if bits not in INT_BITS:
        raise ValueError(f"quantization bits must be one of {INT_BITS}, got {bits}")
    if mode not in INT_RANGES:
        raise ValueError(f"unknown integer range {mode!r}; known: {', '.join(INT_RANGES)}")
    top = 2 ** (bits - 1) - 1
    return (-top if mode == "symmetric" else -top - 1), top


def clip_range(bits: int) -> int:
    """The divisor of a clip value: a row's clip maps to code 2^(b-1) - 1 (31 for int6)."""
    return 2 ** (bits - 1) - 1


def as_matrix(w: np.ndarray) -> np.ndarray:
    """float32 (rows, cols) view: a vector is one row, higher ranks keep axis 0 as rows."""
    w32 = np.asarray(w, dtype=np.float32)
    return w32.reshape(1, -1) if w32.ndim <= 1 else w32.reshape(w32.shape[0], -1)


def stored_scale(scale: np.ndarray) -> np.ndarray:
    """Per-row scales as stored: float16, floored at the smallest positive float16."""
    s = np.nan_to_num(np.asarray(scale, np.float32), nan=0.0, posinf=65504.0)
    return np.clip(s, np.float32(MIN_SCALE), np.float32(65504.0)).astype(np.float16)


def rowmax_clip(w: np.ndarray) -> np.ndarray:
    return np.abs(as_matrix(w)).max(axis=1)


def percentile_clip(w: np.ndarray, q: float) -> np.ndarray:
    """Per-row ``q``-quantile of |w| (linear interpolation); q = 1 is the row max."""
    a = np.abs(as_matrix(w))
    return a.max(axis=1) if q >= 1.0 else np.quantile(a, q, axis=1).astype(np.float32)


def sdclip_scale(w: np.ndarray, k: float, bits: int) -> np.ndarray:
    """SDClip: ``k * std(row) / (2^(bits-1) - 1)`` (float32, before float16 storage).

    std is torch's default (Bessel-corrected, ddof=1), the population std for a 1-column matrix.
    """
    m = as_matrix(w).astype(np.float64)
    std = m.std(axis=1, ddof=1 if m.shape[1] > 1 else 0)
    return (k * std / clip_range(bits)).astype(np.float32)


def quantize_rows(w: np.ndarray, scale16: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Round-to-nearest int8 codes of ``w / scale`` clamped to [qmin, qmax] (the clip)."""
    s = np.asarray(scale16).astype(np.float32)[:, None]
    return np.clip(np.rint(as_matrix(w) / s), qmin, qmax).astype(np.int8)


def dequantize_rows(q: np.ndarray, scale16: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * np.asarray(scale16).astype(np.float32)[:, None]


def matrix_mse(w: np.ndarray, w_hat: np.ndarray) -> float:
    return float(np.mean((as_matrix(w).astype(np.float64) - as_matrix(w_hat)) ** 2))


def search_clip(w: np.ndarray, bits: int, mode: str = "symmetric",
                percentiles: tuple[float, ...] = DEFAULT_PERCENTILES) -> tuple[float, np.ndarray, list[float]]:
    """GPTQ-lite: (best percentile, its float16 scales, MSE per candidate).

    One percentile for the whole matrix (the lowest whole-matrix reconstruction
    MSE; the earliest candidate wins a tie), per-row clip values at that percentile.
    """
    qmin, qmax = int_range(bits, mode)
    mses, scales = [], []
    for p in percentiles:
        s = stored_scale(percentile_clip(w, p) / np.float32(clip_range(bits)))
        mses.append(matrix_mse(w, dequantize_rows(quantize_rows(w, s, qmin, qmax), s)))
        scales.append(s)
    best = int(np.argmin(mses))
    return float(percentiles[best]), scales[best], mses


def rule_scales(w: np.ndarray, rule: QuantRule) -> np.ndarray:
    """float16 per-row scales from the rule's clip method ("search" is resolved by the caller)."""
    if rule.clip == "sdclip":
        return stored_scale(sdclip_scale(w, rule.sdclip_k, rule.bits))
    clip = rowmax_clip(w) if rule.clip == "rowmax" else percentile_clip(w, rule.clip_q)
    return stored_scale(clip / np.float32(clip_range(rule.bits)))


def quantize_codes(w: np.ndarray, rule: QuantRule, hessian: np.ndarray | None = None, *,
                   damp: float = 0.01, block: int = 128, act_order: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes (rows, cols), float16 scales (rows,)) of ``w`` under ``rule``.

    With ``rule.gptq`` the codes come from full-Hessian GPTQ on ``hessian``;
    with clip="search" every candidate percentile is tried (with GPTQ too, as
    R0325 does) and the lowest weight MSE wins.
    """
    m = as_matrix(w)
    qmin, qmax = int_range(rule.bits, rule.int_range)
    if rule.gptq and hessian is None:
        raise ValueError("GPTQ rule needs the tensor's input Hessian (none was given)")

    def codes(s: np.ndarray) -> np.ndarray:
        if not rule.gptq:
            return quantize_rows(m, s, qmin, qmax)
        return gptq.gptq_quantize(m, np.asarray(hessian), s.astype(np.float32), qmin, qmax,
                                  damp=damp, block=block, act_order=act_order)

    if rule.clip != "search":
        s = rule_scales(m, rule)
        return codes(s), s
    best = None
    for p in rule.percentiles:
        s = stored_scale(percentile_clip(m, p) / np.float32(clip_range(rule.bits)))
        q = codes(s)
        err = matrix_mse(m, dequantize_rows(q, s))
        if best is None or err < best[0]:
            best = (err, q, s)
    return best[1], best[2]


# ---- bit packing of int-k codes ---------------------------------------------


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Little-endian bit stream (uint8) of ``q + 2^(bits-1)``, ``bits`` bits per code."""
    if bits not in INT_BITS:
        raise ValueError(f"quantization bits must be one of {INT_BITS}, got {bits}")
    off = 2 ** (bits - 1)
    u = np.asarray(q, np.int16).reshape(-1) + off
    if u.size and (u.min() < 0 or u.max() >= 2 * off):
        raise ValueError(f"codes outside the int{bits} range [{-off}, {off - 1}]")
    bitplanes = (u[:, None].astype(np.uint16) >> np.arange(bits, dtype=np.uint16)) & 1
    return np.packbits(bitplanes.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` int8 codes."""
    if bits not in INT_BITS:
        raise ValueError(f"quantization bits must be one of {INT_BITS}, got {bits}")
    need = -(-count * bits // 8)
    if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != need:
        raise ValueError(f"packed int{bits} stream has {packed.size} bytes ({packed.dtype}), expected {need} uint8")
    flat = np.unpackbits(packed, bitorder="little")[: count * bits].reshape(count, bits)
    u = flat.astype(np.int16) @ (np.int16(1) << np.arange(bits, dtype=np.int16))
    return (u - 2 ** (bits - 1)).astype(np.int8)


# ---- schemes -------------------------------------------------------------------


def intk_scheme(bits: int, packed: bool = False, lqer: str = "") -> str:
    """Scheme name, e.g. ``int6_per_row``, ``int5_packed_per_row_lqer_asym``."""
    return f"int{bits}_{'packed_' if packed else ''}per_row" + (f"_lqer_{lqer}" if lqer else "")


def _parse_intk(scheme: str) -> tuple[int, bool, str]:
    """(bits, packed, lqer kind) of an int-k scheme name."""
    base, _, lqer = scheme.partition("_lqer_")
    bits = int(base[3])
    return bits, "_packed_" in base, lqer


def _matrix_shape(qt: QuantizedTensor) -> tuple[int, int]:
    shape = qt.shape
    if len(shape) <= 1:
        return 1, int(np.prod(shape, dtype=np.int64))
    return int(shape[0]), int(np.prod(shape[1:], dtype=np.int64))


def _dequantize_intk(qt: QuantizedTensor) -> np.ndarray:
    bits, packed, lqer_kind = _parse_intk(qt.scheme)
    rows, cols = _matrix_shape(qt)
    scale = qt.arrays["scale"]
    if scale.dtype != np.float16 or scale.shape != (rows,):
        raise ValueError(f"{qt.scheme}: scale must be float16 ({rows},), got {scale.dtype} {scale.shape}")
    if packed:
        q = unpack_codes(qt.arrays["packed"], bits, rows * cols).reshape(rows, cols)
    else:
        q = qt.arrays["q"]
        if q.dtype != np.int8 or q.size != rows * cols:
            raise ValueError(f"{qt.scheme}: codes must be int8 with {rows * cols} values, got {q.dtype} {q.shape}")
        q = q.reshape(rows, cols)
    out = dequantize_rows(q, scale)
    if lqer_kind:
        out = out + lqer.correction(qt.arrays, rows, cols, asym=lqer_kind == "asym")
    return out


# The reference exporter's schemes (quantize_state_int8 produces exactly these).
REFERENCE_SCHEMES: frozenset[str] = frozenset(SCHEME_ARRAYS)


def _register_intk_schemes() -> None:
    for bits in INT_BITS:
        for packed in (False, True):
            for lqer_kind in ("", "asym", "sym"):
                name = intk_scheme(bits, packed, lqer_kind)
                if name == "int8_per_row":
                    continue  # the reference's scheme (same arrays, same dequantization)
                arrays = ("packed" if packed else "q", "scale") + (lqer.LQER_ARRAYS if lqer_kind else ())
                SCHEME_ARRAYS[name] = arrays
                _DEQUANTIZERS[name] = _dequantize_intk


_register_intk_schemes()


def quantize_tensor(w: np.ndarray, rule: QuantRule, hessian: np.ndarray | None = None, *,
                    pack: bool = False, damp: float = 0.01, block: int = 128,
                    act_order: bool = True) -> QuantizedTensor:
    """One float tensor -> an ``int{bits}[_packed]_per_row`` QuantizedTensor (restores its dtype)."""
    w = np.asarray(w)
    q, s = quantize_codes(w, rule, hessian, damp=damp, block=block, act_order=act_order)
    arrays = {"packed": pack_codes(q, rule.bits)} if pack else {"q": q}  # q: the (rows, cols) view
    arrays["scale"] = s
    return QuantizedTensor(intk_scheme(rule.bits, pack), w.dtype.name, tuple(w.shape), arrays)


def with_lqer(qt: QuantizedTensor, w: np.ndarray, rank: int, asym: bool = True,
              group: int = 64) -> QuantizedTensor:
    """``qt`` plus an LQER correction of its error against the original ``w``."""
    bits, packed, kind = _parse_intk(qt.scheme)
    if kind:
        raise ValueError(f"{qt.scheme} already has an LQER correction")
    e = as_matrix(w) - as_matrix(dequantize_tensor(qt).astype(np.float32))
    arrays = dict(qt.arrays, **lqer.lqer_arrays(e, rank, asym, group))
    return QuantizedTensor(intk_scheme(bits, packed, "asym" if asym else "sym"), qt.dtype, qt.shape, arrays)


def tensor_role(name: str) -> str:
    """Which rule of a plan a (reference-named) large float tensor follows."""
    if name.startswith(("tok_emb.", "lm_head.")):
        return "embed"
    if ".attn." in name:
        return "attn"
    if ".mlp." in name:
        return "mlp"
    return "other"


def is_gate_tensor(name: str, t: np.ndarray, plan: QuantPlan) -> bool:
    """A 2-D tensor matching the plan's gate patterns: int8 rows, ahead of the passthrough and
    control-tensor rules (TOP routes its attention gate this way although it is a control tensor)."""
    return t.ndim == 2 and any(p in name for p in plan.gate_patterns)


def quantize_gate_int8(t: np.ndarray) -> QuantizedTensor:
    """Gate rows: int8, scale = rowmax / 127 (float16), stored as ``int8_per_row``."""
    return quantize_tensor(t, QuantRule(bits=8, clip="rowmax"))


def _passthrough(name: str, t: np.ndarray) -> QuantizedTensor:
    """The reference's routing of non-float and small tensors (float32/bf16 -> fp16, control -> fp32)."""
    dtype, shape = t.dtype.name, tuple(t.shape)
    if not is_float_dtype(t.dtype):
        return QuantizedTensor("passthrough", dtype, shape, {"data": t.copy()})
    if is_control_tensor(name):
        return QuantizedTensor("passthrough_fp32", dtype, shape, {"data": t.astype(np.float32)})
    if dtype in ("float32", "bfloat16"):
        return QuantizedTensor("passthrough_fp16", dtype, shape, {"data": t.astype(np.float16)})
    return QuantizedTensor("passthrough", dtype, shape, {"data": t.copy()})


def quantize_state(state: Mapping[str, np.ndarray], plan: QuantPlan,
                   hessians: Mapping[str, np.ndarray] | None = None) -> tuple[QuantizedState, dict[str, int]]:
    """Export a reference-named state dict under ``plan``; returns (state, stats) like the int8 path.

    ``hessians`` maps a reference name to its input Hessian (cols, cols) (for
    the tied ``tok_emb.weight``: the output-side Hessian of the final norm's
    output); every tensor whose rule has ``gptq`` needs one, except an untied
    input embedding (a lookup table), which is rounded to nearest. LQER then corrects
    the ``plan.lqer_top_k`` quantized matrices with the largest ||W - W_hat||_F,
    each only if the correction lowers that error.
    """
    hessians = hessians or {}
    tensors: dict[str, QuantizedTensor] = {}
    lqer_candidates: dict[str, float] = {}
    for name, value in state.items():
        t = np.asarray(value)
        if is_float_dtype(t.dtype) and is_gate_tensor(name, t, plan):
            tensors[name] = quantize_gate_int8(t)
            continue
        if not is_float_dtype(t.dtype) or t.size <= plan.passthrough_max_numel or is_control_tensor(name):
            tensors[name] = _passthrough(name, t)
            continue
        rule = plan.rule(tensor_role(name))
        if rule.gptq and name == "tok_emb.weight" and "lm_head.weight" in state:
            rule = dataclasses.replace(rule, gptq=False)  # untied: a lookup table, no input to calibrate on
        if rule.gptq and name not in hessians:
            raise ValueError(f"GPTQ rule for {name!r} but no calibration Hessian for it")
        try:
            qt = quantize_tensor(t, rule, hessians.get(name) if rule.gptq else None, pack=plan.pack_bits,
                                 damp=plan.gptq_damp, block=plan.gptq_block, act_order=plan.gptq_act_order)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        tensors[name] = qt
        if rule.lqer and t.ndim == 2:
            err = as_matrix(t) - as_matrix(dequantize_tensor(qt).astype(np.float32))
            lqer_candidates[name] = float(np.linalg.norm(err.astype(np.float64)))
    if plan.lqer_rank > 0 and plan.lqer_top_k > 0:
        for name in sorted(lqer_candidates, key=lambda n: -lqer_candidates[n])[: plan.lqer_top_k]:
            t = np.asarray(state[name])
            corrected = with_lqer(tensors[name], t, plan.lqer_rank, plan.lqer_asym, plan.lqer_group)
            new_err = np.linalg.norm(as_matrix(t).astype(np.float64) - as_matrix(dequantize_tensor(corrected)))
            if new_err < lqer_candidates[name]:
                tensors[name] = corrected
    state_q = QuantizedState(tensors, QUANT_FORMAT)
    return state_q, quant_stats(state_q)


def lqer_corrected(state_q: QuantizedState) -> list[str]:
    """Names of the tensors that carry an LQER correction."""
    return [n for n, qt in state_q.tensors.items() if "_lqer_" in qt.scheme]


def _percentiles(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"quant_clip_percentiles must be comma-separated floats, got {text!r}") from None


def plan_from_config(export_cfg, **overrides) -> QuantPlan:
    """A QuantPlan from the ``quant_*`` fields of an ExportConfig (``overrides`` replace fields first)."""
    e = dataclasses.replace(export_cfg, **overrides) if overrides else export_cfg
    percentiles = _percentiles(e.quant_clip_percentiles)

    def rule(bits: int, k: float, gptq: bool) -> QuantRule:
        return QuantRule(bits=bits, clip=e.quant_clip, clip_q=e.quant_clip_q, percentiles=percentiles,
                         sdclip_k=k, int_range=e.quant_int_range, gptq=gptq)

    gates = tuple(p.strip() for p in e.quant_gate_patterns.split(",") if p.strip())
    return QuantPlan(
        attn=rule(e.quant_attn_bits, e.quant_attn_k, e.quant_gptq),
        mlp=rule(e.quant_mlp_bits, e.quant_mlp_k, e.quant_gptq),
        embed=rule(e.quant_embed_bits, e.quant_embed_k, e.quant_gptq and e.quant_gptq_embed),
        other=rule(e.quant_other_bits, e.quant_other_k, False),
        gate_patterns=gates,
        passthrough_max_numel=e.quant_passthrough_max_numel,
        gptq_damp=e.quant_gptq_damp,
        gptq_block=e.quant_gptq_block,
        gptq_act_order=e.quant_gptq_act_order,
        lqer_rank=e.quant_lqer_rank,
        lqer_top_k=e.quant_lqer_top_k,
        lqer_asym=e.quant_lqer_asym,
        lqer_group=e.quant_lqer_group,
        pack_bits=e.quant_pack_bits,
    )
