"""Evaluation benchmarks: BPB per mode on a trained model, and tokens/s per mode with a FLOP projection.

    # BPB of plain / sliding / sliding doc-isolated / TTT on the same targets
    python scripts/bench_eval.py quality --checkpoint runs/ID/checkpoint --data-dir D --tokenizer T \
        [--stride 64] [--set eval.ttt_lr=0.002 ...]
    # tokens/s per mode at the baseline shape (random weights), and the projected time
    # of the full 62,021,632-token validation set on 8xH100 from FLOP counts
    python scripts/bench_eval.py speed [--tokens 2049] [--stride 64]

Every mode in `quality` scores the targets the plain evaluator scores (the stream
truncated to whole sequences plus one), so the BPBs differ only by context and
adaptation. Each prints one JSON line per mode and a final summary line.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import add_config_args, run_main, setup_devices, with_data_paths

VAL_TOKENS_SP1024 = 62_021_632  # targets of the challenge's sp1024 validation set
H100_BF16_DENSE = 989e12  # FLOP/s per H100 SXM, dense bf16 (NVIDIA datasheet)


def forward_flops_per_token(cfg, seq_len: int) -> float:
    """Matmul FLOPs of one token's forward pass in a window of seq_len: 2 x weights it
    multiplies, plus causal attention (QK and AV over on average seq_len/2 keys), plus the head."""
    m = cfg.model
    d, layers = m.model_dim, m.num_layers
    kv = m.num_kv_heads * (d // m.num_heads)
    hidden = int(m.mlp_mult * d)
    per_layer = d * d * 2 + d * kv * 2 + 2 * d * hidden  # q, proj, k, v, fc, mlp proj
    attention = 2 * 2 * d * (seq_len / 2)
    return layers * (2 * per_layer + attention) + 2 * d * m.vocab_size


def projection(cfg, stride: int, mfu: float, ttt_epochs: int) -> dict:
    """Seconds for the full validation set on 8xH100 per mode, at a given model FLOP utilisation."""
    seq = cfg.train.train_seq_len
    f = forward_flops_per_token(cfg, seq)
    rate = 8 * H100_BF16_DENSE * mfu
    plain = VAL_TOKENS_SP1024 * f
    sliding = VAL_TOKENS_SP1024 * f * seq / stride  # every window computes seq positions, scores stride
    ttt = sliding + ttt_epochs * VAL_TOKENS_SP1024 * 3 * f  # + fwd+bwd (3x fwd) per epoch on every chunk
    return {"flops_per_token_fwd": f, "mfu": mfu, "plain_s": plain / rate, "sliding_s": sliding / rate,
            "ttt_s": ttt / rate, "plain_flops": plain, "sliding_flops": sliding, "ttt_flops": ttt}


def quality(args) -> int:
    from golfjax.cli import load_model_source
    from golfjax.config import validate
    from golfjax.eval.evaluator import Evaluator, load_validation_stream, plain_truncation
    from golfjax.parallel import make_mesh, put_replicated
    from golfjax.train.data_setup import load_eval_data

    cfg, params = load_model_source(args)
    cfg = with_data_paths(cfg, args.data_dir, args.tokenizer)
    validate(cfg)
    data = load_eval_data(cfg)
    tokens = load_validation_stream(cfg)
    if args.max_tokens:
        tokens = tokens[: args.max_tokens]
    tokens = tokens[: plain_truncation(len(tokens), cfg.train.train_seq_len)]
    mesh = make_mesh()
    params = put_replicated(params, mesh)
    e = replace(cfg.eval, eval_stride=args.stride)
    runs = {"plain": ("plain", {}), "sliding": ("sliding", {}), "sliding_doc": ("sliding", {"eval_doc_isolated": True}),
            "ttt": ("ttt", {}), "ttt_lora": ("ttt", {"ttt_variant": "lora"})}
    results = {}
    for name in args.modes.split(","):
        mode, extra = runs[name]
        c = replace(cfg, eval=replace(e, eval_mode=mode, **extra))
        rep = Evaluator(c, mesh, data.tables, bos_id=int(data.tokenizer.bos_id())).evaluate(params, tokens)
        results[name] = rep.as_dict()
        print(json.dumps({"run": name, **rep.as_dict()}), flush=True)
    first = next(iter(results))
    print(json.dumps({"summary": {k: {"val_bpb": v["val_bpb"], f"delta_vs_{first}": v["val_bpb"] - results[first]["val_bpb"],
                                      "tokens_scored": v["tokens_scored"]} for k, v in results.items()}}))
    return 0


def speed(args) -> int:
    import jax
    import numpy as np

    from golfjax.config import Config, resolve
    from golfjax.data.tokenizer import ByteTables
    from golfjax.eval.evaluator import Evaluator
    from golfjax.model import gpt
    from golfjax.parallel import make_mesh, put_replicated

    cfg, _ = resolve(args.config, args.overrides) if args.config else (Config(), {})
    seq = cfg.train.train_seq_len
    key = jax.random.PRNGKey(0)
    params = gpt.init_params(cfg.model, key)
    leaves, tree = jax.tree.flatten(params)  # move the zero-initialised projections off zero
    keys = jax.random.split(key, len(leaves))
    params = jax.tree.unflatten(tree, [a + 0.02 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
    v = cfg.model.vocab_size
    tables = ByteTables(np.ones(v, np.int16), np.zeros(v, bool), np.zeros(v, bool))  # 1 byte a token: speed only
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, v, args.tokens).astype(np.uint16)
    tokens[0] = 1
    mesh = make_mesh()
    params = put_replicated(params, mesh)
    chunk = seq * args.ttt_chunk_seqs
    modes = [("plain", dict(eval_mode="sliding", eval_stride=seq)),  # = plain (tests/test_eval_sliding.py)
             ("sliding", dict(eval_mode="sliding", eval_stride=args.stride)),
             ("ttt", dict(eval_mode="ttt", eval_stride=args.stride, ttt_chunk_tokens=chunk,
                          ttt_batch_seqs=args.ttt_chunk_seqs, ttt_epochs=args.ttt_epochs, ttt_chunks_per_call=1))]
    out = {"shape": f"{cfg.model.num_layers}x{cfg.model.model_dim} vocab {v} seq {seq}", "devices": len(jax.devices()),
           "backend": jax.default_backend(), "stream_tokens": args.tokens}
    for name, fields in modes:
        c = replace(cfg, eval=replace(cfg.eval, eval_batch_windows=args.batch_windows, **fields))
        rep = Evaluator(c, mesh, tables, progress=False).evaluate(params, tokens)
        s = rep.seconds
        run_s = s.get("score", 0.0) + s.get("ttt_loop", 0.0)
        out[name] = {"tokens_scored": rep.tokens_scored, "compile_s": round(s.get("compile", 0.0), 2),
                     "run_s": round(run_s, 2), "tokens_per_s": round(rep.tokens_scored / run_s, 2)}
        if name != "ttt":  # windows computed, padding of the last batch included
            rows = -(-args.batch_windows // len(jax.devices())) * len(jax.devices())
            forward = -(-rep.info["windows"] // rows) * rows * seq
            out[name]["forward_tokens_per_s"] = round(forward / run_s, 1)
        print(json.dumps({"run": name, **out[name]}), flush=True)
    f = forward_flops_per_token(cfg, seq)
    out["cpu_gflops_forward"] = round(out["plain"]["forward_tokens_per_s"] * f / 1e9, 1)
    out["projection_8xH100"] = {str(m): {k: round(x, 1) for k, x in projection(cfg, args.stride, m, 3).items()
                                         if k.endswith("_s")} for m in (0.1, 0.35)}
    out["flops_per_token_fwd"] = f
    print(json.dumps(out))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality", help="BPB per mode on a trained model")
    from golfjax.cli import add_model_source_args

    add_model_source_args(q)
    q.add_argument("--data-dir")
    q.add_argument("--tokenizer")
    q.add_argument("--stride", type=int, default=64)
    q.add_argument("--modes", default="plain,sliding,sliding_doc,ttt",
                   help="comma list of plain, sliding, sliding_doc, ttt, ttt_lora (deltas are against the first)")
    q.add_argument("--max-tokens", type=int, default=0, help="use only the first N validation tokens (0: all)")
    add_config_args(q)
    s = sub.add_parser("speed", help="tokens/s per mode at a shape (default: the baseline) and a projection")
    s.add_argument("--tokens", type=int, default=2049, help="length of the random validation stream")
    s.add_argument("--stride", type=int, default=64)
    s.add_argument("--batch-windows", type=int, default=8)
    s.add_argument("--ttt-chunk-seqs", type=int, default=1, help="TTT chunk = this many sequences")
    s.add_argument("--ttt-epochs", type=int, default=1)
    add_config_args(s)
    args = parser.parse_args()
    setup_devices(args.cpu_devices)
    return quality(args) if args.what == "quality" else speed(args)


if __name__ == "__main__":
    run_main(main)
