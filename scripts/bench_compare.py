"""Ratios of train-step times between config variants, in ONE process, steps interleaved.

    python scripts/bench_compare.py --config configs/baseline.py --set train.train_batch_tokens=8192 \
        --variant bf16:model.compute_dtype=bfloat16 --variant xla:model.attention_impl=xla --steps 3

Each `--variant NAME:KEY=VALUE[,KEY=VALUE...]` is the config with those
overrides on top of `--set`; the config as given is always the variant
"default". All variants are compiled first (same seed, so the same random
batch), then timed step by step in turn, so that other load on the machine
hits every variant alike and the ratios stay meaningful where the absolute
times do not. Prints one JSON line: median step ms and tokens/s of each,
speedup of each over "default", and the first (untimed) step's loss of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import add_config_args, run_main, setup_devices


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name:a.b=1,c.d=x' -> ('name', ['a.b=1', 'c.d=x'])."""
    name, sep, overrides = text.partition(":")
    if not sep or not name or not overrides:
        raise SystemExit(f"error: --variant wants NAME:KEY=VALUE[,KEY=VALUE...], got {text!r}")
    return name, [o for o in overrides.split(",") if o]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, required=True)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="a config variant to time against the config as given (repeatable)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    args = parser.parse_args()
    setup_devices(args.cpu_devices)

    from golfjax.config import apply_overrides, resolve, validate
    from golfjax.parallel import make_mesh
    from golfjax.train.synthetic import synthetic_step

    cfg, _ = resolve(args.config, args.overrides)
    specs = [("default", [])] + [parse_variant(v) for v in args.variant]
    if len({name for name, _ in specs}) != len(specs):
        raise SystemExit("error: --variant names must be distinct and not 'default'")
    mesh = make_mesh()
    variants = {}
    for name, overrides in specs:
        vcfg = apply_overrides(cfg, overrides)
        validate(vcfg)
        t0 = time.perf_counter()
        step = synthetic_step(vcfg, mesh)
        compile_s = time.perf_counter() - t0
        first_loss = float(step.run()["train_loss"])  # untimed warm-up step
        variants[name] = {"step": step, "times": [], "first_loss": first_loss, "compile_s": compile_s}
    for _ in range(args.steps):
        for v in variants.values():
            t0 = time.perf_counter()
            v["step"].run()
            v["times"].append(time.perf_counter() - t0)
    base_ms = 1000 * statistics.median(variants["default"]["times"])
    result = {}
    for name, v in variants.items():
        ms = 1000 * statistics.median(v["times"])
        result[name] = {
            "step_ms": round(ms, 1),
            "tokens_per_s": round(1000 * v["step"].tokens_per_step / ms, 1),
            "speedup_vs_default": round(base_ms / ms, 3),
            "first_step_loss": round(v["first_loss"], 6),
            "compile_s": round(v["compile_s"], 1),
            "times_ms": [round(1000 * s) for s in v["times"]],
        }
    print(json.dumps({"variants": result, "steps": args.steps}))
    return 0


if __name__ == "__main__":
    run_main(main)
