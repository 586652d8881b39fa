"""Turn a golfjax checkpoint or a reference state into a scored-size artifact.

    python scripts/export.py --checkpoint runs/ID/checkpoint --out model.golf
    python scripts/export.py --checkpoint runs/ID --out model.golf    # latest training checkpoint
    NUM_LAYERS=2 MODEL_DIM=64 ... python scripts/export.py --reference-state final_state.npz --out model.golf

Prints the size report (model bytes, code bytes and the files counted, total
against the 16,000,000-byte limit); an over-budget artifact is an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import add_config_args, add_model_source_args, load_model_source, run_main, setup_devices


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(parser, artifact=False)
    parser.add_argument("--out", required=True, help="artifact file to write")
    parser.add_argument("--scheme", default=None, help="export scheme (default: the config's export.scheme)")
    add_config_args(parser)
    args = parser.parse_args()
    setup_devices(args.cpu_devices)

    from golfjax.export.pipeline import export_params

    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the artifact's file name (e.g. {out / 'model.golf'})")
    cfg, params = load_model_source(args)
    try:
        report = export_params(params, cfg, out, args.scheme)
    except OSError as exc:
        raise OSError(f"could not write the artifact {out}: {exc}") from exc
    for line in report.lines():
        print(line)
    print(json.dumps({"artifact": str(report.path), "scheme": report.scheme, "model_bytes": report.model_bytes,
                      "code_bytes": report.code_bytes, "total_bytes": report.total_bytes,
                      "limit_bytes": report.limit_bytes}))
    return 0


if __name__ == "__main__":
    run_main(main)
