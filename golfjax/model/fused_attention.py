"""Causal GQA attention as a fused CPU kernel (C++, via XLA's FFI): bf16 on AMX, float32 on AVX-512.

Why: golfjax's XLA attention for CPU (`cpu_ops.causal_attention`) is a chain of
separate ops over (query rows x keys) tiles too large for the cache; on a
2-core Xeon it took ~60% of the model's bf16 forward+backward for ~22% of its
FLOPs. `fused_attention.cc` does a whole block of 64 query rows (scores,
softmax, value product; backward, all five products) while the block stays in
L2, reading and writing the model's (B, T, heads, head_dim) layout itself: about
3.5x (bf16, AMX tiles) and 2.4x (float32, AVX-512) faster forward+backward at
the baseline shape than the XLA path (`scripts/bench_ops.py`, docs/BENCHMARKS.md).

The kernel is C++ compiled on first use with the system's compiler (`$CXX`,
else `g++`/`c++`) against jaxlib's FFI headers and cached under
`$GOLFJAX_CACHE_DIR` (default `~/.cache/golfjax`). Where it cannot be used (not
x86-64, no compiler, no AVX-512F for float32 or AMX-BF16 for bf16)
`unavailable_reason(dtype)` says why and `model.attention_impl="auto"` keeps the
XLA path; only an explicit "fused" is an error there. Same arithmetic as the XLA
path (float32 scores, softmax and accumulation; probabilities rounded to the
input type before the value product), so the two agree to float32 rounding in
float32 and to bf16 rounding in bf16 (tests/test_fused_attention.py).

`norm_rotary` is its companion: the q/k RMSNorm, rotary and per-head gain that the
model applies before the attention (`layers.qk_norm_rotary`), forward and backward, in
one pass each; `rms_norm` is the same kernel without rotary or gain, for the blocks'
RMSNorm (faster than the XLA ops by the factors `scripts/bench_ops.py` measures,
docs/BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
F32 = jnp.float32
SOURCE = Path(__file__).with_name("fused_attention.cc")
COMPILE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w", "-mavx512f", "-mavx512bw", "-mavx512vl",
                 "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mfma")
# FFI targets per input dtype, and the bit of golfjax_cpu_features() that says the CPU can run them
TARGETS = {jnp.dtype(jnp.bfloat16): ("golfjax_attention_fwd_bf16", "golfjax_attention_bwd_bf16"),
           jnp.dtype(jnp.float32): ("golfjax_attention_fwd_f32", "golfjax_attention_bwd_f32")}
FEATURE_BIT = {jnp.dtype(jnp.float32): 1, jnp.dtype(jnp.bfloat16): 2}
NEEDS = {jnp.dtype(jnp.float32): "AVX-512F", jnp.dtype(jnp.bfloat16): "AMX-BF16 with AVX512-BF16"}
# A tiled transpose of the last two axes, float32 and 16-bit (custom_transpose below)
TRANSPOSE_TARGETS = {jnp.dtype(jnp.float32): "golfjax_transpose_f32", jnp.dtype(jnp.bfloat16): "golfjax_transpose_16bit"}
# q/k RMSNorm + rotary + per-head gain, forward and backward (norm_rotary below)
NORM_ROTARY_TARGETS = {jnp.dtype(jnp.bfloat16): ("golfjax_norm_rotary_fwd_bf16", "golfjax_norm_rotary_bwd_bf16"),
                       jnp.dtype(jnp.float32): ("golfjax_norm_rotary_fwd_f32", "golfjax_norm_rotary_bwd_f32")}
ALIGN = 32  # head_dim and sequence length must be multiples of this
MAX_HEAD_DIM = 512


class KernelUnavailable(RuntimeError):
    """The fused attention kernel cannot run here (the message says why)."""


def cache_dir() -> Path:
    return Path(os.environ.get("GOLFJAX_CACHE_DIR", Path.home() / ".cache" / "golfjax"))


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def library_path(compiler: str) -> Path:
    """Where the build of this source, these flags, this compiler and this jaxlib lives."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(COMPILE_FLAGS).encode(), compiler.encode(), jax.__version__.encode()):
        key.update(part)
    return cache_dir() / f"fused_attention-{key.hexdigest()[:16]}.so"


