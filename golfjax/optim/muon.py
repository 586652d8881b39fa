"""Muon: momentum, then Newton-Schulz orthogonalisation, as the reference does it.

The reference (`zeropower_via_newtonschulz5` and `Muon` in `train_gpt.py` of
openai/parameter-golf) works on torch weights of shape (out, in). golfjax keeps
Flax kernels (in, out), optionally stacked over layers as (L, in, out), so every
matrix is transposed into the reference orientation before the iteration and
back afterwards. The orientation matters bit-for-bit for square matrices
(X X^T differs from X^T X in rounding), which is why we do not skip it.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from golfjax.model.cpu_ops import transposed_copy

Coefficients = tuple[tuple[float, float, float], ...]

# Per-step (a, b, c) of X <- a X + (b A + c A A) X with A = X X^T. A table
# shorter than the number of steps reuses its last row for the remaining steps.
NS_COEFFICIENTS: dict[str, Coefficients] = {
    "standard": ((3.4445, -4.7750, 2.0315),) * 5,
    # Polar Express (Amsel et al. 2025): per-iteration minimax quintics, as the
    # 2026-04-23 and TOP records use them with 5 steps. The records slice the
    # table (more than 5 steps still run 5); here extra steps reuse the last row.
    "polar_express": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
}


def _coefficient_table(coeffs: str | Sequence[Sequence[float]]) -> Coefficients:
    if isinstance(coeffs, str):
        if coeffs not in NS_COEFFICIENTS:
            raise ValueError(f"unknown Newton-Schulz coefficients {coeffs!r}; known: {sorted(NS_COEFFICIENTS)}")
        return NS_COEFFICIENTS[coeffs]
    table = tuple(tuple(float(v) for v in row) for row in coeffs)
    if not table or any(len(row) != 3 for row in table):
        raise ValueError("a Newton-Schulz coefficient table needs one or more (a, b, c) rows")
    return table  # type: ignore[return-value]


def _rounder(dtype: jnp.dtype):
    """Round a float32 result to the working dtype once, as one eager torch op does.

    `reduce_precision` pins the rounding even if XLA later drops a
    float32 -> bfloat16 -> float32 convert pair (allowed excess precision).
    """
    info = jnp.finfo(dtype)
    if info.bits >= 32:
        return lambda x: x.astype(dtype)
    return lambda x: lax.reduce_precision(x, info.nexp, info.nmant).astype(dtype)


NS_ROUNDINGS: tuple[str, ...] = ("eager", "compiled")


def newton_schulz(
    G: jax.Array,
    steps: int = 5,
    coeffs: str | Sequence[Sequence[float]] = "standard",
    eps: float = 1e-7,
    dtype: jnp.dtype = jnp.bfloat16,
    safety: float = 1.0,
    rounding: str = "eager",
) -> jax.Array:
    """Approximately orthogonalise the trailing (rows, cols) matrices of `G`.

    Reference orientation: `G[..., :, :]` is (out, in). Leading axes are a batch.
    Returns an array of `dtype`. In a low-precision `dtype` (bfloat16), matmuls
    always take `dtype` inputs and accumulate in float32, Python-float
    coefficients are applied in float32 (a bf16 multiply would round 3.4445 to
    3.4375), and `rounding` says where results are rounded to `dtype`:

    - ``"eager"``: torch's eager bf16, one rounding per torch op. The input is
      rounded first, its norm is taken from the rounded values and rounded, and
      so is ``norm + eps`` and the quotient; then per step A = X X^T, b*A, c*A,
      (c*A) @ A, their sum, a*X, B @ X and the new X are each rounded.
    - ``"compiled"``: the reference's ``torch.compile``d function on CPU
      (inductor, torch 2.13). The norm, ``+ eps`` and the division run in
      float32 on the float32 input, rounded once (X) and, times `a`, once more
      (the first step's a*X); b*A, c*A and later a*X are rounded from bf16
      operands; the two sums are fused into their matmuls (addmm), so
      B = b*A + (c*A) @ A and X' = a*X + B @ X are rounded once each, from
      float32. Bit-identical to the golden `bf16_compiled` outputs of the 64x64
      and 256x64 inputs; on the 64x256 one the float32 norm is 2 ulps above
      inductor's (its sum of squares runs in 32 lanes per OpenMP thread), which
      flips roundings of X: 23% of the elements equal, 1.1% relative error.

    In float32 both give the same result to float32 rounding. `safety` > 1
    divides by `safety * norm` (modded-nanogpt's Polar Express uses 1.02) so
    that no singular value starts above 1.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got shape {G.shape}")
    if rounding not in NS_ROUNDINGS:
        raise ValueError(f"unknown Newton-Schulz rounding {rounding!r}; known: {list(NS_ROUNDINGS)}")
    table = _coefficient_table(coeffs)
    f32 = jnp.float32
    rnd = _rounder(jnp.dtype(dtype))
    fused = rounding == "compiled"

    def up(x: jax.Array) -> jax.Array:
        return x.astype(f32)

    narrow = jnp.dtype(dtype).itemsize < 4

    def pin(x: jax.Array) -> jax.Array:
        # Keep a bf16 operand bf16: XLA may otherwise feed the dot the float32 value
        # the rounding came from ("excess precision"; the same numbers, but XLA:CPU
        # then runs a float32 matmul at half the speed of its bf16 kernels).
        return lax.optimization_barrier(x) if narrow else x

    def dot(x: jax.Array, y: jax.Array) -> jax.Array:  # float32 accumulation, not rounded
        return jnp.matmul(pin(x), pin(y), preferred_element_type=f32)

    def gram(x: jax.Array) -> jax.Array:
        # x @ x^T. Eager: the transpose as a view, which XLA:CPU runs as a float32
        # matmul of the bf16 values, bit-identical to torch's eager bf16 on the golden
        # inputs (a bf16 kernel is 1.6% apart on the 64x256 one). Compiled: x^T as a
        # real bf16 copy, so that the product runs in XLA:CPU's bf16 kernel (~2.3x
        # faster Newton-Schulz at (9, 512, 1024); the same golden results as the view).
        if fused and narrow:
            return dot(x, transposed_copy(x))
        return dot(x, jnp.swapaxes(x, -1, -2))

    def frobenius(x: jax.Array) -> jax.Array:
        return jnp.sqrt(jnp.sum(jnp.square(up(x)), axis=(-2, -1), keepdims=True))

    if fused:
        G32 = up(G)
        norm = frobenius(G32)
        if safety != 1.0:
            norm = norm * safety
        X32 = G32 / (norm + eps)
        X = rnd(X32)
        aX = rnd(table[0][0] * X32)  # the first a*X comes from the unrounded quotient
    else:
        X = G.astype(dtype)
        norm = rnd(frobenius(X))
        if safety != 1.0:
            norm = rnd(up(norm) * safety)
        X = rnd(up(X) / up(rnd(up(norm) + eps)))
        aX = None
    transposed = G.shape[-2] > G.shape[-1]
    if transposed:
        X = transposed_copy(X)
        if aX is not None:
            aX = transposed_copy(aX)
    for i in range(steps):
        a, b, c = table[min(i, len(table) - 1)]
        A = rnd(gram(X))
        bA, cA = rnd(b * up(A)), rnd(c * up(A))
        if fused:
            if i > 0:
                aX = rnd(a * up(X))
            B = rnd(up(bA) + dot(cA, A))
            X = rnd(up(aX) + dot(B, X))
        else:
            B = rnd(up(bA) + up(rnd(dot(cA, A))))
            X = rnd(up(rnd(a * up(X))) + up(rnd(dot(B, X))))
    return jnp.swapaxes(X, -1, -2) if transposed else X


def muon_momentum(
    count: jax.Array | int, momentum: float, warmup_start: float, warmup_steps: int
) -> jax.Array:
    """The reference's momentum warmup; `count` is the 0-based number of previous updates."""
    if warmup_steps <= 0:
        return jnp.asarray(momentum, jnp.float32)
    frac = jnp.minimum(jnp.asarray(count, jnp.float32) / warmup_steps, 1.0)
    return (1.0 - frac) * warmup_start + frac * momentum


def orthogonalized_direction(
    update: jax.Array,
    steps: int = 5,
    coeffs: str | Sequence[Sequence[float]] = "standard",
    eps: float = 1e-7,
    dtype: jnp.dtype = jnp.bfloat16,
    safety: float = 1.0,
    rounding: str = "eager",
) -> jax.Array:
    """Muon's direction for a Flax kernel (..., in, out), leading axes = layers.

    Each matrix is orthogonalised as the reference weight `kernel.T` (out, in)
    and scaled by sqrt(max(1, out/in)). The scaled result is rounded to `dtype`
    once, as the reference stores it in a bfloat16 buffer, then returned in the
    update's dtype.
    """
    if update.ndim < 2:
        raise ValueError(f"Muon needs (..., in, out) kernels, got shape {update.shape}")
    fan_in, fan_out = update.shape[-2], update.shape[-1]
    ortho = newton_schulz(transposed_copy(update), steps, coeffs, eps, dtype, safety, rounding)
    scale = math.sqrt(max(1.0, fan_out / fan_in))
    scaled = _rounder(jnp.dtype(dtype))(ortho.astype(jnp.float32) * scale)
    return jnp.swapaxes(scaled, -1, -2).astype(update.dtype)


def row_normalize(update: jax.Array, eps: float = 1e-7) -> jax.Array:
    """MuonEq-R: divide each reference row (output unit) by its L2 norm, clamped at `eps`.

    A Flax kernel (..., in, out) holds the reference's rows as its columns, so
    the norm runs over the `in` axis (-2). Computed in float32, as the records do.
    """
    norms = jnp.sqrt(jnp.sum(jnp.square(update.astype(jnp.float32)), axis=-2, keepdims=True))
    return update / jnp.maximum(norms, eps).astype(update.dtype)


def sharded_over_layers(fn: Callable[[jax.Array], jax.Array], x: jax.Array, mesh: Mesh,
                        axis: str = "data") -> jax.Array:
    """`fn` (a per-matrix map) of a stack (L, ...) with the L matrices split over `axis`.

    The records' Parallel Muon: each device orthogonalises its share of the
    matrices and the results are all-gathered. The stack is zero-padded to a
    multiple of the axis size (a zero matrix orthogonalises to zero and is cut
    off again). Per matrix the arithmetic is the replicated one's.
    """
    n = mesh.shape[axis]
    if x.ndim < 3 or n == 1:
        return fn(x)
    layers = x.shape[0]
    pad = (-layers) % n
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    x = lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(axis)))
    out = lax.with_sharding_constraint(fn(x), NamedSharding(mesh, PartitionSpec()))
    return out[:layers]


