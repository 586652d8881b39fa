"""Typed, frozen run configuration.

A config is a tree of frozen dataclasses. Every field defaults to the reference
baseline (`train_gpt.py` of openai/parameter-golf), so `Config()` *is* the
baseline. Values are resolved in this order, later wins:

1. the dataclass defaults,
2. the config file (`configs/NAME.py` defining `get_config() -> Config`),
3. the reference's environment variables (`NUM_LAYERS=2`, `DATA_PATH=...`;
   every field is reachable as its name in upper case),
4. `--set section.field=value` on the command line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import numbers
import os
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Mapping, get_type_hints


class ConfigError(ValueError):
    """A user mistake in a config file, an environment variable or a --set."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 2.0
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    rope_base: float = 10000.0
    logit_softcap: float = 30.0
    qk_gain_init: float = 1.5
    # "auto": bfloat16 on GPU/TPU, float32 on CPU. Params are always float32.
    compute_dtype: str = "auto"
    # "auto": cuDNN fused attention on GPU with 16-bit inputs; on CPU golfjax's fused
    # kernel ("fused", golfjax.model.fused_attention: AMX for bf16, AVX-512 for
    # float32) on one device where the CPU can run it, else its blocked XLA
    # attention ("blocked", golfjax.model.cpu_ops); XLA elsewhere. Also "xla", "cudnn".
    # "fused" also runs the q/k RMSNorm + rotary + q_gain and the blocks' RMSNorm as
    # C++ passes (same maths in float32, rounded once).
    attention_impl: str = "auto"
    # Dense layers' matmul: "auto" is "cpu" on CPU (golfjax.model.cpu_ops.linear,
    # YNNPACK-friendly layouts and VJP) and "xla" (flax's own) elsewhere.
    matmul_impl: str = "auto"
    # --- record-stack options (docs: ../shared/research/record-stack.md 1.2-1.5, 1.9);
    # every default is the reference baseline.
    # MLP activation: "relu2" (reference) or "leaky_relu2" (leaky_relu(x, 0.5)^2).
    mlp_act: str = "relu2"
    # Rotate only the first rope_dims of head_dim (0: all). NTK base rescale when the
    # sequence is longer than rope_train_seq_len (0: never rescale).
    rope_dims: int = 0
    rope_train_seq_len: int = 0
    # XSA (exclusive self-attention) on the last N physical layers (>= num_layers: all).
    xsa_last_n: int = 0
    # At most one attention output gate: 2*sigmoid(W x[:window]) / sigmoid(W x) /
    # sigmoid(scale * W x[:window]), one multiplier per head.
    attn_out_gate: bool = False
    gated_attn: bool = False
    gated_attn_init_std: float = 0.005
    sparse_attn_gate: bool = False
    sparse_attn_gate_scale: float = 1.0
    attn_gate_window: int = 12
    # Packed documents: attention never crosses a BOS token (token id doc_bos_id).
    doc_mask: bool = False
    doc_bos_id: int = 1
    # BigramHash embedding: buckets (0: off) x bigram_dim table, projection, scale.
    bigram_buckets: int = 0
    bigram_dim: int = 128
    bigram_scale_init: float = 0.05
    # SmearGate: "" (off), "v1" (per-dim gate after the embedding norm) or "v2"
    # (input-dependent, before the norm); smear_bos_fix stops it at BOS tokens.
    smear: str = ""
    smear_window: int = 12
    smear_bos_fix: bool = False
    # Value embeddings: a vocab x ve_dim table projected to kv_dim and added to v in
    # the physical layers ve_layers ("9,10"); 0 = off.
    ve_dim: int = 0
    ve_layers: str = ""
    ve_scale_init: float = 0.1
    # Orthogonal init of the non-zero-initialised matrices of at least 64x64.
    ortho_init: bool = False
    # LN scale: both norm outputs of physical layer l times 1/sqrt(l+1).
    ln_scale: bool = False
    # U-Net skips as lerp(w*skip, x, sigmoid(g)), g init 0.
    skip_gates: bool = False
    # Depth recurrence: physical layers recur_first..recur_last run recur_loops extra
    # times (0: off), switched on at recur_start_frac of training (the train loop's job).
    recur_first: int = 0
    recur_last: int = -1
    recur_loops: int = 0
    recur_start_frac: float = 0.0
    # Parallel residuals from this physical layer on (-1: off): GPT-J style, or two lanes
    # with learned routing (final hidden = mean of the lanes).
    parallel_start: int = -1
    two_lane_start: int = -1
    # Late QAT: straight-through int-qat_bits fake quantization of the block matrices
    # (0: off); the train step switches it on when lr_mul < qat_lr_threshold.
    qat_bits: int = 0
    qat_lr_threshold: float = 0.0