def build(compiler: str) -> Path:
    """Compile the kernel (once per source/compiler/jaxlib; atomic, so concurrent processes are safe)."""
    target = library_path(compiler)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, *COMPILE_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp, "-lpthread"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise KernelUnavailable(f"building {SOURCE.name} with {compiler} failed: {done.stderr.strip()[-800:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


@functools.cache
def _load() -> tuple[int, str | None]:
    """(the CPU feature bits the kernels need, or 0; why nothing can run, or None), registering the targets."""
    if jax.default_backend() != "cpu":
        return 0, f"the default backend is {jax.default_backend()}, not cpu"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return 0, f"the kernel is for x86-64 CPUs, this is {platform.machine()}"
    compiler = _compiler()
    if compiler is None:
        return 0, "no C++ compiler found ($CXX, g++ or c++)"
    try:
        lib = ctypes.cdll.LoadLibrary(str(build(compiler)))
    except (KernelUnavailable, OSError, subprocess.SubprocessError) as err:
        # A compiler that fails is worth a word (once): "auto" quietly keeps the slower XLA attention.
        warnings.warn(f"golfjax: the fused CPU attention is unavailable ({err}); using XLA's attention", stacklevel=2)
        return 0, str(err)
    pairs = [*TARGETS.values(), *NORM_ROTARY_TARGETS.values()]
    for name in [*(name for pair in pairs for name in pair), *TRANSPOSE_TARGETS.values()]:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return int(lib.golfjax_cpu_features()), None


def unavailable_reason(dtype=jnp.bfloat16) -> str | None:
    """None when the kernel for `dtype` can run here, else why not (one line)."""
    dtype = jnp.dtype(dtype)
    if dtype not in TARGETS:
        return f"the kernel takes bfloat16 or float32, not {dtype}"
    features, reason = _load()
    if reason is not None:
        return reason
    if not features & FEATURE_BIT[dtype]:
        return f"this CPU (or its OS) does not offer {NEEDS[dtype]}, which the {dtype} kernel needs"
    return None


def available(dtype=jnp.bfloat16) -> bool:
    return unavailable_reason(dtype) is None


def supports(q: Array, k: Array) -> bool:
    """bf16 or float32 inputs whose head_dim (<= 512) and sequence length are multiples of 32."""
    return (q.dtype in TARGETS and k.dtype == q.dtype and q.shape[-1] % ALIGN == 0
            and q.shape[-1] <= MAX_HEAD_DIM and q.shape[1] % ALIGN == 0)


def causal_attention(q: Array, k: Array, v: Array) -> Array:
    """Causal GQA attention on (B, T, heads, head_dim) / (B, T, kv_heads, head_dim), bf16 or float32."""
    reason = unavailable_reason(q.dtype)
    if reason is not None:
        raise KernelUnavailable(f"model.attention_impl='fused' cannot run here: {reason}")
    if not supports(q, k):
        raise ValueError(f"model.attention_impl='fused' needs bfloat16 or float32 inputs with head_dim (<= "
                         f"{MAX_HEAD_DIM}) and sequence length multiples of {ALIGN}; got {q.dtype} {q.shape}")
    return _attention(q, k, v)


def custom_transpose(x: Array) -> Array:
    """x with its last two axes swapped, by the C++ kernel (float32 / bf16, where the float32
    kernel can run). XLA:CPU lays a transpose it may fuse out as a column-major write of its
    producer (the MLP's relu^2: 6.8 ms at 1024 x 1024 float32, against 0.4 + ~0.8 ms as two
    row-major passes); a custom call's operand is row-major. Not differentiable (used in VJPs)."""
    *lead, m, n = x.shape
    out = jax.ShapeDtypeStruct((*lead, n, m), x.dtype)
    return jax.ffi.ffi_call(TRANSPOSE_TARGETS[x.dtype], out, vmap_method="sequential")(x)


def norm_rotary(x: Array, cos: Array, sin: Array, gain: Array | None = None) -> Array:
    """gain[h] * rotary(rms_norm(x)) for x (B, T, heads, head_dim), in one pass (C++ kernel).

    What the attention does to q (with q_gain) and k (no gain) before the kernel:
    `layers.rms_norm` (eps of x's dtype), `layers.apply_partial_rotary` with
    cos/sin (T, R/2) on the first R dims, a per-head gain. Computed in float32
    and rounded to x's dtype once (the XLA chain rounds after each op in bf16).
    Differentiable in x and gain; the kernels' availability is the attention's."""
    reason = unavailable_reason(x.dtype)
    if reason is not None:
        raise KernelUnavailable(f"the fused q/k norm and rotary cannot run here: {reason}")
    if x.ndim != 4 or x.shape[-1] > MAX_HEAD_DIM or cos.shape != sin.shape or cos.shape[0] != x.shape[1] \
            or 2 * cos.shape[-1] > x.shape[-1]:
        raise ValueError(f"norm_rotary needs x (B, T, H, D <= {MAX_HEAD_DIM}) and cos, sin (T, R/2) with R <= D; "
                         f"got {x.shape}, {cos.shape}, {sin.shape}")
    gain = jnp.ones(x.shape[2], F32) if gain is None else gain
    return _norm_rotary(x, cos.astype(F32), sin.astype(F32), gain.astype(F32))


def supports_norm(x: Array) -> bool:
    """`rms_norm` applies: bf16 or float32 x whose last axis is at most 512 wide."""
    return x.dtype in NORM_ROTARY_TARGETS and 0 < x.shape[-1] <= MAX_HEAD_DIM


def rms_norm(x: Array) -> Array:
    """`layers.rms_norm` (eps of x's dtype) over x's last axis (<= 512) as one C++ pass each way:
    `norm_rotary` with no rotary and no gain."""
    rows = x.reshape(1, -1, 1, x.shape[-1])
    no_rotary = jnp.zeros((rows.shape[1], 0), F32)
    return norm_rotary(rows, no_rotary, no_rotary).reshape(x.shape)


def _norm_rotary_fwd(x, cos, sin, gain):
    eps = np.float32(jnp.finfo(x.dtype).eps)
    y = jax.ffi.ffi_call(NORM_ROTARY_TARGETS[x.dtype][0], jax.ShapeDtypeStruct(x.shape, x.dtype),
                         vmap_method="sequential")(x, cos, sin, gain, eps=eps)
    return y, (x, cos, sin, gain)


def _norm_rotary_bwd(res, dy):
    x, cos, sin, gain = res
    eps = np.float32(jnp.finfo(x.dtype).eps)
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(gain.shape, F32))
    dx, dgain = jax.ffi.ffi_call(NORM_ROTARY_TARGETS[x.dtype][1], out, vmap_method="sequential")(
        x, cos, sin, gain, dy.astype(x.dtype), eps=eps)
    return dx, jnp.zeros_like(cos), jnp.zeros_like(sin), dgain


