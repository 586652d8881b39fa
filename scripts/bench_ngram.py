"""Time the n-gram precompute (golfjax.eval.ngram) and project it to the challenge validation set.

    python scripts/bench_ngram.py --tokens 8000000 --vocab 1024
    python scripts/bench_ngram.py --tokens 8000000 --vocab 8192 --tilt-orders 8:16:2

The stream is uniform random tokens: every high-order context is new, the worst
case for the sorts (real text repeats more). Prints wall and CPU seconds per mode,
tokens/s, and the projection to 62,021,632 tokens (sp1024 validation, linear in
the token count; the sorts are n log n, so add about 15% from 8M to 62M tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from golfjax.eval import ngram  # noqa: E402

VAL_TOKENS_SP1024 = 62_021_632


def _time(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4_000_000)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--interp-orders", default="1,2,3,4")
    p.add_argument("--tilt-orders", default="8:16:2")
    p.add_argument("--project", type=int, default=VAL_TOKENS_SP1024, help="tokens to project to")
    args = p.parse_args()
    tokens = np.random.default_rng(0).integers(0, args.vocab, args.tokens).astype(np.uint16)
    orders_i = ngram.parse_orders(args.interp_orders)
    orders_t = ngram.parse_orders(args.tilt_orders)
    conf, count = ngram.a2_thresholds(orders_t)
    specs = {
        f"interp {args.interp_orders}": ngram.NgramSpec(mode="interp", orders=orders_i),
        f"tilt {args.tilt_orders}": ngram.NgramSpec(mode="tilt", orders=orders_t, min_confidence=conf, min_count=count),
    }
    for name, spec in specs.items():
        wall, cpu = _time(lambda: ngram.position_mix_from_spec(spec, tokens, args.vocab))
        row = {"mode": name, "tokens": args.tokens, "vocab": args.vocab, "wall_s": round(wall, 2),
               "cpu_s": round(cpu, 2), "tokens_per_s_wall": round(args.tokens / wall),
               "projected_wall_s": round(wall * args.project / args.tokens, 1), "projected_tokens": args.project}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
