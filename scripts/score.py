"""Score an artifact: what a grader runs. The last line printed is one JSON object.

    python scripts/score.py runs/ID/final_model.golf
    python scripts/score.py model.golf --data-dir data/datasets/fineweb10B_sp1024 \
        --tokenizer data/tokenizers/fineweb_1024_bpe.model

Verifies the artifact (format version, checksums; no pickle), rebuilds the
model from the artifact's own config, and evaluates it with the artifact's own
eval settings (eval.eval_mode, stride, TTT, ...) through the one Evaluator the
training run uses, so on the same validation data and device count it prints
exactly the val_bpb that ended the training run that wrote it (bytes from the
CaseOps sidecar when the artifact enables CaseOps, as evaluate.py). Also reports the
artifact against the size limit (model bytes = the file's size, code bytes by
the artifact's export.code_bytes_mode). Only the data location can be changed;
`--set` is for experiments and is listed in the output when used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import run_main, setup_devices, with_data_paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="a golfjax artifact (.golf)")
    parser.add_argument("--data-dir", help="directory of the validation shards (default: the artifact's config)")
    parser.add_argument("--tokenizer", help="SentencePiece .model (default: the artifact's config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one of the artifact's settings (not what a grader does; reported)")
    parser.add_argument("--cpu-devices", type=int, default=0, metavar="N",
                        help="on CPU, split the host into N virtual devices")
    args = parser.parse_args()
    setup_devices(args.cpu_devices)

    from golfjax.config import apply_overrides, validate
    from golfjax.eval.evaluator import Evaluator, load_byte_sidecar, load_validation_stream
    from golfjax.export import artifact
    from golfjax.export.pipeline import load_artifact
    from golfjax.parallel import make_mesh, num_ranks, put_replicated
    from golfjax.train.data_setup import load_eval_data

    cfg, params, _, header = load_artifact(args.artifact)
    cfg = apply_overrides(cfg, args.overrides)
    cfg = with_data_paths(cfg, args.data_dir, args.tokenizer)
    validate(cfg)
    data = load_eval_data(cfg)
    tokens = load_validation_stream(cfg)
    mesh = make_mesh()
    evaluator = Evaluator(cfg, mesh, data.tables, bos_id=int(data.tokenizer.bos_id()),
                          byte_sidecar=load_byte_sidecar(cfg, len(tokens)), progress=False)
    report = evaluator.evaluate(put_replicated(params, mesh), tokens)
    size = artifact.size_report(Path(args.artifact).stat().st_size, artifact.code_files(),
                                cfg.export.artifact_limit_bytes, cfg.export.code_bytes_mode)
    for line in report.lines()[:-1]:
        print(line)
    print(artifact.format_size_report(size, label=str(header.get("scheme", "")).replace("-", "+")))
    out = {"artifact": str(args.artifact), "scheme": header.get("scheme"), "codec": header.get("codec"),
           **report.as_dict(), "model_bytes": size["model_bytes"], "code_bytes": size["code_bytes"],
           "code_bytes_mode": size["code_bytes_mode"], "total_bytes": size["total_bytes"],
           "limit_bytes": size["limit_bytes"], "fits": size["fits"], "devices": num_ranks(mesh)}
    if args.overrides:
        out["overrides"] = args.overrides
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    run_main(main)
