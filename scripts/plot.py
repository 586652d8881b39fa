"""PNG plots of a run: train loss and val BPB against step and against wall-clock.

    python scripts/plot.py runs/RUN_ID

Reads RUN_DIR/metrics.jsonl and writes RUN_DIR/curves.png (one figure, 2x2
panels: train loss / val BPB by step and by training time); prints its path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import run_main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory holding metrics.jsonl")
    args = parser.parse_args()

    from golfjax.plots import write_run_plots

    metrics = args.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"no metrics.jsonl in {args.run_dir} (give the run directory, runs/<run id>)")
    written = write_run_plots(args.run_dir)
    if not written:
        raise ValueError(f"{metrics} has no train or val records to plot yet")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    run_main(main)