@dataclass(frozen=True)
class OptimConfig:
    embed_lr: float = 0.6
    head_lr: float = 0.008
    tied_embed_lr: float = 0.05
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    muon_momentum: float = 0.95
    muon_backend_steps: int = 5
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    # Newton-Schulz precision: "bfloat16" as the reference, or "float32".
    muon_ns_dtype: str = "bfloat16"
    # Named coefficient table of golfjax.optim.muon.NS_COEFFICIENTS.
    muon_ns_coeffs: str = "standard"
    # Where bf16 NS rounds (golfjax.optim.muon.newton_schulz): "compiled" as the function
    # the reference trains with (its main() wraps it in torch.compile; inductor on CPU), or
    # "eager" as eager torch, which is how ../shared/golden's training steps were made.
    muon_ns_rounding: str = "compiled"
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.0
    # MuonEq-R: each row of the Nesterov update divided by its L2 norm before NS.
    muon_row_normalize: bool = False
    # NS starts from G / (muon_ns_safety * |G|_F + eps); modded-nanogpt's Polar Express uses 1.02.
    muon_ns_safety: float = 1.0
    # Decoupled weight decay p <- p * (1 - lr * wd), lr = the group's base LR times the
    # schedule multiplier: Muon matrices, the token embedding, the scalar/control group
    # and an untied head.
    muon_wd: float = 0.0
    embed_wd: float = 0.0
    adam_wd: float = 0.0
    head_wd: float = 0.0
    # Parallel Muon: orthogonalise each layer stack split over the data axis, then
    # all-gather (same results as the replicated computation).
    muon_sharded_ns: bool = False


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 20000
    warmdown_iters: int = 1200
    # The reference runs this many throwaway steps to warm torch.compile; golfjax
    # compiles ahead of time instead, so the field is accepted and not needed.
    warmup_steps: int = 20
    train_batch_tokens: int = 524_288
    train_seq_len: int = 1024
    max_wallclock_seconds: float = 600.0
    seed: int = 1337
    val_loss_every: int = 1000
    train_log_every: int = 200
    # 0 means the reference rule: 8 // number of data-parallel devices.
    grad_accum_steps: int = 0
    run_id: str = ""
    out_dir: str = "runs"
    # The run directory itself (logs, checkpoints, artifact); "" means <out_dir>/<run_id>.
    run_dir: str = ""
    # Save the whole training state every N steps into <run_dir>/checkpoints/ (0: only
    # on SIGTERM/SIGINT), keeping the last keep_checkpoints; resume continues the run
    # in run_dir from its latest complete checkpoint.
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    resume: bool = False
    # "START:STOP": trace steps START..STOP-1 with jax.profiler into <run_dir>/profile.
    profile: str = ""
    # The later LR schedule (R0405 on): with warmdown_frac > 0 the multiplier is
    # max((1 - f) / warmdown_frac, min_lr) once the training fraction f (of the wall-clock
    # budget minus gptq_reserve_seconds, else of the iterations) passes 1 - warmdown_frac.
    # 0 keeps the reference's warmdown_iters rule (min_lr floors it too).
    warmdown_frac: float = 0.0
    min_lr: float = 0.0
    # Seconds cut from max_wallclock_seconds for training (the records' GPTQ Hessian time).
    gptq_reserve_seconds: float = 0.0
    # Weight averaging in float32, applied to the params that are finally evaluated and
    # exported. EMA from step 0: ema <- d * ema + (1 - d) * w after every step (0: off).
    ema_decay: float = 0.0
    # SWA: the mean of snapshots taken every swa_every steps while the LR multiplier is
    # below swa_start_frac (0: off). With EMA on too, the snapshots are of the EMA weights.
    swa_every: int = 0
    swa_start_frac: float = 1.0


