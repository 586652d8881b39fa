"""Leaderboard record 2026-03-25_ValCalib_GPTQ_XSA_BigramHash3072: val_bpb 1.1147
(3-seed mean 1.11474), 27,067,484 params.

11 layers x 512, 8/4 heads, MLP 3x LeakyReLU(0.5)^2, sp1024, seq 2048; XSA on all 11
layers, partial RoPE 16/64 (NTK rescale past 1024), LN scale, SmearGate v1, BigramHash
3072x112, value embeddings (128 -> kv 256) in layers 9 and 10, orthogonal init; Parallel
Muon 0.025 (0.92 -> 0.99 over 1500, WD 0.04), AdamW WD 0.04, grad clip 0.3, warmdown 4000
iterations, EMA 0.997; full-Hessian GPTQ int6 with a per-matrix clip-percentile search,
calibrated on 64 self-generated 2048-token sequences at temperature 0.8, lzma-9; sliding
eval, stride 64. (../shared/research/record-stack.md, sections 1-2.)

Stated differences: the record's "tight SWA" was accumulated and never applied, so
SWA is off here (as in its actual run); its late QAT could not reach the banked
matrices, so QAT is off.

    python scripts/plan.py --config configs/records/r1147.py
"""

from golfjax.config import Config, with_fields


def get_config() -> Config:
    return with_fields(Config(), {
        "model.num_layers": 11, "model.mlp_mult": 3.0, "model.mlp_act": "leaky_relu2",
        "model.xsa_last_n": 11, "model.rope_dims": 16, "model.rope_train_seq_len": 1024,
        "model.ln_scale": True, "model.smear": "v1", "model.bigram_buckets": 3072, "model.bigram_dim": 112,
        "model.ve_dim": 128, "model.ve_layers": "9,10", "model.ortho_init": True,
        "optim.matrix_lr": 0.025, "optim.tied_embed_lr": 0.035, "optim.scalar_lr": 0.025,
        "optim.muon_momentum": 0.99, "optim.muon_momentum_warmup_start": 0.92,
        "optim.muon_momentum_warmup_steps": 1500, "optim.muon_sharded_ns": True,
        "optim.muon_wd": 0.04, "optim.embed_wd": 0.04, "optim.adam_wd": 0.04, "optim.grad_clip_norm": 0.3,
        "train.train_seq_len": 2048, "train.train_batch_tokens": 786_432, "train.warmdown_iters": 4000,
        "train.ema_decay": 0.997,
        "eval.eval_mode": "sliding", "eval.eval_seq_len": 2048, "eval.eval_stride": 64,
        "export.scheme": "custom", "export.codec": "lzma",
        "export.quant_attn_bits": 6, "export.quant_mlp_bits": 6, "export.quant_embed_bits": 8,
        "export.quant_other_bits": 8, "export.quant_clip": "search", "export.quant_gptq": True,
        "export.quant_gptq_embed": False,
        "export.quant_calib_source": "selfgen", "export.quant_calib_selfgen_seqs": 64,
        "export.quant_calib_seq_len": 2048,
        "export.quant_calib_temperature": 0.8,
    }, needed_by="configs/records/r1147.py")
