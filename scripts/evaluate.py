"""Score a model on a validation split; the last line printed is one JSON object.

    python scripts/evaluate.py --artifact final_model.golf --data-dir D --tokenizer T
    python scripts/evaluate.py --checkpoint runs/ID/checkpoint --data-dir D --tokenizer T
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

from golfjax.cli import add_config_args, run_main, setup_devices


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifact", help="a golfjax artifact (.golf)")
    source.add_argument("--checkpoint", help="a golfjax checkpoint directory")
    source.add_argument("--reference-state", help="a reference state dict (.npz, or .pt with torch)")
    parser.add_argument("--data-dir", help="directory of fineweb_val_*.bin shards (default: the config's)")
    parser.add_argument("--tokenizer", help="SentencePiece .model (default: the config's)")
    parser.add_argument("--check-bytes", action="store_true",
                        help="also decode the validation tokens and compare the byte count with the tables'")
    add_config_args(parser)
    args = parser.parse_args()
    setup_devices(args.cpu_devices)

    import jax
    from golfjax import checkpoint, interop
    from golfjax.config import apply_overrides, resolve
    from golfjax.data.loader import default_grad_accum_steps, load_validation_tokens
    from golfjax.data.shards import list_shards
    from golfjax.data.tokenizer import build_byte_tables, load_tokenizer
    from golfjax.eval import bpb
    from golfjax.eval.plain import eval_batch_seqs, evaluate_plain
    from golfjax.export.pipeline import load_artifact_params
    from golfjax.parallel import make_mesh, num_ranks, put_replicated

    if args.reference_state:
        cfg, _ = resolve(args.config, args.overrides)
        state = interop.load_reference_state(args.reference_state)
        try:
            params = interop.from_reference_state(state, cfg.model)
        except interop.InteropError as exc:  # name the file: the message alone names only the model
            raise interop.InteropError(f"{args.reference_state}: {exc}") from None
    else:
        if args.artifact:
            cfg, params = load_artifact_params(args.artifact)
        else:
            cfg = checkpoint.load_config(args.checkpoint)
            params = checkpoint.load_params(args.checkpoint, cfg)
        cfg = apply_overrides(cfg, args.overrides)
    data = replace(cfg.data, data_path=args.data_dir or cfg.data.data_path,
                   tokenizer_path=args.tokenizer or cfg.data.tokenizer_path)
    sp = load_tokenizer(data.tokenizer_path, cfg.model.vocab_size)
    tables = build_byte_tables(sp, cfg.model.vocab_size)
    seq_len = cfg.train.train_seq_len
    val_tokens = load_validation_tokens(list_shards(data.data_path, data.val_pattern), seq_len)

    mesh = make_mesh()
    ranks = num_ranks(mesh)
    grad_accum = cfg.train.grad_accum_steps or default_grad_accum_steps(ranks)
    seqs = eval_batch_seqs(cfg.eval.val_batch_size, seq_len, ranks, grad_accum)
    result = evaluate_plain(put_replicated(params, mesh), cfg.model, val_tokens, tables, mesh, seq_len, seqs)
    out = result.as_dict()
    if args.check_bytes:
        decoded = bpb.decoded_utf8_bytes(sp, val_tokens)
        out["decoded_bytes"] = decoded
        out["bytes_match"] = decoded == result.bytes
    out["devices"] = ranks
    print(json.dumps(out))
    return 0 if out.get("bytes_match", True) else 1


if __name__ == "__main__":
    run_main(main)
