"""Train a golfjax config end to end: train, export, reload, score.

    python scripts/train.py --config configs/smoke.py [--set train.iterations=50]
    python scripts/train.py --config C --run-dir runs/a --checkpoint-every 100   # resumable
    python scripts/train.py --run-dir runs/a --resume                            # continue it

The reference's environment variables (NUM_LAYERS=..., DATA_PATH=...) work too.
--resume continues the run in --run-dir from its latest complete checkpoint
with the checkpoint's config; --config/--set/environment values may change
only the run's length, clock, logging, checkpoint cadence, paths and export.
SIGTERM or Ctrl-C saves a checkpoint after the current step and exits with
status 128 + signal (143, 130); Ctrl-C twice aborts without saving.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import add_config_args, run_main, setup_devices


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The checkpoint flags as --set items (they win over --set)."""
    items = []
    if args.run_dir is not None:
        items.append(f"train.run_dir={args.run_dir}")
    if args.checkpoint_every is not None:
        items.append(f"train.checkpoint_every={args.checkpoint_every}")
    if args.keep_checkpoints is not None:
        items.append(f"train.keep_checkpoints={args.keep_checkpoints}")
    if args.resume:
        items.append("train.resume=true")
    if args.profile is not None:
        items.append(f"train.profile={args.profile}")
    return items


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--run-dir", help="the run directory (logs, checkpoints, artifact); "
                                          "default <train.out_dir>/<train.run_id or a timestamp>")
    parser.add_argument("--checkpoint-every", type=int, metavar="N",
                        help="save the whole training state every N steps (default 0: only on SIGTERM/Ctrl-C)")
    parser.add_argument("--keep-checkpoints", type=int, metavar="K", help="keep the last K checkpoints (default 3)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its latest complete checkpoint")
    parser.add_argument("--profile", metavar="START:STOP",
                        help="trace steps START..STOP-1 (log numbering) with jax.profiler into RUN_DIR/profile")
    parser.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=None,
                        help="join a multi-process run (jax.distributed); default: when the JAX_*/torchrun/"
                             "SLURM/Open MPI environment describes more than one process")
    args = parser.parse_args()
    setup_devices(args.cpu_devices)

    from golfjax.config import ConfigError, apply_env, apply_overrides, resolve, validate

    overrides = [*args.overrides, *flag_overrides(args)]
    if args.config:
        cfg, env_used = resolve(args.config, overrides)  # before importing jax: config mistakes fail fast
    elif args.resume:
        run_dir = args.run_dir or os.environ.get("RUN_DIR")
        if not run_dir:
            raise ConfigError("--resume needs the directory of the run to continue: pass --run-dir DIR")
        from golfjax.checkpoint import saved_config

        cfg, env_used = apply_env(saved_config(run_dir))
        cfg = apply_overrides(cfg, overrides)
        validate(cfg)
    else:
        raise ConfigError("--config FILE is required to start a run (configs/smoke.py, configs/baseline.py, ...); "
                          "to continue one, pass --run-dir DIR --resume")
    from golfjax.parallel import initialize_distributed

    info = initialize_distributed(args.distributed)
    if info is not None:
        print(info.describe())
    from golfjax.train.loop import RunInterrupted, run

    if env_used:
        print("environment overrides: " + " ".join(f"{k}={v}" for k, v in sorted(env_used.items())))
    try:
        run(cfg)
    except RunInterrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return stop.exit_status
    return 0


if __name__ == "__main__":
    from golfjax.parallel import fail_fast

    with fail_fast():  # in a multi-process run, a failing process ends the others at once
        run_main(main)
