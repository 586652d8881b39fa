"""The single evaluation entry point: `Evaluator(cfg, mesh, tables).evaluate(params, tokens)`.

Used by the training loop's final evaluation, `scripts/evaluate.py` and the
artifact scorer. `cfg.eval.eval_mode` picks the procedure:

- plain: the reference's non-overlapping windows (`golfjax.eval.plain`); the
  stream is cut to whole sequences plus one token, as the reference does;
- sliding: `golfjax.eval.sliding` over the whole stream (the tail that plain
  drops is scored too, and `tokens_scored` says so);
- ttt: score-first TTT (`golfjax.eval.ttt`) over the same windows;
- sliding+ngram / ttt+ngram: the same with `golfjax.eval.ngram`'s PositionMix, built
  in the order the mode scores the targets (`golfjax.eval.mix.ScoringOrder`): stream
  order, or per-document LoRA TTT's `lora_scoring_order`.

Bytes: a per-position byte vector is built once by `position_bytes` through
`golfjax.eval.bpb` (or given: the CaseOps sidecar) and summed at the scored
positions, so every mode counts bytes the same way.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
from jax.sharding import Mesh

from golfjax.config import Config
from golfjax.data.tokenizer import ByteTables
from golfjax.eval import bpb
from golfjax.eval.mix import PositionMix, ScoringOrder
from golfjax.eval.plain import evaluate_config
from golfjax.eval.sliding import document_segments, evaluate_windows, flat_segments, make_windows

# Label of the reference-format lines per mode (`<label>_exact val_loss:... val_bpb:...`).
LABELS = {"plain": "final_eval", "sliding": "final_sliding_window", "ttt": "legal_ttt",
          "sliding+ngram": "final_sliding_window_ngram", "ttt+ngram": "legal_ttt_ngram"}


@dataclass(frozen=True)
class EvalReport:
    mode: str
    val_loss: float
    val_bpb: float
    tokens_scored: int
    bytes: int
    seconds: dict = field(default_factory=dict)
    # Facts that explain the numbers: stream targets, windows, chunks, stride, ...
    info: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"mode": self.mode, "val_loss": self.val_loss, "val_bpb": self.val_bpb,
                "tokens_scored": self.tokens_scored, "bytes": self.bytes,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                **{k: v for k, v in self.info.items() if k != "per_position"}}

    def lines(self) -> list[str]:
        """The reference's log lines, then one JSON summary."""
        label = LABELS[self.mode]
        ms = 1000.0 * self.seconds.get("total", 0.0)
        return [f"{label} val_loss:{self.val_loss:.4f} val_bpb:{self.val_bpb:.4f} eval_time:{ms:.0f}ms",
                f"{label}_exact val_loss:{self.val_loss:.8f} val_bpb:{self.val_bpb:.8f}",
                json.dumps(self.as_dict())]


def position_bytes(tokens: np.ndarray, tables: ByteTables) -> np.ndarray:
    """bytes[p] of target tokens[p] after tokens[p-1] (bytes[0] = 0), from golfjax.eval.bpb."""
    arr = np.asarray(tokens).reshape(-1)
    out = np.zeros(len(arr), np.int64)
    if len(arr) > 1:
        out[1:] = bpb.target_bytes(arr[:-1], arr[1:], tables)
    return out


