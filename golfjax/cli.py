"""Shared command-line plumbing: config flags, device flags, user-error reporting.

A user mistake (bad path, corrupt shard, wrong vocab size, unknown --set key)
ends a script with one `error: ...` line and exit status 2, never a traceback.
Set GOLFJAX_DEBUG=1 to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable


def add_config_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--config", required=required, help="config file (configs/NAME.py) defining get_config()")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field; wins over the file and the environment (repeatable)")
    parser.add_argument("--cpu-devices", type=int, default=0, metavar="N",
                        help="on CPU, split the host into N virtual devices (test data parallelism)")


def setup_devices(cpu_devices: int) -> None:
    """Must run before jax initialises its backend."""
    if cpu_devices > 0:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}".strip()


def run_main(main: Callable[[], int | None]) -> None:
    """Run `main`, turning the user errors of golfjax into one clear line."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    # OSError: any file-system refusal (missing file, a directory given for a
    # file, no permission, disk full); its message names the path.
    except (ValueError, OSError, RuntimeError) as exc:
        if os.environ.get("GOLFJAX_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
