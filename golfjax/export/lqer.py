"""LQER: a low-rank correction of a quantized matrix's error (NumPy).

After quantization ``E = W - W_hat``; a rank-r truncated SVD gives
``A = U_r S_r`` (rows, r) and ``B = V_r^T`` (r, cols), and the restored weight
is ``W_hat + A_hat @ B_hat``. The factors are stored small (research notes 1.10,
the TOP record's settings):

- asymmetric ("asym"): A as INT2 in [-2, 1] with one scale per matrix
  (``max|A| / 1.5``); B flattened and cut into groups (64), INT4 in [-8, 7] with
  one float16 scale per group (``group max|B| / 7.5``);
- symmetric fallback ("sym"): A and B as INT4 in [-7, 7], one scale per row.

Stored arrays (all int8 codes with float16 scales):
asym: ``lqer_a`` (rows, r), ``lqer_a_scale`` (), ``lqer_b`` (groups, group), ``lqer_b_scale`` (groups,);
sym:  ``lqer_a`` (rows, r), ``lqer_a_scale`` (rows,), ``lqer_b`` (r, cols), ``lqer_b_scale`` (r,).
The B groups are padded with zeros at the end, so the group size is ``lqer_b.shape[1]``.
"""

from __future__ import annotations

import numpy as np

LQER_ARRAYS: tuple[str, ...] = ("lqer_a", "lqer_a_scale", "lqer_b", "lqer_b_scale")
MIN_SCALE = float(np.finfo(np.float16).smallest_subnormal)


def low_rank_factors(e: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) float32 with A @ B the best rank-``rank`` approximation of ``e`` (truncated SVD)."""
    e = np.asarray(e, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"LQER needs a 2-D error matrix, got shape {e.shape}")
    if rank < 1:
        raise ValueError(f"LQER rank must be >= 1, got {rank}")
    rank = min(rank, *e.shape)
    u, s, vt = np.linalg.svd(e, full_matrices=False)
    return (u[:, :rank] * s[:rank]).astype(np.float32), vt[:rank].astype(np.float32)


def _fp16_scale(scale: np.ndarray) -> np.ndarray:
    """Scales as stored (float16), never zero, so dividing by them is safe."""
    return np.maximum(np.asarray(scale, np.float32), np.float32(MIN_SCALE)).astype(np.float16)


def _codes(x: np.ndarray, scale16: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.rint(x / scale16.astype(np.float32)), lo, hi).astype(np.int8)


def pack_asym(a: np.ndarray, b: np.ndarray, group: int = 64) -> dict[str, np.ndarray]:
    """INT2 A with one scale, INT4 B in flat groups of ``group`` values."""
    if group < 1:
        raise ValueError(f"LQER group size must be >= 1, got {group}")
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    a_scale = _fp16_scale(np.abs(a32).max(initial=0.0) / np.float32(1.5))
    flat = b32.reshape(-1)
    groups = -(-flat.size // group)
    padded = np.zeros(groups * group, np.float32)
    padded[: flat.size] = flat
    padded = padded.reshape(groups, group)
    b_scale = _fp16_scale(np.abs(padded).max(axis=1) / np.float32(7.5))
    return {
        "lqer_a": _codes(a32, a_scale, -2, 1),
        "lqer_a_scale": np.asarray(a_scale, np.float16).reshape(()),
        "lqer_b": _codes(padded, b_scale[:, None], -8, 7),
        "lqer_b_scale": b_scale,
    }


def pack_sym(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """INT4 A and B in [-7, 7], one float16 scale per row of each."""
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    a_scale = _fp16_scale(np.abs(a32).max(axis=1) / np.float32(7.0))
    b_scale = _fp16_scale(np.abs(b32).max(axis=1) / np.float32(7.0))
    return {
        "lqer_a": _codes(a32, a_scale[:, None], -7, 7),
        "lqer_a_scale": a_scale,
        "lqer_b": _codes(b32, b_scale[:, None], -7, 7),
        "lqer_b_scale": b_scale,
    }


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"malformed LQER arrays: {what}")


def correction(arrays: dict[str, np.ndarray], rows: int, cols: int, asym: bool) -> np.ndarray:
    """``A_hat @ B_hat`` (float32, (rows, cols)) from the stored arrays; checks every shape."""
    qa, sa, qb, sb = (arrays[k] for k in LQER_ARRAYS)
    _check(qa.ndim == 2 and qa.shape[0] == rows and qa.shape[1] >= 1, f"lqer_a shape {qa.shape} for {rows} rows")
    rank = qa.shape[1]
    if asym:
        _check(sa.shape == (), f"lqer_a_scale shape {sa.shape}, expected ()")
        _check(qb.ndim == 2 and qb.shape[0] == sb.shape[0] == sb.size, f"lqer_b {qb.shape} / scales {sb.shape}")
        _check(qb.size >= rank * cols > qb.size - qb.shape[1], f"lqer_b holds {qb.size} values for rank {rank} x {cols}")
        a_hat = qa.astype(np.float32) * np.float32(sa)
        b_hat = (qb.astype(np.float32) * sb.astype(np.float32)[:, None]).reshape(-1)[: rank * cols].reshape(rank, cols)
    else:
        _check(sa.shape == (rows,), f"lqer_a_scale shape {sa.shape}, expected ({rows},)")
        _check(qb.shape == (rank, cols) and sb.shape == (rank,), f"lqer_b {qb.shape} / scales {sb.shape}")
        a_hat = qa.astype(np.float32) * sa.astype(np.float32)[:, None]
        b_hat = qb.astype(np.float32) * sb.astype(np.float32)[:, None]
    return a_hat @ b_hat


def lqer_arrays(e: np.ndarray, rank: int, asym: bool = True, group: int = 64) -> dict[str, np.ndarray]:
    """Stored LQER arrays for the error matrix ``e``."""
    a, b = low_rank_factors(e, rank)
    return pack_asym(a, b, group) if asym else pack_sym(a, b)
