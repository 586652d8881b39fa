"""The reference's plain evaluation: non-overlapping seq_len windows.

The validation stream (truncated to a multiple of seq_len, plus one) is cut
into sequences; every target token is scored once with its own window as
context. Batches have a static shape (the last one is padded and the padding
dropped on the host), are split over the mesh's data axis, and per-token NLLs
are summed in float64 on the host, so the result does not depend on the
number of devices. Bytes come from `golfjax.eval.bpb`, the only byte counter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from golfjax.config import Config, ModelConfig
from golfjax.data.loader import default_grad_accum_steps
from golfjax.data.tokenizer import ByteTables
from golfjax.eval import bpb
from golfjax.model import gpt
from golfjax.parallel import num_ranks, put_sharded, replicated, sharded_along, to_host


@dataclass(frozen=True)
class EvalResult:
    val_loss: float
    val_bpb: float
    tokens: int
    bytes: int

    def as_dict(self) -> dict:
        return {"val_loss": self.val_loss, "val_bpb": self.val_bpb, "tokens": self.tokens, "bytes": self.bytes}


def eval_batch_seqs(val_batch_size: int, seq_len: int, ranks: int, grad_accum_steps: int) -> int:
    """Sequences per forward pass over the whole mesh, as the reference sizes them."""
    local_tokens = val_batch_size // (ranks * grad_accum_steps)
    if local_tokens < seq_len:
        raise ValueError(
            f"VAL_BATCH_SIZE={val_batch_size} gives {local_tokens} tokens per device and micro-step, "
            f"less than one sequence of TRAIN_SEQ_LEN={seq_len}"
        )
    return (local_tokens // seq_len) * ranks


def make_token_nll(cfg: ModelConfig, mesh: Mesh) -> Callable:
    """Jitted (params, x, y) -> per-token NLL (float32), batch split over the mesh."""
    batch = sharded_along(mesh, 0, 2)
    return jax.jit(
        lambda params, x, y: gpt.token_nll(params, cfg, x, y),
        in_shardings=(replicated(mesh), batch, batch),
        out_shardings=batch,
    )


def evaluate_plain(
    params,
    cfg: ModelConfig,
    val_tokens: np.ndarray,
    tables: ByteTables,
    mesh: Mesh,
    seq_len: int,
    batch_seqs: int,
    token_nll: Callable | None = None,
    progress: bool = True,
    byte_sidecar: np.ndarray | None = None,
) -> EvalResult:
    """val_loss and val_bpb of `params` over `val_tokens` (already truncated).

    With a CaseOps `byte_sidecar` (per stream position, aligned with `val_tokens`)
    the bytes are the original text's, read through `bpb.sidecar_count_bytes`;
    without one, the tokenizer's byte tables count them (the reference's rule).
    """
    token_nll = token_nll or make_token_nll(cfg, mesh)
    total_seqs = (len(val_tokens) - 1) // seq_len
    if total_seqs <= 0:
        raise ValueError(f"validation split is shorter than one sequence of TRAIN_SEQ_LEN={seq_len}")
    ranks = num_ranks(mesh)
    batch_seqs = max(ranks, batch_seqs - batch_seqs % ranks)
    nll_sum = 0.0
    n_bytes = 0
    starts = range(0, total_seqs, batch_seqs)
    for start in tqdm(starts, desc="eval", unit="batch", disable=None if progress else True, leave=False):
        count = min(batch_seqs, total_seqs - start)
        chunk = np.asarray(val_tokens[start * seq_len : (start + count) * seq_len + 1], dtype=np.int32)
        x = chunk[:-1].reshape(count, seq_len)
        y = chunk[1:].reshape(count, seq_len)
        if count < batch_seqs:  # static shapes: pad, then drop the padding on the host
            pad = np.zeros((batch_seqs - count, seq_len), np.int32)
            x, y = np.concatenate([x, pad]), np.concatenate([y, pad])
        nll = to_host(token_nll(params, put_sharded(x, mesh, 0), put_sharded(y, mesh, 0)))[:count]
        nll_sum += float(nll.astype(np.float64).sum())
        if byte_sidecar is None:
            n_bytes += bpb.count_bytes(chunk[:-1], chunk[1:], tables)
        else:  # targets of this batch sit at stream positions start*seq_len+1 ...
            first = start * seq_len + 1
            n_bytes += bpb.sidecar_count_bytes(byte_sidecar, np.arange(first, first + count * seq_len))
    n_tokens = total_seqs * seq_len
    val_loss, val_bpb = bpb.loss_and_bpb(nll_sum, n_tokens, n_bytes)
    return EvalResult(val_loss, val_bpb, n_tokens, n_bytes)


def evaluate_config(params, cfg: Config, val_tokens: np.ndarray, tables: ByteTables, mesh: Mesh,
                    token_nll: Callable | None = None, progress: bool = True,
                    byte_sidecar: np.ndarray | None = None) -> EvalResult:
    """`evaluate_plain` with the batch size and seq_len a run config implies."""
    ranks = num_ranks(mesh)
    grad_accum = cfg.train.grad_accum_steps or default_grad_accum_steps(ranks)
    seqs = eval_batch_seqs(cfg.eval.val_batch_size, cfg.train.train_seq_len, ranks, grad_accum)
    return evaluate_plain(params, cfg.model, val_tokens, tables, mesh, cfg.train.train_seq_len, seqs,
                          token_nll=token_nll, progress=progress, byte_sidecar=byte_sidecar)