@dataclass(frozen=True)
class EvalConfig:
    val_batch_size: int = 524_288
    # Final evaluation (golfjax.eval.evaluator.Evaluator): "plain" (the reference's
    # non-overlapping windows), "sliding", "ttt" (score-first test-time training over
    # sliding windows), "sliding+ngram", "ttt+ngram". Periodic validation is always plain.
    eval_mode: str = "plain"
    # Window length of sliding/ttt; 0 means train_seq_len.
    eval_seq_len: int = 0
    # Each window after the first scores only its last eval_stride positions.
    eval_stride: int = 64
    # Windows per forward pass over the whole mesh (rounded up to a multiple of the devices).
    eval_batch_windows: int = 32
    # Cut the context at BOS: windows never cross documents (doc i = [BOS_i, BOS_i+1]).
    eval_doc_isolated: bool = False
    # Score-first TTT. "full": full-model SGD; "lora" and "phased" are declared, not built.
    ttt_variant: str = "full"
    ttt_chunk_tokens: int = 32_768
    ttt_lr: float = 0.002
    ttt_momentum: float = 0.9
    ttt_epochs: int = 3
    # Sequences per TTT step over the whole mesh; training sequence length (0: window length).
    ttt_batch_seqs: int = 32
    ttt_seq_len: int = 0
    # The first k physical blocks are not adapted (embeddings and the rest are).
    ttt_freeze_blocks: int = 0
    # Global gradient-norm clip of each TTT step (0: off).
    ttt_grad_clip: float = 1.0
    # Chunks per compiled lax.scan call (the progress bar advances per call).
    ttt_chunks_per_call: int = 8
    # Per-document LoRA TTT (ttt_variant="lora"; R0413 defaults, TOP: rank 80, alpha 144,
    # beta2 0.99, chunk 48, warm A): adapters on q, k, v, attention out, MLP and head.
    ttt_lora_rank: int = 96
    # Output scale alpha/rank; 0 means no scaling (R0413).
    ttt_lora_alpha: float = 0.0
    ttt_lora_lr: float = 1e-4
    ttt_lora_beta1: float = 0.0
    ttt_lora_beta2: float = 0.999
    ttt_lora_wd: float = 0.5
    # Predictions per chunk (one AdamW step after each chunk but a document's last).
    ttt_lora_chunk: int = 32
    # Documents processed together (longest first), each with its own adapters.
    ttt_lora_docs: int = 64
    # Between document batches keep A and zero B (TOP) instead of re-initialising both.
    ttt_lora_warm_a: bool = False
    ttt_lora_steps_per_call: int = 16
    # Phased global TTT (ttt_variant="phased" = LoRA TTT plus these pauses): after each of
    # these counts of scored documents ("666,1333,2000"), full-model SGD (ttt_chunk_tokens
    # chunks, ttt_batch_seqs, momentum, clip, cosine over chunks) on every document scored
    # so far, then the queue resumes with the updated base model. R0413: "2000", lr 0.005, 3 epochs.
    ttt_phase_docs: str = ""
    ttt_phase_lr: float = 0.005
    ttt_phase_epochs: int = 3


