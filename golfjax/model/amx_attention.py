"""Causal GQA attention as a fused CPU kernel on Intel AMX (bf16), via XLA's FFI.

Why: golfjax's XLA attention for CPU (`cpu_ops.causal_attention`) is a chain of
separate ops over (query rows x keys) tiles too large for the cache; on a
2-core Xeon with AMX it took ~60% of the model's bf16 forward+backward for
~22% of its FLOPs. `amx_attention.cc` does a whole block of 64 query rows
(scores, softmax, value product and, backward, all five products) while the
block stays in L2, with the products on AMX tiles: about 3.5x faster forward+
backward at the baseline shape (`scripts/bench_ops.py`, docs/BENCHMARKS.md).

The kernel is C++ compiled on first use with the system's compiler (`$CXX`,
else `g++`/`c++`) against jaxlib's FFI headers and cached under
`$GOLFJAX_CACHE_DIR` (default `~/.cache/golfjax`). Where it cannot be used
(no compiler, no AMX-BF16, a build error) `unavailable_reason()` says why and
`model.attention_impl="auto"` keeps the XLA path; only an explicit "amx" is an
error there. Same arithmetic as the XLA path (float32 scores, softmax and
accumulation; probabilities rounded to bf16 before the value product), so the
two agree to float32/bf16 rounding (tests/test_amx_attention.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

Array = jax.Array
F32 = jnp.float32
SOURCE = Path(__file__).with_name("amx_attention.cc")
COMPILE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w", "-mavx512f", "-mavx512bw", "-mavx512vl",
                 "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mfma")
TARGETS = ("golfjax_amx_attention_fwd", "golfjax_amx_attention_bwd")
ALIGN = 32  # head_dim and sequence length must be multiples of this


class AmxUnavailable(RuntimeError):
    """The AMX attention kernel cannot run here (the message says why)."""


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
    return cache_dir() / f"amx_attention-{key.hexdigest()[:16]}.so"


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
            raise AmxUnavailable(f"building {SOURCE.name} with {compiler} failed: {done.stderr.strip()[-800:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


@functools.cache
def _load() -> ctypes.CDLL | str:
    """The registered kernel library, or the reason it is not usable here."""
    if jax.default_backend() != "cpu":
        return f"the default backend is {jax.default_backend()}, not cpu"
    compiler = _compiler()
    if compiler is None:
        return "no C++ compiler found ($CXX, g++ or c++)"
    try:
        lib = ctypes.cdll.LoadLibrary(str(build(compiler)))
    except (AmxUnavailable, OSError, subprocess.SubprocessError) as err:
        return str(err)
    if not lib.golfjax_amx_available():
        return "this CPU (or its kernel) does not offer AMX-BF16 with AVX512-BF16"
    for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return lib


def unavailable_reason() -> str | None:
    """None when the kernel can run here, else why not (one line)."""
    loaded = _load()
    return loaded if isinstance(loaded, str) else None


def available() -> bool:
    return unavailable_reason() is None


def supports(q: Array, k: Array) -> bool:
    """bf16 inputs whose head_dim and sequence length are multiples of 32."""
    return (q.dtype == jnp.bfloat16 and k.dtype == jnp.bfloat16 and q.shape[-1] % ALIGN == 0
            and q.shape[1] % ALIGN == 0)


def causal_attention(q: Array, k: Array, v: Array) -> Array:
    """Causal GQA attention on bf16 (B, T, heads, head_dim) / (B, T, kv_heads, head_dim)."""
    reason = unavailable_reason()
    if reason is not None:
        raise AmxUnavailable(f"model.attention_impl='amx' cannot run here: {reason}")
    if not supports(q, k):
        raise ValueError(f"model.attention_impl='amx' needs bfloat16 inputs with head_dim and sequence length "
                         f"multiples of {ALIGN}; got {q.dtype} {q.shape}")
    return _attention(q, k, v)


def _forward_call(q: Array, k: Array, v: Array):
    batch, seq, heads, _ = q.shape
    stats = jax.ShapeDtypeStruct((batch, k.shape[2], seq * heads // k.shape[2]), F32)  # per KV head, its rows
    out = (jax.ShapeDtypeStruct(q.shape, q.dtype), stats, stats)
    return jax.ffi.ffi_call(TARGETS[0], out, vmap_method="sequential")(q, k, v)


def _backward_call(q, k, v, o, do, row_max, row_inv):
    out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
           jax.ShapeDtypeStruct(v.shape, v.dtype))
    return jax.ffi.ffi_call(TARGETS[1], out, vmap_method="sequential")(q, k, v, o, do, row_max, row_inv)


def _attention_fwd(q: Array, k: Array, v: Array):
    # The kernel reads and writes the model's (B, T, heads, head_dim) layout itself and scales q
    # by 1/sqrt(head_dim) (float32, rounded to bf16) as cpu_ops does: no transposes around it.
    o, row_max, row_inv = _forward_call(q, k, v)
    return o, (q, k, v, o, row_max, row_inv)


def _attention_bwd(res, do: Array):
    q, k, v, o, row_max, row_inv = res
    return _backward_call(q, k, v, o, do.astype(q.dtype), row_max, row_inv)


@jax.custom_vjp
def _attention(q: Array, k: Array, v: Array) -> Array:
    return _attention_fwd(q, k, v)[0]


_attention.defvjp(_attention_fwd, _attention_bwd)
