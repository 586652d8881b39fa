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


    from golfjax.config import resolve
    from golfjax.model import gpt
    from golfjax.parallel import make_mesh
    from golfjax.train.synthetic import synthetic_step

    cfg, _ = resolve(args.config, args.overrides)
    mesh = make_mesh()

    variants = {}
    for name in ("plain", "default"):
        vcfg = replace(cfg, model=replace(cfg.model, attention_impl="xla")) if name == "plain" else cfg
        saved = gpt.MAX_UNROLLED_LAYERS
        if name == "plain":
            gpt.MAX_UNROLLED_LAYERS = 0
        step = synthetic_step(vcfg, mesh)  # same seed: the same random batch for both
        gpt.MAX_UNROLLED_LAYERS = saved
        first_loss = float(step.run()["train_loss"])  # untimed warm-up step
        variants[name] = (step, [], first_loss)
    for _ in range(args.steps):
        for name, (step, times, _) in variants.items():
            t0 = time.perf_counter()
            step.run()
            times.append(time.perf_counter() - t0)
    ms = {name: 1000 * statistics.median(v[1]) for name, v in variants.items()}
    tokens = variants["default"][0].tokens_per_step
    print(json.dumps({
        "plain_step_ms": round(ms["plain"], 1), "default_step_ms": round(ms["default"], 1),
        "plain_tokens_per_s": round(1000 * tokens / ms["plain"], 1),
        "default_tokens_per_s": round(1000 * tokens / ms["default"], 1),
        "speedup": round(ms["plain"] / ms["default"], 3),
        "first_step_loss": {name: round(v[2], 6) for name, v in variants.items()},
        "plain_times_ms": [round(1000 * s) for s in variants["plain"][1]],
        "default_times_ms": [round(1000 * s) for s in variants["default"][1]],
        "steps": args.steps, "tokens_per_step": tokens,
    }))
    return 0


if __name__ == "__main__":
    run_main(main)