@dataclass(frozen=True)
class DataConfig:
    data_path: str = "./data/datasets/fineweb10B_sp1024"
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    train_pattern: str = "fineweb_train_*.bin"
    val_pattern: str = "fineweb_val_*.bin"
    # Training token order: "sequential" (the reference stream), "shuffled" (random
    # windows, a new permutation every epoch), "stride" (windows visited with a stride
    # coprime to their count), "packed" (sequences start at a document's BOS and hold
    # whole documents; segment boundaries are the BOS tokens). All deterministic from the seed.
    data_order: str = "sequential"


@dataclass(frozen=True)
class ExportConfig:
    scheme: str = "int8-zlib"
    artifact_limit_bytes: int = 16_000_000
    # How code bytes count toward the limit: "compressed" (the records' way:
    # comments and docstrings stripped, lzma, base85 in an exec stub; reports
    # label it and also show the raw bytes) or "raw" (the UTF-8 bytes of every
    # golfjax .py file, as the challenge counts a plain train_gpt.py). The
    # default differs from the reference because golfjax's package is ~5x the
    # size of train_gpt.py: counted raw, the reference's own 15.82 MB baseline
    # model would not fit. See golfjax.export.artifact.code_bytes.
    code_bytes_mode: str = "compressed"
    # Quantization rules for the non-reference schemes (golfjax.export.quant.plan_from_config;
    # the reference scheme int8-zlib ignores them). Bits per tensor role: attention and MLP
    # matrices, the embedding (tok_emb / lm_head), other large tensors.
    quant_attn_bits: int = 6
    quant_mlp_bits: int = 6
    quant_embed_bits: int = 7
    quant_other_bits: int = 8
    # Clip rule: rowmax | percentile (quant_clip_q) | search (GPTQ-lite: the candidate
    # percentile with the lowest whole-matrix MSE) | sdclip (k * std(row) / (2^(b-1)-1)).
    quant_clip: str = "sdclip"
    quant_clip_q: float = 1.0
    quant_clip_percentiles: str = "0.999,0.9995,0.9999,0.99999,1.0"
    quant_attn_k: float = 13.0  # SDClip k per role (the TOP record's values)
    quant_mlp_k: float = 11.5
    quant_embed_k: float = 14.0
    quant_other_k: float = 12.85
    # symmetric: codes in [-(2^(b-1)-1), 2^(b-1)-1] ([-31,31] for int6, R0322+);
    # full: [-2^(b-1), 2^(b-1)-1] ([-32,31], R0321).
    quant_int_range: str = "symmetric"
    quant_passthrough_max_numel: int = 65_536  # float tensors this small stay float16 (controls float32)
    quant_gate_patterns: str = "attn_gate"  # comma-separated; small 2-D matches are int8 per row
    quant_pack_bits: bool = False  # bit-pack int-k codes instead of one int8 per code
    # Full-Hessian GPTQ on attention, MLP and (with quant_gptq_embed) the embedding.
    quant_gptq: bool = False
    quant_gptq_embed: bool = True
    quant_gptq_damp: float = 0.01
    quant_gptq_block: int = 128
    quant_gptq_act_order: bool = True
    # GPTQ calibration: "train" (training batches) or "selfgen" (sampled from the model).
    quant_calib_source: str = "train"
    quant_calib_batches: int = 16
    quant_calib_batch_tokens: int = 65_536
    quant_calib_seq_len: int = 1024
    quant_calib_temperature: float = 0.8
    quant_calib_selfgen_seqs: int = 64  # selfgen: sequences of quant_calib_seq_len sampled (R0325: 64 x 2048)
    # LQER: rank-r correction of the quant_lqer_top_k matrices with the largest error (0 = off).
    quant_lqer_rank: int = 0
    quant_lqer_top_k: int = 3
    quant_lqer_asym: bool = True
    quant_lqer_group: int = 64
    # Payload codec; "" = the scheme's own. A codec spec (zlib, zstd, brotli, lzma,
    # none, or shuffleN+CODEC for a byte shuffle first) or "pergroup" (streams by
    # tensor role, the smallest of pergroup_codecs each; see golfjax.export.artifact).
    codec: str = ""
    # Per-group mode: reorder the rows of the hot groups (tok_emb, attn.c_q, mlp.fc)
    # by a greedy L1 nearest-neighbour chain; "" candidates = codec.PERGROUP_CANDIDATES.
    pergroup_reorder: bool = True
    pergroup_codecs: str = ""