@jax.custom_vjp
def _norm_rotary(x: Array, cos: Array, sin: Array, gain: Array) -> Array:
    return _norm_rotary_fwd(x, cos, sin, gain)[0]


_norm_rotary.defvjp(_norm_rotary_fwd, _norm_rotary_bwd)


def _forward_call(q: Array, k: Array, v: Array):
    batch, seq, heads, _ = q.shape
    stats = jax.ShapeDtypeStruct((batch, k.shape[2], seq * heads // k.shape[2]), F32)  # per KV head, its rows
    out = (jax.ShapeDtypeStruct(q.shape, q.dtype), stats, stats)
    return jax.ffi.ffi_call(TARGETS[q.dtype][0], out, vmap_method="sequential")(q, k, v)


def _backward_call(q, k, v, o, do, row_max, row_inv):
    out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
           jax.ShapeDtypeStruct(v.shape, v.dtype))
    return jax.ffi.ffi_call(TARGETS[q.dtype][1], out, vmap_method="sequential")(q, k, v, o, do, row_max, row_inv)


def _attention_fwd(q: Array, k: Array, v: Array):
    # The kernel reads and writes the model's (B, T, heads, head_dim) layout itself and scales q
    # by 1/sqrt(head_dim) (float32, rounded to the input type) as cpu_ops does: no transposes around it.
    o, row_max, row_inv = _forward_call(q, k, v)
    return o, (q, k, v, o, row_max, row_inv)


def _attention_bwd(res, do: Array):
    q, k, v, o, row_max, row_inv = res
    return _backward_call(q, k, v, o, do.astype(q.dtype), row_max, row_inv)


@jax.custom_vjp
def _attention(q: Array, k: Array, v: Array) -> Array:
    return _attention_fwd(q, k, v)[0]


_attention.defvjp(_attention_fwd, _attention_bwd)
