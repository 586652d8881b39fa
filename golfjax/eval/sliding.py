"""Sliding-window evaluation: every target scored once, with long context.

Windows of `seq_len` inputs start every `stride` tokens. The first window of a
segment scores all its positions; every later window scores only its last
`stride` positions, which see at least `seq_len - stride` tokens of context.
A later window is kept only if it has something left to score
(`start + seq_len - stride < targets`), and the last one may be partial: the
records' fixed filter, so each target is scored exactly once (the original
filter re-scored the tail; research/record-stack.md section 3.3 item 4).

A *segment* is a stretch of the stream whose context never crosses its start:
the whole stream (flat), or one document `[BOS_i, BOS_i+1]` (document
isolation; the next document's BOS is the document's last target).

Position p (1 <= p < N) means the target tokens[p] predicted from tokens[:p].
Batches have a static shape (the last is padded with empty windows), rows are
split over the mesh's data axis, and NLL is summed in float64 on the host.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from golfjax.config import ModelConfig
from golfjax.eval.mix import PositionMix
from golfjax.model import gpt
from golfjax.parallel import num_ranks, put_replicated, put_sharded, replicated, sharded_along, to_host


@dataclass(frozen=True)
class Windows:
    """A window table. Window w reads inputs tokens[start : start+length] and scores
    local positions [first, length), i.e. global positions start+first+1 .. start+length."""

    start: np.ndarray  # int64 (W,)
    length: np.ndarray  # int64 (W,) targets in the window, 1..seq_len
    first: np.ndarray  # int64 (W,) first scored local position
    seq_len: int

    def __len__(self) -> int:
        return int(self.start.shape[0])

    @property
    def scored_lo(self) -> np.ndarray:
        """First scored global position of each window."""
        return self.start + self.first + 1

    @property
    def scored_hi(self) -> np.ndarray:
        """Last scored global position of each window (inclusive)."""
        return self.start + self.length


def flat_segments(n_tokens: int) -> np.ndarray:
    """The whole stream as one segment (inputs from 0, targets 1..n-1), shape (1, 2)."""
    return np.array([[0, n_tokens - 1]], dtype=np.int64)


def document_segments(tokens: np.ndarray, bos_id: int) -> np.ndarray:
    """Segments cut at BOS: [BOS_i, BOS_i+1] (next BOS is the last target); a prefix before
    the first BOS and the part after the last BOS are segments too. Shape (S, 2)."""
    n = len(tokens)
    bos = np.flatnonzero(np.asarray(tokens) == bos_id).astype(np.int64)
    cuts = np.unique(np.concatenate([[0], bos, [n - 1]]))
    seg = np.stack([cuts[:-1], cuts[1:]], axis=1)
    return seg[seg[:, 1] > seg[:, 0]]


def make_windows(segments: np.ndarray, seq_len: int, stride: int) -> Windows:
    """The fixed window filter applied to each segment (inputs from a, targets a+1..b)."""
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    starts, lengths, firsts = [], [], []
    for a, b in np.asarray(segments, dtype=np.int64):
        targets = int(b - a)
        s = np.arange(0, targets, stride, dtype=np.int64)
        s = s[(s == 0) | (s + (seq_len - stride) < targets)]
        starts.append(a + s)
        lengths.append(np.minimum(seq_len, targets - s))
        firsts.append(np.where(s == 0, 0, seq_len - stride))
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)
    return Windows(cat(starts), cat(lengths), cat(firsts), seq_len)


def window_arrays(tokens: np.ndarray, win: Windows, sel: np.ndarray) -> tuple[np.ndarray, ...]:
    """(x, y, pos, scored) of the selected windows, (len(sel), seq_len); pos = 0 where unscored."""
    j = np.arange(win.seq_len)
    idx = win.start[sel, None] + j
    valid = j < win.length[sel, None]
    scored = valid & (j >= win.first[sel, None])
    x = np.asarray(tokens)[np.where(valid, idx, 0)].astype(np.int32)
    y = np.asarray(tokens)[np.where(valid, idx + 1, 0)].astype(np.int32)
    return x, y, np.where(scored, idx + 1, 0).astype(np.int32), scored


def mixed_nll(params, cfg: ModelConfig, x, y, pos, mix_arrays, combine: Callable | None):
    """Per-position NLL (float32), optionally mixed by a PositionMix (arrays gathered at `pos`)."""
    if combine is None:
        return gpt.token_nll(params, cfg, x, y)
    query_ids, side = mix_arrays
    logp = jax.nn.log_softmax(gpt.forward(params, cfg, x), axis=-1)
    nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
    qlogp = jnp.take_along_axis(logp, query_ids[pos], axis=-1)
    return combine(nll, qlogp, {k: v[pos] for k, v in side.items()}, y)


def device_mix(mix: PositionMix | None, mesh: Mesh) -> tuple[tuple | None, Callable | None]:
    """A PositionMix's arrays replicated on the mesh, and its combine function."""
    if mix is None:
        return None, None
    arrays = (np.asarray(mix.query_ids, np.int32), {k: np.asarray(v) for k, v in mix.side.items()})
    return put_replicated(arrays, mesh), mix.combine