@dataclass(frozen=True)
class NgramConfig:
    # The causal n-gram of eval modes "sliding+ngram" / "ttt+ngram" (golfjax.eval.ngram;
    # other modes ignore this section): "interp" (lam * p_nn + (1 - lam) * Witten-Bell
    # n-gram) or "tilt" (A2's hint-token tilt). It only ever counts earlier tokens.
    ngram_mode: str = "interp"
    # Context lengths: "1,2,3,4" or "start:stop:step" (A2's tilt: "8:16:2").
    ngram_orders: str = "1,2,3,4"
    ngram_lambda: float = 0.9
    ngram_base_beta: float = 2.0
    ngram_agree_bonus: float = 0.1


@dataclass(frozen=True)
class CaseOpsConfig:
    # The data is CaseOps-transformed (golfjax.data.caseops): bytes come from the
    # validation byte sidecar (fineweb_val_bytes_*.bin) instead of the tokenizer's
    # byte tables. With it on, val_pattern must not match the sidecar shards.
    caseops_enabled: bool = False
    val_bytes_pattern: str = "fineweb_val_bytes_*.bin"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    ngram: NgramConfig = field(default_factory=NgramConfig)
    caseops: CaseOpsConfig = field(default_factory=CaseOpsConfig)


SECTIONS: tuple[str, ...] = tuple(f.name for f in fields(Config))


# ----------------------------------------------------------------------------
# value parsing


def _parse_value(raw: str, typ: Any, where: str) -> Any:
    """Parse a string the way the reference reads its environment."""
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ is int:
            return int(raw.strip().replace("_", ""))
        if typ is float:
            return float(raw)
        return raw
    except ValueError:
        raise ConfigError(f"{where}: cannot read {raw!r} as {typ.__name__}") from None


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in fields(section_cls)}


def env_name(field_name: str) -> str:
    """The reference environment variable for a config field."""
    return field_name.upper()


def _env_index() -> dict[str, tuple[str, str]]:
    index: dict[str, tuple[str, str]] = {}
    for section in SECTIONS:
        for name in _field_types(_section_class(section)):
            key = env_name(name)
            assert key not in index, f"config field {name} is not unique across sections"
            index[key] = (section, name)
    return index


def _section_class(section: str) -> type:
    return type(getattr(Config(), section))


# ----------------------------------------------------------------------------
# building a config


def with_values(config: Config, values: Mapping[str, Mapping[str, Any]]) -> Config:
    """Return `config` with `{section: {field: typed value}}` replaced."""
    updates = {}
    for section, items in values.items():
        updates[section] = replace(getattr(config, section), **items)
    return replace(config, **updates)


def apply_env(config: Config, environ: Mapping[str, str] | None = None) -> tuple[Config, dict[str, str]]:
    """Apply the reference's environment variables; return the config and what was used."""
    environ = os.environ if environ is None else environ
    values: dict[str, dict[str, Any]] = {}
    used: dict[str, str] = {}
    for key, (section, name) in _env_index().items():
        if key in environ:
            typ = _field_types(_section_class(section))[name]
            values.setdefault(section, {})[name] = _parse_value(environ[key], typ, f"environment {key}")
            used[key] = environ[key]
    return with_values(config, values), used


