"""Time the forward and the forward+backward of one batch of the model (no optimizer).

    python scripts/bench_fwd_bwd.py --config configs/baseline.py [--batch 1]
    XLA_FLAGS=... python scripts/bench_fwd_bwd.py --config configs/baseline.py   # compare XLA options

Prints one JSON line: min over --repeats of ms per sequence, forward and forward+backward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import add_config_args, run_main, setup_devices


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, required=True)
    parser.add_argument("--batch", type=int, default=1, help="sequences per call")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    setup_devices(args.cpu_devices)

    import jax
    import numpy as np

    from golfjax.config import resolve
    from golfjax.model import gpt

    cfg, _ = resolve(args.config, args.overrides)
    m = cfg.model
    params = gpt.init_params(m, jax.random.PRNGKey(0))
    x = np.random.default_rng(0).integers(0, m.vocab_size, (args.batch, cfg.train.train_seq_len), dtype=np.int32)
    forward = jax.jit(lambda p, t: gpt.loss(p, m, t, t))
    both = jax.jit(jax.value_and_grad(lambda p, t: gpt.loss(p, m, t, t)))
    jax.block_until_ready(forward(params, x))
    jax.block_until_ready(both(params, x))
    times = {"fwd": [], "fwd_bwd": []}
    for _ in range(args.repeats):
        for name, fn in (("fwd", forward), ("fwd_bwd", both)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, x))
            times[name].append(time.perf_counter() - t0)
    print(json.dumps({f"{k}_ms_per_seq": round(1000 * min(v) / args.batch, 1) for k, v in times.items()}
                     | {"batch": args.batch, "xla_flags": os.environ.get("XLA_FLAGS", "")}))
    return 0


if __name__ == "__main__":
    run_main(main)
