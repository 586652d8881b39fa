"""Leaderboard record 2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611 (the
top entry): val_bpb 1.0611 (3-seed mean 1.06108), 35,945,671 params.

11 layers x 512, 8/4 heads, MLP 4x LeakyReLU(0.5)^2, CaseOps sp8192, seq 2048; partial
RoPE 16/64 (no YaRN), QK-gain 5.0, XSA on all layers, sparse attention gate (window 12,
scale 0.5), SmearGate v2 (window 12) with the BOS fix, LN scale, U-Net skip gates,
recurrence of layers 3-5 twice more from 35% (17 virtual layers), two-lane parallel
residuals from layer 8, attention masked at document boundaries over packed documents;
Polar Express MuonEq-R 0.026 (0.92 -> 0.97 over 1500, WD 0.095), Parallel Muon, AdamW
beta2 0.99 (tied embedding 0.03 / WD 0.085, scalars 0.02 / WD 0.02), grad clip 0.3;
warmdown over the last 85% with a 0.1 LR floor and a 0.5 s GPTQ reserve, EMA 0.9965;
GPTQ int6 (SDClip MLP 11.5, attention 13) with an int7 embedding (k 14), LQER asym rank 4
on the top 3 matrices, per-group compression; phased LoRA TTT.
(../shared/research/record-stack.md, section 2.1.)

Not configurable yet and therefore not set: lrzip ZPAQ inside the per-group codec
(golfjax's per-group codec picks the smallest of its own codecs per stream). The phased
TTT pauses at the record's document boundaries 833, 1666 and 2500 (record-stack.md 1.13,
`PHASED_TTT_PREFIX_DOCS=2500`).

    python scripts/plan.py --config configs/records/top1061.py
"""

from golfjax.config import Config, with_fields


def get_config() -> Config:
    return with_fields(Config(), {
        "model.vocab_size": 8192, "model.num_layers": 11, "model.mlp_mult": 4.0, "model.mlp_act": "leaky_relu2",
        "model.qk_gain_init": 5.0, "model.rope_dims": 16, "model.xsa_last_n": 11,
        "model.sparse_attn_gate": True, "model.sparse_attn_gate_scale": 0.5, "model.attn_gate_window": 12,
        "model.smear": "v2", "model.smear_window": 12, "model.smear_bos_fix": True,
        "model.ln_scale": True, "model.skip_gates": True, "model.ortho_init": True,
        "model.recur_first": 3, "model.recur_last": 5, "model.recur_loops": 2, "model.recur_start_frac": 0.35,
        "model.two_lane_start": 8, "model.doc_mask": True, "model.doc_bos_id": 1,
        "optim.muon_ns_coeffs": "polar_express", "optim.muon_row_normalize": True,
        "optim.matrix_lr": 0.026, "optim.muon_momentum": 0.97, "optim.muon_momentum_warmup_start": 0.92,
        "optim.muon_momentum_warmup_steps": 1500, "optim.muon_wd": 0.095, "optim.muon_sharded_ns": True,
        "optim.beta2": 0.99, "optim.tied_embed_lr": 0.03, "optim.embed_wd": 0.085,
        "optim.scalar_lr": 0.02, "optim.adam_wd": 0.02, "optim.grad_clip_norm": 0.3,
        "train.train_seq_len": 2048, "train.train_batch_tokens": 786_432, "train.warmdown_frac": 0.85,
        "train.min_lr": 0.1, "train.gptq_reserve_seconds": 0.5, "train.ema_decay": 0.9965,
        "data.data_order": "packed", "caseops.caseops_enabled": True,
        "data.data_path": "./data/datasets/fineweb10B_sp8192_caseops",
        "data.tokenizer_path": "./data/tokenizers/fineweb_8192_caseops_bpe.model",
        "data.val_pattern": "fineweb_val_[0-9]*.bin",
        "eval.eval_mode": "ttt", "eval.ttt_variant": "phased", "eval.eval_seq_len": 2048,
        "eval.ttt_lora_rank": 80, "eval.ttt_lora_alpha": 144.0, "eval.ttt_lora_lr": 1e-4,
        "eval.ttt_lora_beta1": 0.0, "eval.ttt_lora_beta2": 0.99, "eval.ttt_lora_wd": 0.5,
        "eval.ttt_lora_chunk": 48, "eval.ttt_lora_warm_a": True,
        "eval.ttt_phase_docs": "833,1666,2500", "eval.ttt_phase_lr": 0.001, "eval.ttt_phase_epochs": 1,
        "export.scheme": "custom", "export.codec": "pergroup",
        "export.quant_gptq": True, "export.quant_lqer_rank": 4, "export.quant_lqer_top_k": 3,
        "export.quant_lqer_asym": True, "export.quant_calib_source": "train", "export.quant_calib_batches": 16,
        "export.quant_calib_batch_tokens": 786_432, "export.quant_calib_seq_len": 2048,
    }, needed_by="configs/records/top1061.py")
