"""Leaderboard record 2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT: val_bpb 1.0810
(3-seed mean 1.08100), 35,944,536 params.

11 layers x 512, 8/4 heads, MLP 4x LeakyReLU(0.5)^2, sp8192, seq 2048; QK-gain 5.25,
partial RoPE 16/64 (trained at 2048: no rescale), XSA on all layers, LN scale, U-Net skip
gates, depth recurrence of layers 3-5 twice more from 35% of training (17 virtual
layers), GPT-J parallel residuals from layer 7, orthogonal init; MuonEq-R 0.022
(0.92 -> 0.99 over 1500, WD 0.095), tied embedding 0.03 (WD 0.085), scalars 0.02 (WD
0.02), grad clip 0.3; warmdown over the last 72% of the time budget minus a 12 s GPTQ
reserve, EMA 0.9965, shuffled 2048-token windows; GPTQ int6 SDClip k=12.85 (embedding
int8 k=20) on 64 training batches, byte shuffle + Brotli; legal score-first TTT (full
model SGD). (../shared/research/record-stack.md, sections 1-2.)

    python scripts/plan.py --config configs/records/r1081.py
"""

from golfjax.config import Config, with_fields


def get_config() -> Config:
    return with_fields(Config(), {
        "model.vocab_size": 8192, "model.num_layers": 11, "model.mlp_mult": 4.0, "model.mlp_act": "leaky_relu2",
        "model.qk_gain_init": 5.25, "model.rope_dims": 16, "model.rope_train_seq_len": 2048,
        "model.xsa_last_n": 11, "model.ln_scale": True, "model.skip_gates": True, "model.ortho_init": True,
        "model.recur_first": 3, "model.recur_last": 5, "model.recur_loops": 2, "model.recur_start_frac": 0.35,
        "model.parallel_start": 7,
        "optim.matrix_lr": 0.022, "optim.tied_embed_lr": 0.03, "optim.scalar_lr": 0.02,
        "optim.muon_momentum": 0.99, "optim.muon_momentum_warmup_start": 0.92,
        "optim.muon_momentum_warmup_steps": 1500, "optim.muon_row_normalize": True,
        "optim.muon_wd": 0.095, "optim.embed_wd": 0.085, "optim.adam_wd": 0.02, "optim.grad_clip_norm": 0.3,
        "train.train_seq_len": 2048, "train.train_batch_tokens": 786_432, "train.warmdown_frac": 0.72,
        "train.gptq_reserve_seconds": 12.0, "train.ema_decay": 0.9965,
        "data.data_order": "shuffled",
        "data.data_path": "./data/datasets/fineweb10B_sp8192",
        "data.tokenizer_path": "./data/tokenizers/fineweb_8192_bpe.model",
        "eval.eval_mode": "ttt", "eval.eval_seq_len": 2048, "eval.eval_stride": 64, "eval.ttt_lr": 0.005,
        "eval.ttt_epochs": 3, "eval.ttt_chunk_tokens": 32_768,
        "export.scheme": "gptq-int6-sdclip", "export.quant_calib_source": "train",
        "export.quant_calib_batches": 64, "export.quant_calib_batch_tokens": 786_432,
        "export.quant_calib_seq_len": 2048,
    }, needed_by="configs/records/r1081.py")
