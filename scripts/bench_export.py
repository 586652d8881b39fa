"""Export recipes side by side on one trained model: artifact bytes, round-trip BPB gap, export time.

    python scripts/bench_export.py --checkpoint runs/cpu-bench/checkpoint --out-dir runs/cpu-bench/exports \
        --schemes int8-zlib,int6-zstd,int6-brotli,gptq-int6-sdclip,gptq-lqer-pergroup

A scheme may name a codec after "@" to try another codec with the same
quantization (e.g. int6-brotli@pergroup). For every scheme: export (timed:
quantization incl. GPTQ calibration, then compression and writing), reload
the artifact and evaluate it with the checkpoint's eval settings through the
Evaluator; the gap is against the unquantized params. Prints a Markdown table
(bytes relative to the first scheme) and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import run_main, setup_devices


def markdown(rows: list[dict]) -> list[str]:
    ref = rows[0]["model_bytes"]
    lines = ["| scheme | codec | model bytes | x first | total bytes (+code) | roundtrip BPB | gap vs float | "
             "quantize s | compress+write s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['codec']} | {r['model_bytes']:,} | {r['model_bytes'] / ref:.3f} | "
                     f"{r['total_bytes']:,} | {r['val_bpb']:.4f} | {r['gap']:+.4f} | {r['quantize_seconds']:.1f} | "
                     f"{r['write_seconds']:.1f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a golfjax checkpoint (carries its config)")
    parser.add_argument("--out-dir", required=True, help="where the artifacts go")
    parser.add_argument("--schemes", default="int8-zlib,int6-zstd,int6-brotli,gptq-int6-sdclip,gptq-lqer-pergroup")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field for every export (e.g. export.quant_calib_batches=4)")
    parser.add_argument("--cpu-devices", type=int, default=0, metavar="N")
    args = parser.parse_args()
    setup_devices(args.cpu_devices)

    from golfjax import checkpoint
    from golfjax.config import apply_overrides
    from golfjax.eval.evaluator import Evaluator, load_byte_sidecar, load_validation_stream
    from golfjax.export.pipeline import export_params, get_recipe, load_artifact_params
    from golfjax.parallel import make_mesh, put_replicated
    from golfjax.train.data_setup import load_eval_data

    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    for spec in schemes:
        get_recipe(spec.split("@")[0])
    cfg, params = checkpoint.load_model(args.checkpoint)
    cfg = apply_overrides(cfg, args.overrides)
    data = load_eval_data(cfg)
    tokens = load_validation_stream(cfg)
    mesh = make_mesh()
    evaluator = Evaluator(cfg, mesh, data.tables, bos_id=int(data.tokenizer.bos_id()),
                          byte_sidecar=load_byte_sidecar(cfg, len(tokens)), progress=False)
    t = time.perf_counter()
    float_bpb = evaluator.evaluate(put_replicated(params, mesh), tokens).val_bpb
    print(f"float val_bpb:{float_bpb:.6f} eval:{time.perf_counter() - t:.1f}s", flush=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    for spec in schemes:
        scheme, _, codec = spec.partition("@")
        run_cfg = replace(cfg, export=replace(cfg.export, codec=codec)) if codec else cfg
        try:
            report = export_params(params, run_cfg, out_dir / f"{spec.replace('@', '_at_')}.golf", scheme)
        except (ValueError, RuntimeError) as exc:  # e.g. "not implemented yet": report it, go on
            print(f"{spec}: failed: {exc}", flush=True)
            failed.append({"scheme": spec, "error": str(exc)})
            continue
        _, q_params = load_artifact_params(report.path)
        result = evaluator.evaluate(put_replicated(q_params, mesh), tokens)
        row = {"scheme": spec, "codec": report.codec, "model_bytes": report.model_bytes,
               "total_bytes": report.total_bytes, "val_bpb": result.val_bpb, "gap": result.val_bpb - float_bpb,
               "quantize_seconds": report.quantize_seconds, "write_seconds": report.write_seconds,
               "streams": [f"{s['name']}:{s['codec']}" for s in report.streams]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for line in markdown(rows) if rows else []:
        print(line)
    print(json.dumps({"float_val_bpb": float_bpb, "rows": rows, "failed": failed}))
    return 0


if __name__ == "__main__":
    run_main(main)