def apply_overrides(config: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply `section.field=value` strings (the `--set` flag)."""
    values: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.field=value (sections: {', '.join(SECTIONS)})")
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"--set {item!r}: unknown section {section!r} (sections: {', '.join(SECTIONS)})")
        types = _field_types(_section_class(section))
        if name not in types:
            raise ConfigError(
                f"--set {item!r}: unknown config key {key!r}; fields of {section}: {', '.join(types)}"
            )
        values.setdefault(section, {})[name] = _parse_value(raw, types[name], f"--set {key}")
    return with_values(config, values)


def with_fields(config: Config, values: Mapping[str, Any], needed_by: str = "") -> Config:
    """Set {"section.field": value}. A field golfjax does not have yet is an error
    "not implemented yet: section.field=value" (record configs name what they still miss)."""
    grouped: dict[str, dict[str, Any]] = {}
    missing = []
    for key, value in values.items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or name not in _field_types(_section_class(section)):
            missing.append(f"{key}={value!r}")
            continue
        grouped.setdefault(section, {})[name] = value
    if missing:
        who = f" (needed by {needed_by})" if needed_by else ""
        raise ConfigError(f"not implemented yet: {', '.join(missing)}{who}")
    return with_values(config, grouped)


def load_config_file(path: str | os.PathLike) -> Config:
    """Run a config file and return what its `get_config()` returns."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"golfjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a broken config file is a user mistake
        raise ConfigError(f"config file {path} failed to load: {type(exc).__name__}: {exc}") from exc
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} must define get_config() -> golfjax.config.Config")
    config = module.get_config()
    if not isinstance(config, Config):
        raise ConfigError(f"get_config() in {path} returned {type(config).__name__}, not golfjax.config.Config")
    return config


def resolve(
    config_path: str | os.PathLike | None,
    overrides: list[str] | tuple[str, ...] = (),
    environ: Mapping[str, str] | None = None,
) -> tuple[Config, dict[str, str]]:
    """File, then environment, then --set; returns the config and the env vars used."""
    config = load_config_file(config_path) if config_path else Config()
    config, used = apply_env(config, environ)
    config = apply_overrides(config, overrides)
    validate(config)
    return config, used


def _has_field_type(value: Any, typ: type) -> bool:
    """Lenient where Python is: any integer for int (NumPy's too), any real number for
    float, 0/1 for bool; str only for str."""
    if typ is bool:
        return isinstance(value, numbers.Integral) and value in (0, 1)
    if typ is int:
        return isinstance(value, numbers.Integral)
    if typ is float:
        return isinstance(value, numbers.Real)
    return isinstance(value, typ)


def validate_types(config: Config) -> None:
    """A config file is Python, so a field can hold anything: name the field whose value
    has the wrong type here, before it fails deep inside the model or the data."""
    for section in SECTIONS:
        values = getattr(config, section)
        for name, typ in _field_types(_section_class(section)).items():
            value = getattr(values, name)
            if not _has_field_type(value, typ):
                raise ConfigError(f"{section}.{name} must be {typ.__name__}, got {type(value).__name__} {value!r}")


def validate(config: Config) -> None:
    """Reject wrong types and shapes the model cannot build, with the reason."""
    validate_types(config)
    m, t = config.model, config.train
    if m.model_dim % m.num_heads:
        raise ConfigError(f"model_dim={m.model_dim} must be divisible by num_heads={m.num_heads}")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(f"num_heads={m.num_heads} must be divisible by num_kv_heads={m.num_kv_heads}")
    if (m.model_dim // m.num_heads) % 2:
        raise ConfigError(f"head_dim={m.model_dim // m.num_heads} must be even for RoPE")
    if m.logit_softcap <= 0:
        raise ConfigError(f"logit_softcap must be positive, got {m.logit_softcap}")
    if m.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"compute_dtype must be auto/float32/bfloat16/float16, got {m.compute_dtype!r}")
    validate_model(m)
    if t.train_seq_len <= 0 or t.train_batch_tokens <= 0:
        raise ConfigError("train_seq_len and train_batch_tokens must be positive")
    from golfjax.profiling import parse_profile_spec

    parse_profile_spec(config.train.profile)  # raises with the expected form
    _validate_eval(config.eval)
    from golfjax.train.options import check_training_options

    check_training_options(config)
    if config.export.code_bytes_mode not in ("raw", "compressed"):
        raise ConfigError(f"code_bytes_mode must be raw or compressed, got {config.export.code_bytes_mode!r}")
    _validate_export_codec(config.export)


