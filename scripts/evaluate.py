"""Score a model on a validation split; the last line printed is one JSON object.

    python scripts/evaluate.py --artifact final_model.golf --data-dir D --tokenizer T
    python scripts/evaluate.py --checkpoint runs/ID/checkpoint --data-dir D --tokenizer T --mode sliding --stride 64
    python scripts/evaluate.py --checkpoint runs/ID/checkpoints/400 --data-dir D --tokenizer T --mode ttt
    NUM_LAYERS=2 MODEL_DIM=64 ... python scripts/evaluate.py --reference-state final_state.npz \
        --data-dir D --tokenizer T

An artifact or checkpoint carries its own architecture; a reference state
takes it from --config, the reference's environment variables and --set.
The mode and its settings are the config's eval section (`--set
eval.ttt_lr=0.005`, ...); --mode and --stride are shorthands. The JSON line
carries mode, val_loss, val_bpb, tokens_scored, bytes and seconds per phase.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import add_config_args, add_model_source_args, load_model_source, run_main, setup_devices, with_data_paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(parser)
    parser.add_argument("--data-dir", help="directory of fineweb_val_*.bin shards (default: the config's)")
    parser.add_argument("--tokenizer", help="SentencePiece .model (default: the config's)")
    parser.add_argument("--mode", help="eval.eval_mode: plain, sliding, ttt, sliding+ngram, ttt+ngram")
    parser.add_argument("--stride", type=int, help="eval.eval_stride of sliding / ttt windows")
    parser.add_argument("--check-bytes", action="store_true",
                        help="also decode the scored validation tokens and compare the byte count with the tables'")
    add_config_args(parser)
    args = parser.parse_args()
    shorthands = [f"eval.eval_mode={args.mode}"] if args.mode else []
    shorthands += [f"eval.eval_stride={args.stride}"] if args.stride is not None else []
    args.overrides = shorthands + args.overrides
    setup_devices(args.cpu_devices)

    from golfjax.config import validate
    from golfjax.eval import bpb
    from golfjax.eval.evaluator import Evaluator, load_byte_sidecar, load_validation_stream, plain_truncation
    from golfjax.parallel import make_mesh, num_ranks, put_replicated
    from golfjax.train.data_setup import load_eval_data

    cfg, params = load_model_source(args)
    cfg = with_data_paths(cfg, args.data_dir, args.tokenizer)
    validate(cfg)
    data = load_eval_data(cfg)
    tokens = load_validation_stream(cfg)
    mesh = make_mesh()
    evaluator = Evaluator(cfg, mesh, data.tables, bos_id=int(data.tokenizer.bos_id()),
                          byte_sidecar=load_byte_sidecar(cfg, len(tokens)))
    report = evaluator.evaluate(put_replicated(params, mesh), tokens)
    out = report.as_dict()
    if args.check_bytes:
        scored = tokens[:plain_truncation(len(tokens), cfg.train.train_seq_len)] if report.mode == "plain" else tokens
        decoded = bpb.decoded_utf8_bytes(data.tokenizer, scored)
        out["decoded_bytes"] = decoded
        out["bytes_match"] = decoded == report.bytes
    out["tokens"] = report.tokens_scored  # the name older callers read
    out["devices"] = num_ranks(mesh)
    for line in report.lines()[:-1]:
        print(line)
    print(json.dumps(out))
    return 0 if out.get("bytes_match", True) else 1


if __name__ == "__main__":
    run_main(main)
