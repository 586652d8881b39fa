"""Train a golfjax config end to end: train, export, reload, score.

    python scripts/train.py --config configs/smoke.py [--set train.iterations=50]

The reference's environment variables (NUM_LAYERS=..., DATA_PATH=...) work too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import add_config_args, run_main, setup_devices


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, required=True)
    args = parser.parse_args()
    setup_devices(args.cpu_devices)

    from golfjax.config import resolve

    cfg, env_used = resolve(args.config, args.overrides)  # before importing jax: config mistakes fail fast
    from golfjax.train.loop import run

    if env_used:
        print("environment overrides: " + " ".join(f"{k}={v}" for k, v in sorted(env_used.items())))
    run(cfg)
    return 0


if __name__ == "__main__":
    run_main(main)
