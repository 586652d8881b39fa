"""Full-Hessian GPTQ for one weight matrix (NumPy, float64 on the host).

A linear layer computes ``y = x @ W.T`` with ``W`` of shape (rows, cols). Given
``H = X^T X / n`` over calibration inputs ``X`` (n, cols), GPTQ quantizes the
columns of ``W`` one at a time with fixed per-row scales and pushes each
column's rounding error onto the columns not yet quantized, weighted by the
inverse Hessian, so the *output* error ``||X W^T - X W_q^T||`` is what shrinks,
not the weight error. The steps follow the records (research notes, 1.10):

- dead inputs (``H_jj == 0``) get ``H_jj = 1`` and a zero weight column;
- damping adds ``damp * mean(diag H)`` to the diagonal;
- act-order: columns in order of descending ``diag(H)``;
- ``U = chol(H^-1)^T`` (upper Cholesky factor of the inverse);
- 128-column blocks: inside a block the error is propagated column by column,
  after the block to all trailing columns at once (one matrix product);
- the permutation is undone at the end.
"""

from __future__ import annotations

import numpy as np

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128


def prepare_hessian(hessian: np.ndarray, damp: float = DEFAULT_DAMP) -> tuple[np.ndarray, np.ndarray]:
    """(damped float64 Hessian, dead-column mask). Raises ValueError on a bad shape."""
    h = np.array(hessian, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"GPTQ Hessian must be square (cols, cols), got shape {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError("GPTQ Hessian has non-finite entries")
    h = 0.5 * (h + h.T)
    diag = np.diagonal(h)
    dead = diag <= 0
    idx = np.flatnonzero(dead)
    h[idx, :] = 0.0
    h[:, idx] = 0.0
    h[idx, idx] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diagonal(h)))
    return h, dead


def upper_cholesky_of_inverse(h: np.ndarray, damp: float = DEFAULT_DAMP, retries: int = 4) -> np.ndarray:
    """``U`` with ``U^T U = H^-1``; adds more damping if ``H`` is numerically singular."""
    eye = np.eye(h.shape[0])
    extra = damp * float(np.mean(np.diagonal(h)))
    for attempt in range(retries + 1):
        try:
            lower_inv = np.linalg.inv(np.linalg.cholesky(h))  # H^-1 = L^-T L^-1
            inv = lower_inv.T @ lower_inv
            return np.linalg.cholesky(0.5 * (inv + inv.T)).T
        except np.linalg.LinAlgError:
            if attempt == retries:
                raise ValueError("GPTQ Hessian is not positive definite even after extra damping") from None
            h = h + eye * extra * (10.0 ** attempt)
    raise AssertionError("unreachable")


def gptq_quantize(
    w: np.ndarray,
    hessian: np.ndarray,
    scale: np.ndarray,
    qmin: int,
    qmax: int,
    *,
    damp: float = DEFAULT_DAMP,
    block: int = DEFAULT_BLOCK,
    act_order: bool = True,
) -> np.ndarray:
    """Integer codes (int8, shape of ``w``) for ``w ~= q * scale[:, None]`` minimizing the output error.

    ``scale`` holds the per-row scales the codes will be dequantized with (pass
    the stored, float16-rounded values so the error feedback sees the real grid).
    """
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"GPTQ needs a 2-D weight, got shape {w.shape}")
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"GPTQ Hessian shape {hessian.shape} does not match the weight's {cols} input columns")
    if block < 1:
        raise ValueError(f"GPTQ block size must be >= 1, got {block}")
    s = np.asarray(scale, dtype=np.float64).reshape(rows)
    h, dead = prepare_hessian(hessian, damp)
    w = w.copy()
    w[:, dead] = 0.0
    perm = np.argsort(-np.diagonal(h), kind="stable") if act_order else np.arange(cols)
    w = w[:, perm]
    h = h[np.ix_(perm, perm)]
    u = upper_cholesky_of_inverse(h, damp)

    q = np.zeros((rows, cols), dtype=np.int8)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].copy()
        u1 = u[i1:i2, i1:i2]
        err1 = np.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            qc = np.clip(np.rint(col / s), qmin, qmax)
            q[:, i1 + i] = qc.astype(np.int8)
            err = (col - qc * s) / u1[i, i]
            w1[:, i:] -= np.outer(err, u1[i, i:])
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    out = np.empty_like(q)
    out[:, perm] = q
    return out


def output_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray) -> float:
    """``trace(E H E^T)`` with ``E = w - w_hat``: the mean squared output error over the calibration set
    (times n) when ``H = X^T X / n``."""
    e = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.einsum("ij,jk,ik->", e, np.asarray(hessian, np.float64), e))
