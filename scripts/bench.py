"""Benchmark the jitted train step (a benchmark, not a test).

    python scripts/bench.py --config configs/baseline.py --set train.train_batch_tokens=8192 --steps 10

Times the compiled step on synthetic tokens after compilation and prints, as
its last line, one JSON object: tokens_per_s, step_ms (median), model_flops_per_s,
fraction_of_peak (of the fp32 matmul peak measured in the same run), peak_rss_mb.
Model FLOPs per token = 6 * (matmul params incl. the head) + 6 * layers * seq_len * dim
(causal attention scores and values, forward + backward).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import add_config_args, run_main, setup_devices


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
    """Best-of-N float32 jitted matmul throughput on this machine, in FLOP/s."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def model_flops_per_token(cfg) -> float:
    m = cfg.model
    from golfjax.model.gpt import mlp_hidden

    head_dim = m.model_dim // m.num_heads
    kv = m.num_kv_heads * head_dim
    per_layer = m.model_dim * (2 * m.model_dim + 2 * kv) + 2 * m.model_dim * mlp_hidden(m)
    matmul_params = m.num_layers * per_layer + m.model_dim * m.vocab_size
    return 6.0 * matmul_params + 6.0 * m.num_layers * cfg.train.train_seq_len * m.model_dim


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, required=True)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after compilation")
    args = parser.parse_args()
    setup_devices(args.cpu_devices)

    import jax
    import jax.numpy as jnp

    from golfjax.config import resolve
    from golfjax.model import gpt
    from golfjax.parallel import make_mesh, num_ranks
    from golfjax.train.synthetic import synthetic_step

    cfg, _ = resolve(args.config, args.overrides)
    mesh = make_mesh()
    ranks = num_ranks(mesh)
    t0 = time.perf_counter()
    bench = synthetic_step(cfg, mesh)
    compile_s = time.perf_counter() - t0
    bench.run()  # one untimed step (allocation warm-up)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        bench.run()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = bench.tokens_per_step
    flops = model_flops_per_token(cfg) * tokens / step_s
    peak = matmul_peak_flops()
    result = {
        "tokens_per_s": round(tokens / step_s, 1),
        "step_ms": round(1000 * step_s, 2),
        "step_ms_min": round(1000 * min(times), 2),
        "model_flops_per_s": round(flops, 1),
        "fraction_of_peak": round(flops / peak, 4),
        "matmul_peak_flops_per_s": round(peak, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "compile_s": round(compile_s, 2),  # init + compile
        "tokens_per_step": tokens,
        "steps": args.steps,
        "devices": ranks,
        "backend": jax.default_backend(),
        "compute_dtype": jnp.dtype(gpt.resolve_compute_dtype(cfg.model.compute_dtype)).name,
        "attention_impl": gpt.resolve_attention_impl(cfg.model.attention_impl,
                                                     gpt.resolve_compute_dtype(cfg.model.compute_dtype)),
        "muon_ns_dtype": cfg.optim.muon_ns_dtype,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}".strip(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run_main(main)