def _validate_export_codec(e: ExportConfig) -> None:
    """An export scheme or codec typo fails before training, not at the export after it."""
    from golfjax.export.artifact import ArtifactError
    from golfjax.export.pipeline import get_recipe, resolve_codec

    try:
        resolve_codec(get_recipe(e.scheme), Config(export=e))
    except ArtifactError as exc:
        raise ConfigError(str(exc)) from None


EVAL_MODES = ("plain", "sliding", "ttt", "sliding+ngram", "ttt+ngram")


def _validate_eval(e: EvalConfig) -> None:
    """Reject evaluation settings that cannot run, with the reason."""
    if e.eval_mode not in EVAL_MODES:
        raise ConfigError(f"eval_mode must be one of {'/'.join(EVAL_MODES)}, got {e.eval_mode!r}")
    if e.eval_seq_len < 0 or e.eval_stride <= 0 or e.eval_batch_windows <= 0:
        raise ConfigError("eval_seq_len must be >= 0, eval_stride and eval_batch_windows positive")
    if e.eval_seq_len and e.eval_stride > e.eval_seq_len:
        raise ConfigError(f"eval_stride={e.eval_stride} exceeds eval_seq_len={e.eval_seq_len}")
    if e.ttt_variant not in ("full", "lora", "phased"):
        raise ConfigError(f"ttt_variant must be full, lora or phased, got {e.ttt_variant!r}")
    if e.ttt_chunk_tokens <= 0 or e.ttt_epochs < 0 or e.ttt_batch_seqs <= 0 or e.ttt_chunks_per_call <= 0:
        raise ConfigError("ttt_chunk_tokens, ttt_batch_seqs, ttt_chunks_per_call must be positive, ttt_epochs >= 0")
    try:
        phases = [int(x) for x in e.ttt_phase_docs.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"ttt_phase_docs must be comma-separated document counts, got {e.ttt_phase_docs!r}") from None
    if phases != sorted(set(phases)) or any(p <= 0 for p in phases):
        raise ConfigError(f"ttt_phase_docs must be increasing positive counts, got {e.ttt_phase_docs!r}")
    if e.ttt_variant == "phased" and not phases:
        raise ConfigError("ttt_variant=phased needs ttt_phase_docs (e.g. 666,1333,2000)")
    if min(e.ttt_lora_rank, e.ttt_lora_chunk, e.ttt_lora_docs, e.ttt_lora_steps_per_call) <= 0:
        raise ConfigError("ttt_lora_rank, ttt_lora_chunk, ttt_lora_docs and ttt_lora_steps_per_call must be positive")
    if e.ttt_seq_len < 0 or e.ttt_freeze_blocks < 0 or e.ttt_grad_clip < 0:
        raise ConfigError("ttt_seq_len, ttt_freeze_blocks and ttt_grad_clip must be >= 0")


def parse_layer_list(text: str) -> tuple[int, ...]:
    """"9,10" -> (9, 10); "" -> ()."""
    try:
        return tuple(int(p) for p in text.replace(" ", "").split(",") if p)
    except ValueError:
        raise ConfigError(f"expected a comma-separated list of layer indices, got {text!r}") from None