def one_matrix_at_a_time(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """`fn` of a stack of matrices, applied to one matrix after the other (`lax.map`).

    On CPU each matrix's Newton-Schulz intermediates (1-2 MB) then stay in cache,
    where a whole (9, 512, 512) stack's passes go to memory: Muon's direction of the
    baseline's six stacks 442-449 ms instead of 572-576 on the Xeon AMX VM, with the
    same bits (`tests/test_muon.py`)."""
    if x.ndim < 3:
        return fn(x)
    flat = x.reshape(-1, *x.shape[-2:])
    out = lax.map(lambda m: fn(m[None])[0], flat)
    return out.reshape(*x.shape[:-2], *out.shape[-2:])


class ScaleByMuonState(NamedTuple):
    count: jax.Array  # int32: updates done so far; drives the momentum warmup
    momentum_buffer: optax.Updates


def scale_by_muon(
    momentum: float = 0.95,
    warmup_start: float = 0.85,
    warmup_steps: int = 500,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coeffs: str | Sequence[Sequence[float]] = "standard",
    ns_dtype: jnp.dtype = jnp.bfloat16,
    eps: float = 1e-7,
    row_norm: bool = False,
    ns_safety: float = 1.0,
    shard_mesh: Mesh | None = None,
    ns_rounding: str = "eager",
) -> optax.GradientTransformation:
    """The reference Muon direction (no learning rate: chain `optax.scale(-lr)`).

    Per leaf: torch-style buffer `buf = m*buf + g` (no dampening, no bias
    correction), Nesterov input `g + m*buf`, then `orthogonalized_direction`.
    `m` follows the reference warmup from this transform's own step count, so
    the momentum needs no host-side injection and is checkpointed with the state.
    `row_norm` applies MuonEq-R to the Nesterov input; `shard_mesh` splits the
    orthogonalisation of every layer stack over the mesh's data axis.
    `ns_rounding` is `newton_schulz`'s `rounding` ("eager" or "compiled").
    """
    _coefficient_table(ns_coeffs)  # fail at build time, not at trace time
    if ns_rounding not in NS_ROUNDINGS:
        raise ValueError(f"unknown Newton-Schulz rounding {ns_rounding!r}; known: {list(NS_ROUNDINGS)}")

    def init_fn(params: optax.Params) -> ScaleByMuonState:
        return ScaleByMuonState(count=jnp.zeros([], jnp.int32), momentum_buffer=optax.tree.zeros_like(params))

    def update_fn(updates, state: ScaleByMuonState, params=None):
        del params
        m = muon_momentum(state.count, momentum, warmup_start, warmup_steps)
        buf = jax.tree.map(lambda b, g: (m * b).astype(b.dtype) + g, state.momentum_buffer, updates)
        if nesterov:
            inputs = jax.tree.map(lambda g, b: g + (m * b).astype(b.dtype), updates, buf)
        else:
            inputs = buf
        if row_norm:
            inputs = jax.tree.map(row_normalize, inputs)
        direction = lambda g: orthogonalized_direction(g, ns_steps, ns_coeffs, eps, ns_dtype, ns_safety,
                                                       ns_rounding)
        if shard_mesh is not None:
            directions = jax.tree.map(lambda g: sharded_over_layers(direction, g, shard_mesh), inputs)
        elif jax.default_backend() == "cpu":
            directions = jax.tree.map(lambda g: one_matrix_at_a_time(direction, g), inputs)
        else:  # accelerators: the whole stack in one batched product
            directions = jax.tree.map(direction, inputs)
        return directions, ScaleByMuonState(count=optax.safe_increment(state.count), momentum_buffer=buf)

    return optax.GradientTransformation(init_fn, update_fn)
