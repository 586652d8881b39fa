"""Time single XLA ops at the baseline's sizes: is the step's non-matmul work slow per op?

    python scripts/bench_ops.py                 # all cores
    taskset -c 0 python scripts/bench_ops.py    # one core: what a second thread adds

An elementwise fusion (tanh(x) * y + x) and a float32 -> bfloat16 convert on one
micro-batch's activations (1,024 x 512) and on 4x that, and matmuls of the model's
shapes in float32 and bf16 (float32 accumulation): the (1,024 x 512) @ (512 x 1,024)
projection and Newton-Schulz's stacked (9, 512, 512) product; and Muon's whole
direction (`orthogonalized_direction`: 5 bf16 Newton-Schulz steps) of each of the
baseline's six kernel stacks (9 layers of c_q, c_k, c_v, proj, fc, mlp proj, in
Flax's (in, out) layout) and their sum, in both roundings; the attention's bf16 tiles
(64-wide contraction or output) and golfjax's CPU attention forward+backward on one
baseline layer and sequence in bf16 and float32, XLA's (`cpu_ops`) and, where the CPU
can run it, the fused kernel's (`fused_attention`), and the q/k RMSNorm + rotary +
q_gain before it and a block's RMSNorm (XLA's ops and the kernels of
`fused_attention.norm_rotary` / `rms_norm`). Each is jitted alone;
median of --repeats calls after a warm-up. Prints one JSON line: ms per op, and
GFLOP/s for the matmuls.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import run_main  # noqa: E402  (light: no jax import)


def _median_ms(fn, *args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=31)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    import jax
    import jax.numpy as jnp
    from jax import lax

    import golfjax  # noqa: F401  (its XLA:CPU defaults, as in training)

    key = jax.random.PRNGKey(0)
    out: dict[str, float | int | str] = {}
    for rows in (1024, 4096):
        x, y = jax.random.normal(key, (rows, 512)), jax.random.normal(jax.random.PRNGKey(1), (rows, 512))
        out[f"elementwise_{rows}x512_ms"] = round(_median_ms(jax.jit(lambda a, b: jnp.tanh(a) * b + a), x, y,
                                                             repeats=args.repeats), 3)
        out[f"convert_bf16_{rows}x512_ms"] = round(_median_ms(jax.jit(lambda a: a.astype(jnp.bfloat16)), x,
                                                              repeats=args.repeats), 3)
    shapes = {"proj_1024x512x1024": ((1024, 512), (512, 1024)), "ns_9x512x512x512": ((9, 512, 512), (9, 512, 512))}
    for name, (sa, sb) in shapes.items():
        batch = ((0,), (0,)) if len(sa) == 3 else ((), ())
        dims = (((len(sa) - 1,), (len(sb) - 2,)), batch)
        flops = 2 * math.prod(sa) * sb[-1]  # (batch x) M x K x N multiply-adds
        for dtype in (jnp.float32, jnp.bfloat16):
            a = jax.random.normal(key, sa).astype(dtype)
            b = jax.random.normal(jax.random.PRNGKey(1), sb).astype(dtype)
            dot = jax.jit(lambda a, b: lax.dot_general(a, b, dims, preferred_element_type=jnp.float32))
            ms = _median_ms(dot, a, b, repeats=args.repeats)
            out[f"matmul_{name}_{jnp.dtype(dtype).name}_gflops"] = round(flops / ms / 1e6, 1)
    # The attention's tiles (4 KV heads, a 128-position query block of 2 heads per KV head,
    # the last block's 896 past keys) and the CPU attention itself (one layer, one sequence).
    tiles = {"attn_qk_4x256x64x896": ((4, 256, 64), (4, 64, 896)), "attn_pv_4x256x896x64": ((4, 256, 896), (4, 896, 64))}
    for name, (sa, sb) in tiles.items():
        a = jax.random.normal(key, sa).astype(jnp.bfloat16)
        b = jax.random.normal(jax.random.PRNGKey(1), sb).astype(jnp.bfloat16)
        dot = jax.jit(lambda a, b: lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32))
        out[f"matmul_{name}_bfloat16_gflops"] = round(2 * math.prod(sa) * sb[-1] / _median_ms(dot, a, b, repeats=args.repeats) / 1e6, 1)
    from golfjax.model.cpu_ops import causal_attention

    ks = jax.random.split(key, 4)
    q, g = (jax.random.normal(k, (1, 1024, 8, 64)).astype(jnp.bfloat16) for k in ks[:2])
    k_, v = (jax.random.normal(k, (1, 1024, 4, 64)).astype(jnp.bfloat16) for k in ks[2:])
    fwd_bwd = jax.jit(lambda q, k, v, g: jax.vjp(causal_attention, q, k, v)[1](g))
    out["attention_fwd_bwd_1x1024x8x64_bfloat16_ms"] = round(_median_ms(fwd_bwd, q, k_, v, g, repeats=args.repeats), 2)
    from golfjax.model import fused_attention
    from golfjax.model.layers import qk_norm_rotary, rms_norm, rotary_tables

    args_r = args.repeats
    for dtype in (jnp.bfloat16, jnp.float32):  # the fused kernel (model.attention_impl "fused"), same shapes
        name = jnp.dtype(dtype).name
        reason = fused_attention.unavailable_reason(dtype)
        if reason is not None:
            out[f"fused_attention_{name}"] = f"unavailable: {reason}"
            continue
        xs = [a.astype(dtype) for a in (q, k_, v, g)]
        fwd = jax.jit(fused_attention.causal_attention)
        fwd_bwd = jax.jit(lambda q, k, v, g: jax.vjp(fused_attention.causal_attention, q, k, v)[1](g))
        out[f"fused_attention_fwd_1x1024x8x64_{name}_ms"] = round(_median_ms(fwd, *xs[:3], repeats=args_r), 2)
        out[f"fused_attention_fwd_bwd_1x1024x8x64_{name}_ms"] = round(_median_ms(fwd_bwd, *xs, repeats=args_r), 2)
        # the q/k RMSNorm + rotary + q_gain before the attention: XLA's ops against the kernel
        cos, sin = rotary_tables(1024, 64, 10000.0)
        gain = jnp.ones((8,), jnp.float32)
        xla_prep = lambda x, gain: qk_norm_rotary(x, cos, sin, gain, "cpu")
        kernel_prep = lambda x, gain: fused_attention.norm_rotary(x, cos, sin, gain)
        for label, prep in (("xla", xla_prep), ("fused", kernel_prep)):
            vjp = jax.jit(lambda x, gain, g, f=prep: jax.vjp(f, x, gain)[1](g))
            out[f"qk_norm_rotary_fwd_bwd_1x1024x8x64_{name}_{label}_ms"] = round(
                _median_ms(vjp, xs[0], gain, xs[3], repeats=args_r), 3)
        # a block's RMSNorm of the residual stream (one micro-batch: 1,024 x 512)
        h = xs[0].reshape(1, 1024, 512)
        for label, norm in (("xla", rms_norm), ("fused", fused_attention.rms_norm)):
            vjp = jax.jit(lambda h, g, f=norm: jax.vjp(f, h)[1](g))
            out[f"block_rms_norm_fwd_bwd_1x1024x512_{name}_{label}_ms"] = round(
                _median_ms(vjp, h, xs[3].reshape(h.shape), repeats=args_r), 3)
    xla_f32 = jax.jit(lambda q, k, v, g: jax.vjp(causal_attention, q, k, v)[1](g))
    out["attention_fwd_bwd_1x1024x8x64_float32_ms"] = round(
        _median_ms(xla_f32, *(a.astype(jnp.float32) for a in (q, k_, v, g)), repeats=args_r), 2)

    from golfjax.optim.muon import orthogonalized_direction

    stacks = {"c_q": (512, 512), "c_k": (512, 256), "c_v": (512, 256), "proj": (512, 512),
              "fc": (512, 1024), "mlp_proj": (1024, 512)}
    for rounding in ("eager", "compiled"):
        total = 0.0
        for name, (fan_in, fan_out) in stacks.items():
            g = jax.random.normal(key, (9, fan_in, fan_out))
            fn = jax.jit(lambda g, r=rounding: orthogonalized_direction(g, rounding=r))
            ms = _median_ms(fn, g, repeats=max(1, args.repeats // 4))
            out[f"muon_direction_{rounding}_{name}_ms"] = round(ms, 2)
            total += ms
        out[f"muon_direction_{rounding}_all_stacks_ms"] = round(total, 1)
    out["cpus"] = len(os.sched_getaffinity(0))
    out["backend"] = jax.default_backend()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    run_main(main)