@functools.lru_cache(maxsize=8)  # one compile per shape, across evaluate() calls
def make_window_scorer(cfg: ModelConfig, mesh: Mesh, combine: Callable | None = None) -> Callable:
    """Jitted (params, x, y, pos, mix_arrays) -> per-position NLL, rows split over the mesh."""
    rows = sharded_along(mesh, 0, 2)
    return jax.jit(
        lambda params, x, y, pos, arrays: mixed_nll(params, cfg, x, y, pos, arrays, combine),
        in_shardings=(replicated(mesh), rows, rows, rows, replicated(mesh)),
        out_shardings=rows,
    )


@dataclass
class Totals:
    """Float64 NLL sum, scored-target count and byte sum; optionally every (position, NLL)."""

    nll_sum: float = 0.0
    tokens: int = 0
    bytes: int = 0
    positions: list | None = None
    nlls: list | None = None

    def add(self, nll: np.ndarray, pos: np.ndarray, scored: np.ndarray, position_bytes: np.ndarray) -> None:
        self.nll_sum += float(np.where(scored, nll, 0.0).astype(np.float64).sum())
        picked = pos[scored]
        self.tokens += int(picked.size)
        self.bytes += int(position_bytes[picked].sum())
        if self.positions is not None:
            self.positions.append(picked.astype(np.int64))
            self.nlls.append(nll[scored].astype(np.float64))

    def per_position(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions, nll) of every scored target, in scoring order (needs record=True)."""
        return np.concatenate(self.positions), np.concatenate(self.nlls)


def batch_rows(batch_windows: int, mesh: Mesh) -> int:
    """Windows per forward, rounded up to a multiple of the devices."""
    ranks = num_ranks(mesh)
    return -(-batch_windows // ranks) * ranks


def evaluate_windows(
    params,
    cfg: ModelConfig,
    tokens: np.ndarray,
    position_bytes: np.ndarray,
    win: Windows,
    mesh: Mesh,
    batch_windows: int,
    mix: PositionMix | None = None,
    record: bool = False,
    progress: bool = True,
    scorer: Callable | None = None,
    timings: dict | None = None,
) -> Totals:
    """Score every window of `win` (each target once) with fixed `params`."""
    arrays, combine = device_mix(mix, mesh)
    scorer = scorer or make_window_scorer(cfg, mesh, combine)
    rows = batch_rows(batch_windows, mesh)
    totals = Totals(positions=[] if record else None, nlls=[] if record else None)

    def batch(b: int):
        sel = np.arange(b, min(b + rows, len(win)))
        x, y, pos, scored = window_arrays(tokens, win, sel)
        if len(sel) < rows:  # static shapes: pad with empty windows (nothing scored)
            pad = ((0, rows - len(sel)), (0, 0))
            x, y, pos = (np.pad(a, pad) for a in (x, y, pos))
            scored = np.pad(scored, pad)
        return len(sel), pos, scored, [put_sharded(a, mesh, 0) for a in (x, y, pos)]

    t0 = time.perf_counter()
    compiled = scorer.lower(params, *batch(0)[3], arrays).compile()  # cached by jax across calls
    t1 = time.perf_counter()
    for b in tqdm(range(0, len(win), rows), desc="sliding", unit="batch", disable=None if progress else True,
                  leave=False):
        count, pos, scored, device_args = batch(b)
        nll = to_host(compiled(params, *device_args, arrays))
        totals.add(nll[:count], pos[:count], scored[:count], position_bytes)
    if timings is not None:
        timings["compile"] = t1 - t0
        timings["score"] = time.perf_counter() - t1
    return totals
