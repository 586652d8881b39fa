"""Turn a golfjax checkpoint or a reference state into a scored-size artifact.

    python scripts/export.py --checkpoint runs/ID/checkpoint --out model.golf
    python scripts/export.py --checkpoint runs/ID --out model.golf --scheme int6-brotli
    python scripts/export.py --checkpoint runs/ID/checkpoint --out m.golf --scheme gptq-lqer-pergroup --measure-codecs
    NUM_LAYERS=2 MODEL_DIM=64 ... python scripts/export.py --reference-state final_state.npz --out model.golf

Schemes (recipes of golfjax.export.pipeline.SCHEMES): int8-zlib (the
reference), int6-zstd, int6-brotli, gptq-int6-sdclip, gptq-lqer-pergroup,
custom (the config's quant_* fields). `--set export.codec=lzma` replaces a
scheme's codec. Prints the size report (model bytes, code bytes and the files
counted, total against the 16,000,000-byte limit; an over-budget artifact is an
error); the last line is one JSON object (model_bytes, code_bytes, total_bytes,
scheme, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import add_config_args, add_model_source_args, load_model_source, run_main, setup_devices

MEASURED_CODECS = ("none", "zlib", "zstd", "brotli", "lzma", "shuffle2+brotli", "shuffle2+lzma")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(parser, artifact=False)
    parser.add_argument("--out", required=True, help="artifact file to write")
    parser.add_argument("--scheme", default=None, help="export scheme (default: the config's export.scheme)")
    parser.add_argument("--measure-codecs", action="store_true",
                        help="also compress the quantized payload with every codec and report bytes and seconds")
    add_config_args(parser)
    args = parser.parse_args()
    setup_devices(args.cpu_devices)

    from golfjax.export import artifact, codec
    from golfjax.export.pipeline import export_params, get_recipe

    if args.scheme is not None:
        get_recipe(args.scheme)  # an unknown name fails before the model is loaded
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
    result = report.as_dict()
    if args.measure_codecs:
        rows = codec.measure(artifact.raw_payload(artifact.read_artifact(out)[1]), MEASURED_CODECS)
        for row in rows:
            print(f"codec:{row['codec']} bytes:{row['bytes']} ratio:{row['ratio']:.3f} "
                  f"compress:{row['compress_s']:.2f}s decompress:{row['decompress_s']:.2f}s")
        result["codecs"] = rows
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run_main(main)
