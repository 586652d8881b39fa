"""Shared command-line plumbing: config flags, device flags, user-error reporting.

A user mistake (bad path, corrupt shard, wrong vocab size, unknown --set key)
ends a script with one `error: ...` line and exit status 2, never a traceback.
Set GOLFJAX_DEBUG=1 to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable


def add_config_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--config", required=required, help="config file (configs/NAME.py) defining get_config()")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field; wins over the file and the environment (repeatable)")
    parser.add_argument("--cpu-devices", type=int, default=0, metavar="N",
                        help="on CPU, split the host into N virtual devices (test data parallelism)")


def add_model_source_args(parser: argparse.ArgumentParser, artifact: bool = True) -> None:
    """Where the weights come from: exactly one of artifact, checkpoint or reference state."""
    source = parser.add_mutually_exclusive_group(required=True)
    if artifact:
        source.add_argument("--artifact", help="a golfjax artifact (.golf); carries its own config")
    source.add_argument("--checkpoint", help="a golfjax checkpoint; carries its own config: <run>/checkpoint "
                                             "(the end of a run), a run directory (its latest training checkpoint) "
                                             "or <run>/checkpoints/<step>")
    source.add_argument("--reference-state",
                        help="a reference state dict (.npz, or .pt with torch); architecture from "
                             "--config, the reference environment variables and --set")


def load_model_source(args: argparse.Namespace):
    """(config, params) from the source chosen by `add_model_source_args`."""
    from golfjax import checkpoint, interop
    from golfjax.config import apply_overrides, resolve

    if args.reference_state:
        cfg, _ = resolve(args.config, args.overrides)
        return cfg, interop.load_reference_params(args.reference_state, cfg.model)
    if getattr(args, "artifact", None):
        from golfjax.export.pipeline import load_artifact_params

        cfg, params = load_artifact_params(args.artifact)
    else:
        cfg, params = checkpoint.load_model(args.checkpoint)
    return apply_overrides(cfg, args.overrides), params


def with_data_paths(cfg, data_dir: str | None, tokenizer: str | None):
    """`cfg` with the validation data directory and tokenizer replaced where given on the
    command line (--data-dir / --tokenizer of the scoring scripts); others keep the config's."""
    from dataclasses import replace

    return replace(cfg, data=replace(cfg.data, data_path=data_dir or cfg.data.data_path,
                                     tokenizer_path=tokenizer or cfg.data.tokenizer_path))


def setup_devices(cpu_devices: int) -> None:
    """Must run before jax initialises its backend."""
    if cpu_devices > 0:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}".strip()


class _DropReportedTracebacks(logging.Filter):
    """orbax logs the traceback of a failed background save (absl logger); golfjax reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.levelno >= logging.ERROR)


def run_main(main: Callable[[], int | None]) -> None:
    """Run `main`, turning the user errors of golfjax into one clear line."""
    if not os.environ.get("GOLFJAX_DEBUG"):
        logging.getLogger("absl").addFilter(_DropReportedTracebacks())
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
