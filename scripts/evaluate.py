"""Score a model on a validation split; the last line printed is one JSON object.

    python scripts/evaluate.py --artifact final_model.golf --data-dir D --tokenizer T
    python scripts/evaluate.py --checkpoint runs/ID/checkpoint --data-dir D --tokenizer T
    python scripts/evaluate.py --checkpoint runs/ID/checkpoints/400 --data-dir D --tokenizer T
    NUM_LAYERS=2 MODEL_DIM=64 ... python scripts/evaluate.py --reference-state final_state.npz \
        --data-dir D --tokenizer T

An artifact or checkpoint carries its own architecture; a reference state
takes it from --config, the reference's environment variables and --set.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import add_config_args, add_model_source_args, load_model_source, run_main, setup_devices


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(parser)
    parser.add_argument("--data-dir", help="directory of fineweb_val_*.bin shards (default: the config's)")
    parser.add_argument("--tokenizer", help="SentencePiece .model (default: the config's)")
    parser.add_argument("--check-bytes", action="store_true",
                        help="also decode the validation tokens and compare the byte count with the tables'")
    add_config_args(parser)
    args = parser.parse_args()
    setup_devices(args.cpu_devices)

    from golfjax.eval import bpb
    from golfjax.eval.plain import evaluate_config
    from golfjax.parallel import make_mesh, num_ranks, put_replicated
    from golfjax.train.data_setup import load_eval_data

    cfg, params = load_model_source(args)
    cfg = replace(cfg, data=replace(cfg.data, data_path=args.data_dir or cfg.data.data_path,
                                    tokenizer_path=args.tokenizer or cfg.data.tokenizer_path))
    data = load_eval_data(cfg)
    mesh = make_mesh()
    result = evaluate_config(put_replicated(params, mesh), cfg, data.val_tokens, data.tables, mesh)
    out = result.as_dict()
    if args.check_bytes:
        decoded = bpb.decoded_utf8_bytes(data.tokenizer, data.val_tokens)
        out["decoded_bytes"] = decoded
        out["bytes_match"] = decoded == result.bytes
    out["devices"] = num_ranks(mesh)
    print(json.dumps(out))
    return 0 if out.get("bytes_match", True) else 1


if __name__ == "__main__":
    run_main(main)
