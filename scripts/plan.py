"""Plan a config on a CPU: parameters, artifact bytes, FLOPs and projected 8xH100 step time.

    python scripts/plan.py --config configs/baseline.py
    python scripts/plan.py --config configs/cpu_track/baseline.py --checkpoint runs/ID/checkpoint --measure-codec
    python scripts/plan.py --config configs/baseline.py --set model.num_layers=11 --mfu 0.3

The full-size train step is traced and lowered on abstract shapes (nothing of
the training state is allocated); the artifact is estimated from the entropy
of the quantized weights of a Gaussian-filled init (or --checkpoint). The
human-readable table ends with one JSON line (params, est_artifact_bytes,
flops_per_step, projected_step_ms_8xh100, projected_steps_600s, ...).
See golfjax/plan.py and docs/PLANNER.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import run_main


def main() -> int:
    from golfjax.plan import DEFAULT_GPUS, DEFAULT_MFU

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file (configs/NAME.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field (repeatable)")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help="model FLOP utilisation assumed for the projection (default %(default)s: what the "
                             "reference baseline measures by this FLOP count)")
    parser.add_argument("--gpus", type=int, default=DEFAULT_GPUS, help="H100s (default %(default)s)")
    parser.add_argument("--checkpoint", default=None, help="cost these weights (a params checkpoint of the same model)")
    parser.add_argument("--measure-codec", action="store_true",
                        help="also write the real artifact of those weights and report its size")
    parser.add_argument("--compile", action="store_true",
                        help="use the compiled program's cost analysis (XLA:CPU; slow at full size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Gaussian weights")
    parser.add_argument("--weight-std", type=float, default=1.0,
                        help="std of the Gaussian weight matrices costed without --checkpoint (default 1: every "
                             "int8 row above the 1/127 scale floor, the upper end)")
    args = parser.parse_args()

    from golfjax.config import resolve

    cfg, _ = resolve(args.config, args.overrides)
    from golfjax.plan import format_plan, plan_config

    plan = plan_config(cfg, name=args.config, mfu=args.mfu, gpus=args.gpus, checkpoint=args.checkpoint,
                       measure_codec=args.measure_codec, compile=args.compile, seed=args.seed,
                       weight_std=args.weight_std)
    print(format_plan(plan))
    print(plan.as_json())
    return 0


if __name__ == "__main__":
    run_main(main)