def plain_truncation(n_tokens: int, seq_len: int) -> int:
    """Tokens the reference keeps: whole sequences plus the one extra target."""
    return ((n_tokens - 1) // seq_len) * seq_len + 1


def load_validation_stream(cfg: Config) -> np.ndarray:
    """Every validation token, untruncated (the plain mode truncates by itself)."""
    from golfjax.data.shards import list_shards, read_shard

    files = list_shards(cfg.data.data_path, cfg.data.val_pattern)
    if not files:
        raise ValueError(f"no validation shards {cfg.data.val_pattern} in {cfg.data.data_path}")
    return np.concatenate([np.asarray(read_shard(f)) for f in files])


def load_byte_sidecar(cfg: Config, n_tokens: int) -> np.ndarray | None:
    """The CaseOps byte sidecar of the first n_tokens of the validation stream when the config
    enables CaseOps (checked by `caseops.evaluation_bytes`: pattern clash, alignment), else None."""
    section = getattr(cfg, "caseops", None)
    if section is None or not getattr(section, "caseops_enabled", False):
        return None
    from golfjax.data import caseops

    return caseops.evaluation_bytes(cfg, load_validation_stream(cfg))[:n_tokens]


def build_mix(cfg: Config, tokens: np.ndarray, order: ScoringOrder | None = None) -> PositionMix:
    """The n-gram PositionMix of `golfjax.eval.ngram` over the stream (its `ngram` config section),
    learning from the targets in stream order or in the given scoring order."""
    try:
        from golfjax.eval import ngram
    except ImportError:
        raise NotImplementedError("not implemented yet: n-gram blending (golfjax.eval.ngram)") from None
    if not hasattr(ngram, "build_position_mix"):
        raise NotImplementedError("not implemented yet: golfjax.eval.ngram.build_position_mix")
    mix = ngram.build_position_mix(cfg, np.asarray(tokens), order)
    mix.check(len(tokens))
    return mix


def sidecar_position_bytes(sidecar: np.ndarray, n_tokens: int) -> np.ndarray:
    """bytes[p] of every position from a CaseOps byte sidecar (bytes[0] = 0), via golfjax.eval.bpb."""
    if len(sidecar) != n_tokens:
        raise ValueError(f"byte sidecar has {len(sidecar)} entries, the validation stream {n_tokens} tokens")
    out = np.zeros(n_tokens, np.int64)
    if n_tokens > 1:
        out[1:] = bpb.sidecar_target_bytes(sidecar, np.arange(1, n_tokens))
    return out


class Evaluator:
    """One configured evaluation; `evaluate` may be called for several params / streams."""

    def __init__(self, cfg: Config, mesh: Mesh, tables: ByteTables, bos_id: int = 1,
                 byte_sidecar: np.ndarray | None = None, progress: bool = True):
        self.cfg, self.mesh, self.tables, self.bos_id = cfg, mesh, tables, bos_id
        self.byte_sidecar = byte_sidecar  # CaseOps: original bytes of each token of the stream
        self.progress = progress
        self.mode = cfg.eval.eval_mode
        self.seq_len = cfg.eval.eval_seq_len or cfg.train.train_seq_len

    def _bytes(self, tokens: np.ndarray) -> np.ndarray:
        if self.byte_sidecar is None:
            return position_bytes(tokens, self.tables)
        # plain mode scores a truncated stream: the sidecar must cover the whole stream, then is cut alike
        sidecar = np.asarray(self.byte_sidecar).reshape(-1)
        full = self.cfg.eval.eval_mode.split("+")[0] == "plain" and len(sidecar) >= len(tokens)
        return sidecar_position_bytes(sidecar[: len(tokens)] if full else sidecar, len(tokens))

    def windows(self, tokens: np.ndarray):
        """The sliding window table of this config over `tokens`."""
        e = self.cfg.eval
        seg = document_segments(tokens, self.bos_id) if e.eval_doc_isolated else flat_segments(len(tokens))
        return make_windows(seg, self.seq_len, min(e.eval_stride, self.seq_len))

    def scoring_order(self, tokens: np.ndarray) -> ScoringOrder | None:
        """The order this config's mode scores the targets in, when it is not the stream's (None):
        per-document LoRA TTT (`ttt_lora.lora_scoring_order`)."""
        e = self.cfg.eval
        if self.mode.split("+")[0] == "ttt" and e.ttt_variant in ("lora", "phased"):
            from golfjax.eval.ttt_lora import lora_scoring_order

            return lora_scoring_order(np.asarray(tokens).reshape(-1), self.bos_id, e.ttt_lora_docs, e.ttt_lora_chunk)
        return None

    def evaluate(self, params, tokens: np.ndarray, record: bool = False) -> EvalReport:
        """Score `params` (already on the mesh) on the validation stream `tokens`.

        With record=True, `info["per_position"]` holds (positions, nll) of every
        scored target (tests; not for the 62M-token set)."""
        t_start = time.perf_counter()
        seconds: dict[str, float] = {}
        tokens = np.asarray(tokens).reshape(-1)
        e, base = self.cfg.eval, self.mode.split("+")[0]
        stream_targets = len(tokens) - 1
        if base == "plain":
            kept = plain_truncation(len(tokens), self.cfg.train.train_seq_len)
            if self.byte_sidecar is None:
                res = evaluate_config(params, self.cfg, tokens[:kept], self.tables, self.mesh, progress=self.progress)
                seconds["score"] = seconds["total"] = time.perf_counter() - t_start
                return EvalReport(self.mode, res.val_loss, res.val_bpb, res.tokens, res.bytes, seconds,
                                  {"stream_targets": stream_targets, "seq_len": self.cfg.train.train_seq_len})
            # CaseOps bytes: plain = windows with stride = seq_len (test_eval_sliding proves them equal).
            tokens = tokens[:kept]
        t = time.perf_counter()
        pbytes = self._bytes(tokens)
        if base == "plain":
            seq = self.cfg.train.train_seq_len
            win = make_windows(flat_segments(len(tokens)), seq, seq)
        else:
            win = self.windows(tokens)
        seconds["prepare"] = time.perf_counter() - t
        mix, order = None, None
        lora = base == "ttt" and e.ttt_variant in ("lora", "phased")
        if self.mode.endswith("+ngram"):
            t = time.perf_counter()
            order = self.scoring_order(tokens)
            mix = build_mix(self.cfg, tokens) if order is None else build_mix(self.cfg, tokens, order)
            seconds["ngram_precompute"] = time.perf_counter() - t
        info = {"stream_targets": stream_targets, "seq_len": self.seq_len, "stride": min(e.eval_stride, self.seq_len),
                "doc_isolated": e.eval_doc_isolated, "windows": len(win),
                "plain_tokens": plain_truncation(len(tokens), self.cfg.train.train_seq_len) - 1}
        if base in ("sliding", "plain"):
            totals = evaluate_windows(params, self.cfg.model, tokens, pbytes, win, self.mesh, e.eval_batch_windows,
                                      mix=mix, record=record, progress=self.progress, timings=seconds)
        elif lora:
            from golfjax.eval.ttt_lora import evaluate_lora_ttt

            totals = evaluate_lora_ttt(params, self.cfg.model, e, tokens, pbytes, self.mesh, self.seq_len,
                                       bos_id=self.bos_id, record=record, progress=self.progress, timings=seconds,
                                       mix=mix, order=order)
            info.update({"ttt_variant": e.ttt_variant, "ttt_phase_docs": e.ttt_phase_docs, "ttt_lora_rank": e.ttt_lora_rank, "ttt_lora_chunk": e.ttt_lora_chunk})
        elif base == "ttt":
            from golfjax.eval.ttt import evaluate_ttt

            totals, plan, _ = evaluate_ttt(params, self.cfg.model, e, tokens, pbytes, win, self.mesh, mix=mix,
                                           record=record, progress=self.progress, timings=seconds)
            info.update({"chunks": plan.n_chunks, "trained_chunks": int(plan.train.sum()),
                         "ttt_epochs": e.ttt_epochs, "ttt_lr": e.ttt_lr})
        else:
            raise ValueError(f"unknown eval_mode {self.mode!r}")
        if totals.tokens != len(tokens) - 1:
            raise AssertionError(f"{self.mode}: scored {totals.tokens} targets, the stream has {len(tokens) - 1}")
        val_loss, val_bpb = bpb.loss_and_bpb(totals.nll_sum, totals.tokens, totals.bytes)
        if record:
            info["per_position"] = totals.per_position()
        seconds["total"] = time.perf_counter() - t_start
        return EvalReport(self.mode, val_loss, val_bpb, totals.tokens, totals.bytes, seconds, info)