def validate_model(m: ModelConfig) -> None:
    """The record-stack options: ranges and combinations the model cannot build."""
    head_dim = m.model_dim // m.num_heads
    if m.matmul_impl not in ("auto", "cpu", "xla"):
        raise ConfigError(f"matmul_impl must be auto, cpu or xla, got {m.matmul_impl!r}")
    if m.mlp_act not in ("relu2", "leaky_relu2"):
        raise ConfigError(f"mlp_act must be relu2 or leaky_relu2, got {m.mlp_act!r}")
    if m.rope_dims < 0 or m.rope_dims % 2 or m.rope_dims > head_dim:
        raise ConfigError(f"rope_dims={m.rope_dims} must be even and at most head_dim={head_dim} (0: all)")
    gates = [n for n in ("attn_out_gate", "gated_attn", "sparse_attn_gate") if getattr(m, n)]
    if len(gates) > 1:
        raise ConfigError(f"attention gates are mutually exclusive, got {' and '.join(gates)}")
    if gates and gates[0] != "gated_attn" and not 0 < m.attn_gate_window <= m.model_dim:
        raise ConfigError(f"attn_gate_window={m.attn_gate_window} must be in 1..model_dim")
    if m.smear not in ("", "v1", "v2"):
        raise ConfigError(f"smear must be '', v1 or v2, got {m.smear!r}")
    if m.smear == "v2" and not 0 < m.smear_window <= m.model_dim:
        raise ConfigError(f"smear_window={m.smear_window} must be in 1..model_dim")
    if m.bigram_buckets < 0 or m.bigram_buckets == 1 or (m.bigram_buckets and m.bigram_dim <= 0):
        raise ConfigError(f"bigram_buckets must be 0 (off) or >= 2 with bigram_dim > 0, got {m.bigram_buckets}")
    if not 0 <= m.doc_bos_id < m.vocab_size:
        raise ConfigError(f"doc_bos_id={m.doc_bos_id} is not a token id (vocab_size={m.vocab_size})")
    ve_layers = parse_layer_list(m.ve_layers)
    if m.ve_dim < 0 or (m.ve_dim and not ve_layers):
        raise ConfigError("ve_dim > 0 needs ve_layers (e.g. \"9,10\"), and ve_dim must not be negative")
    if any(not 0 <= i < m.num_layers for i in ve_layers) or len(set(ve_layers)) != len(ve_layers):
        raise ConfigError(f"ve_layers={m.ve_layers!r}: distinct layers in 0..{m.num_layers - 1}")
    if m.recur_loops < 0:
        raise ConfigError(f"recur_loops must be >= 0, got {m.recur_loops}")
    if m.recur_loops and not 0 <= m.recur_first <= m.recur_last < m.num_layers:
        raise ConfigError(f"recurrence needs 0 <= recur_first <= recur_last < num_layers, "
                          f"got {m.recur_first}..{m.recur_last} with {m.num_layers} layers")
    if not 0.0 <= m.recur_start_frac <= 1.0:
        raise ConfigError(f"recur_start_frac must be in [0, 1], got {m.recur_start_frac}")
    if m.parallel_start >= 0 and m.two_lane_start >= 0:
        raise ConfigError("parallel_start (GPT-J) and two_lane_start are mutually exclusive")
    if m.qat_bits and not 2 <= m.qat_bits <= 8:
        raise ConfigError(f"qat_bits must be 0 (off) or 2..8, got {m.qat_bits}")


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_json(config: Config) -> str:
    return json.dumps(to_dict(config), sort_keys=True)


def from_dict(data: Mapping[str, Any]) -> Config:
    """Inverse of `to_dict`; unknown keys are an error (a config from a newer golfjax)."""
    values: dict[str, dict[str, Any]] = {}
    for section, items in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r}")
        types = _field_types(_section_class(section))
        unknown = set(items) - set(types)
        if unknown:
            raise ConfigError(f"unknown config keys in {section}: {sorted(unknown)}")
        values[section] = dict(items)
    return with_values(Config(), values)


def describe(config: Config) -> str:
    """One `section.field=value` per line, for the run log."""
    lines = []
    for section in SECTIONS:
        sub = getattr(config, section)
        for f in fields(sub):
            lines.append(f"{section}.{f.name}={getattr(sub, f.name)!r}")
    return "\n".join(lines)


assert all(is_dataclass(getattr(Config(), s)) for s in SECTIONS)
