"""Before/after ratio of the train step in ONE process, steps interleaved.

    python scripts/bench_compare.py --config configs/baseline.py --set train.train_batch_tokens=8192 --steps 3

"plain" = jax.nn.dot_product_attention (attention_impl=xla) with the layer scan
rolled (the code before the CPU optimisations); "default" = the config as given
(on CPU: blocked attention, unrolled layers). Alternating the two variants
step by step makes the ratio robust to other load on the machine. Prints one
JSON line: median step ms of each and default/plain speedup.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import add_config_args, run_main, setup_devices


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, required=True)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    args = parser.parse_args()
    setup_devices(args.cpu_devices)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from golfjax.config import resolve
    from golfjax.data.loader import default_grad_accum_steps
    from golfjax.model import gpt
    from golfjax.optim.build import build_optimizer
    from golfjax.parallel import make_mesh, num_ranks, put_replicated, put_sharded
    from golfjax.train.step import init_state, make_train_step

    cfg, _ = resolve(args.config, args.overrides)
    t = cfg.train
    mesh = make_mesh()
    ranks = num_ranks(mesh)
    accum = t.grad_accum_steps or default_grad_accum_steps(ranks)
    seqs = ranks * (t.train_batch_tokens // (ranks * accum)) // t.train_seq_len
    rng = np.random.default_rng(0)
    shape = (accum, seqs, t.train_seq_len)
    x = put_sharded(rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32), mesh, 1)
    y = put_sharded(rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32), mesh, 1)
    lr = jnp.float32(1.0)

    variants = {}
    for name in ("plain", "default"):
        vcfg = replace(cfg, model=replace(cfg.model, attention_impl="xla")) if name == "plain" else cfg
        saved = gpt.MAX_UNROLLED_LAYERS
        if name == "plain":
            gpt.MAX_UNROLLED_LAYERS = 0
        params = gpt.init_params(vcfg.model, jax.random.PRNGKey(t.seed))
        tx = build_optimizer(params, vcfg.optim, vcfg.model.tie_embeddings)
        state = put_replicated(init_state(vcfg, params, tx), mesh)
        step_fn, _ = make_train_step(vcfg, mesh, tx)
        compiled = step_fn.lower(state, x, y, lr).compile()
        gpt.MAX_UNROLLED_LAYERS = saved
        state, metrics = compiled(state, x, y, lr)  # untimed warm-up step
        jax.block_until_ready(metrics)
        variants[name] = [compiled, state, [], float(metrics["train_loss"])]
    for _ in range(args.steps):
        for name, v in variants.items():
            t0 = time.perf_counter()
            v[1], metrics = v[0](v[1], x, y, lr)
            jax.block_until_ready(metrics)
            v[2].append(time.perf_counter() - t0)
    ms = {name: 1000 * statistics.median(v[2]) for name, v in variants.items()}
    tokens = accum * seqs * t.train_seq_len
    print(json.dumps({
        "plain_step_ms": round(ms["plain"], 1), "default_step_ms": round(ms["default"], 1),
        "plain_tokens_per_s": round(1000 * tokens / ms["plain"], 1),
        "default_tokens_per_s": round(1000 * tokens / ms["default"], 1),
        "speedup": round(ms["plain"] / ms["default"], 3),
        "first_step_loss": {name: round(v[3], 6) for name, v in variants.items()},
        "plain_times_ms": [round(1000 * s) for s in variants["plain"][2]],
        "default_times_ms": [round(1000 * s) for s in variants["default"][2]],
        "steps": args.steps, "tokens_per_step": tokens,
    }))
    return 0


if __name__ == "__main__":
    run_main(main)
