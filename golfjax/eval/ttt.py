"""Legal score-first test-time training (TTT), full-model SGD, as a `lax.scan` over chunks.

The scored positions 1..N-1 are cut into chunks of `chunk_tokens` targets.
Chunk c holds positions c*C+1 .. (c+1)*C. A sliding window is scored in
every chunk its scored range touches, only at the positions of that chunk.
So each target is scored exactly once, and while chunk c is scored every
weight has seen only targets of chunks < c.

The scan carry is (params, momentum). Each iteration:
1. scores the chunk's windows with the current params (the NLL of each of the
   chunk's positions is an output of the iteration, counted on the host);
2. then, unless it is the last chunk, trains on the chunk's own tokens
   (inputs tokens[c*C : (c+1)*C], targets = the chunk's positions):
   `epochs` passes of SGD with momentum (torch semantics: buf = m*buf + g,
   p -= lr*buf), global-norm clip, the first `freeze_blocks` physical blocks
   frozen, and a per-chunk cosine LR lr*0.5*(1+cos(pi*c/(n-1))).
This is the records' R0323/R0409 procedure (research/record-stack.md 1.13).
The scan runs `chunks_per_call` chunks per compiled call; the host loop
between calls only feeds the next chunks and advances the progress bar.
"""

from __future__ import annotations

import math
import functools
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from golfjax.config import EvalConfig, ModelConfig
from golfjax.eval.mix import PositionMix
from golfjax.eval.sliding import Totals, Windows, batch_rows, device_mix, mixed_nll
from golfjax.model import gpt
from golfjax.parallel import put_replicated, replicated, sharded_along, to_host


@dataclass(frozen=True)
class TTTPlan:
    """Which windows each chunk scores and which tokens it trains on (host, static shapes)."""

    chunk_tokens: int
    n_chunks: int
    n_targets: int
    window_ids: np.ndarray  # (n_chunks, W) int64 window index, -1 = padding
    train: np.ndarray  # (n_chunks,) bool: every chunk but the last, if it is whole
    lr_scale: np.ndarray  # (n_chunks,) float32 cosine factor

    def chunk_positions(self, c: int) -> tuple[int, int]:
        """Positions [lo, hi] (inclusive) of chunk c."""
        lo = c * self.chunk_tokens + 1
        return lo, min((c + 1) * self.chunk_tokens, self.n_targets)

    def trained_positions(self, c: int) -> tuple[int, int] | None:
        """Target positions chunk c adapts on (inclusive), or None."""
        return self.chunk_positions(c) if self.train[c] else None


def plan_chunks(win: Windows, n_targets: int, chunk_tokens: int, rows: int) -> TTTPlan:
    """Assign windows to every chunk their scored range touches; pad each chunk's list to
    a common multiple of `rows` (the windows per forward)."""
    n_chunks = max(1, -(-n_targets // chunk_tokens))
    c_lo = (win.scored_lo - 1) // chunk_tokens
    c_hi = (win.scored_hi - 1) // chunk_tokens
    reps = (c_hi - c_lo + 1).astype(np.int64)
    wid = np.repeat(np.arange(len(win)), reps)
    cid = np.repeat(c_lo, reps) + (np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps))
    counts = np.bincount(cid, minlength=n_chunks)
    width = max(rows, -(-int(counts.max()) // rows) * rows)
    table = np.full((n_chunks, width), -1, np.int64)
    order = np.lexsort((wid, cid))
    slot = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    table[cid[order], slot] = wid[order]
    train = np.arange(n_chunks) < n_chunks - 1
    if n_targets % chunk_tokens:  # a partial chunk is the last one; it is never trained on
        train[-1] = False
    denom = max(n_chunks - 1, 1)
    lr_scale = (0.5 * (1.0 + np.cos(np.pi * np.arange(n_chunks) / denom))).astype(np.float32)
    return TTTPlan(chunk_tokens, n_chunks, n_targets, table, train, lr_scale)


def _freeze_mask(params, freeze_blocks: int):
    """1.0 where a leaf may move, 0.0 on the first `freeze_blocks` rows of stacked block params."""
    def leaf_mask(path, leaf):
        if freeze_blocks and path and getattr(path[0], "key", None) == "blocks":
            rows = (jnp.arange(leaf.shape[0]) >= freeze_blocks).astype(leaf.dtype)
            return rows.reshape((-1,) + (1,) * (leaf.ndim - 1))
        return jnp.ones((), leaf.dtype)
    return jax.tree_util.tree_map_with_path(leaf_mask, params)


def sgd_on_chunk(cfg: ModelConfig, ecfg: EvalConfig, row_sharding, seq_len: int, carry, x, y, lr, epochs: int):
    """`epochs` passes of momentum SGD over one chunk: inputs x and targets y (C each), in
    sequences of ttt_seq_len, batches of ttt_batch_seqs; global-norm clip; the first
    ttt_freeze_blocks blocks frozen. Torch SGD: buf = m*buf + g; p -= lr*buf."""
    C = ecfg.ttt_chunk_tokens
    S = ecfg.ttt_seq_len or seq_len
    n_seq = C // S
    batch = min(ecfg.ttt_batch_seqs, n_seq)
    steps = n_seq // batch
    params, mom = carry
    xs, ys = x.reshape(n_seq, S), y.reshape(n_seq, S)
    mask = _freeze_mask(params, ecfg.ttt_freeze_blocks)

    def step(carry, i):
        params, mom = carry
        b = i % steps
        x = jax.lax.dynamic_slice_in_dim(xs, b * batch, batch)
        y = jax.lax.dynamic_slice_in_dim(ys, b * batch, batch)
        x, y = (jax.lax.with_sharding_constraint(a, row_sharding) for a in (x, y))
        grads = jax.grad(lambda p: jnp.mean(gpt.token_nll(p, cfg, x, y)))(params)
        grads = jax.tree.map(lambda g, m: g * m, grads, mask)
        if ecfg.ttt_grad_clip > 0:
            norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
            scale = jnp.minimum(1.0, ecfg.ttt_grad_clip / (norm + 1e-6))
            grads = jax.tree.map(lambda g: g * scale, grads)
        mom = jax.tree.map(lambda m, g: ecfg.ttt_momentum * m + g, mom, grads)
        params = jax.tree.map(lambda p, m: p - lr * m, params, mom)
        return (params, mom), None

    (params, mom), _ = jax.lax.scan(step, (params, mom), jnp.arange(epochs * steps))
    return params, mom


SGD_FIELDS = ("ttt_chunk_tokens", "ttt_seq_len", "ttt_batch_seqs", "ttt_freeze_blocks", "ttt_grad_clip",
              "ttt_momentum")  # what sgd_on_chunk reads of the EvalConfig


def make_global_sgd(cfg: ModelConfig, ecfg: EvalConfig, mesh: Mesh, seq_len: int, epochs: int) -> Callable:
    """Jitted (params, momentum, inputs (C,), targets (C,), lr) -> (params, momentum): one chunk of SGD.
    Compiled once per model and SGD settings (the EvalConfig's other fields do not matter)."""
    sgd_only = EvalConfig(**{name: getattr(ecfg, name) for name in SGD_FIELDS})
    return _global_sgd_step(cfg, sgd_only, mesh, seq_len, epochs)


@functools.lru_cache(maxsize=4)
def _global_sgd_step(cfg: ModelConfig, ecfg: EvalConfig, mesh: Mesh, seq_len: int, epochs: int) -> Callable:
    rows = sharded_along(mesh, 0, 2)
    fn = lambda params, mom, x, y, lr: sgd_on_chunk(cfg, ecfg, rows, seq_len, (params, mom), x, y, lr, epochs)
    rep = replicated(mesh)
    return jax.jit(fn, in_shardings=rep, out_shardings=rep)


def global_sgd(params, cfg: ModelConfig, ecfg: EvalConfig, x: np.ndarray, y: np.ndarray, mesh: Mesh,
               seq_len: int, lr: float, epochs: int):
    """Full-model SGD over flat inputs x and their targets y (phased TTT's global step), in chunks
    of ttt_chunk_tokens with a cosine LR over the chunks; a partial last chunk is dropped.
    Returns new params."""
    C = ecfg.ttt_chunk_tokens
    if len(x) != len(y):
        raise ValueError(f"global SGD: {len(x)} inputs but {len(y)} targets")
    n = len(x) // C
    if n == 0:
        return params
    step = make_global_sgd(cfg, ecfg, mesh, seq_len, epochs)
    mom = jax.tree.map(jnp.zeros_like, params)
    x, y = np.asarray(x, np.int32), np.asarray(y, np.int32)
    for c in range(n):
        scale = 0.5 * (1.0 + math.cos(math.pi * c / max(n - 1, 1)))
        part = slice(c * C, (c + 1) * C)
        params, mom = step(params, mom, put_replicated(x[part], mesh), put_replicated(y[part], mesh),
                           np.float32(lr * scale))
    return params


@functools.lru_cache(maxsize=8)  # one compile per shape, across evaluate() calls
def make_ttt_scan(cfg: ModelConfig, ecfg: EvalConfig, mesh: Mesh, seq_len: int, rows: int,
                  combine: Callable | None) -> Callable:
    """Jitted scan over a block of chunks: (carry, stream, windows..., chunk ids, train, lr, mix)
    -> (carry, per-chunk NLL (G, C), per-chunk score counts (G, C))."""
    C = ecfg.ttt_chunk_tokens
    row_sharding = sharded_along(mesh, 0, 2)
    j = jnp.arange(seq_len)

    def score_chunk(params, stream, starts, lengths, firsts, c, arrays):
        def one_batch(acc, w):
            s, ln, f = w
            idx = s[:, None] + j
            valid = j < ln[:, None]
            scored = valid & (j >= f[:, None])
            x = jnp.where(valid, stream[idx], 0)
            y = jnp.where(valid, stream[idx + 1], 0)
            pos = jnp.where(scored, idx + 1, 0)
            x, y, pos = (jax.lax.with_sharding_constraint(a, row_sharding) for a in (x, y, pos))
            nll = mixed_nll(params, cfg, x, y, pos, arrays, combine)
            local = pos - 1 - c * C
            keep = scored & (local >= 0) & (local < C)
            slot = jnp.where(keep, local, C)  # C is out of range: dropped
            nll_acc, cnt_acc = acc
            nll_acc = nll_acc.at[slot].add(jnp.where(keep, nll, 0.0), mode="drop")
            cnt_acc = cnt_acc.at[slot].add(keep.astype(jnp.int32), mode="drop")
            return (nll_acc, cnt_acc), None

        shape = (-1, rows)
        ws = (starts.reshape(shape), lengths.reshape(shape), firsts.reshape(shape))
        init = (jnp.zeros(C, jnp.float32), jnp.zeros(C, jnp.int32))
        (nll_c, cnt_c), _ = jax.lax.scan(one_batch, init, ws)
        return nll_c, cnt_c

    def adapt(carry, stream, c, lr):
        toks = jax.lax.dynamic_slice(stream, (c * C,), (C + 1,))
        return sgd_on_chunk(cfg, ecfg, row_sharding, seq_len, carry, toks[:-1], toks[1:], lr, ecfg.ttt_epochs)

    def run(carry, stream, starts, lengths, firsts, chunk_ids, train, lr, arrays):
        def body(carry, xs):
            s, ln, f, c, tr, lr_c = xs
            nll_c, cnt_c = score_chunk(carry[0], stream, s, ln, f, c, arrays)  # 1. score
            carry = jax.lax.cond(tr, lambda cr: adapt(cr, stream, c, lr_c), lambda cr: cr, carry)  # 2. adapt
            return carry, (nll_c, cnt_c)

        return jax.lax.scan(body, carry, (starts, lengths, firsts, chunk_ids, train, lr))

    rep = replicated(mesh)
    return jax.jit(run, in_shardings=rep, out_shardings=rep)


def check_ttt_shapes(ecfg: EvalConfig, seq_len: int) -> None:
    """The chunk must be whole training sequences, in whole batches (static shapes)."""
    S = ecfg.ttt_seq_len or seq_len
    C = ecfg.ttt_chunk_tokens
    if C % S:
        raise ValueError(f"ttt_chunk_tokens={C} must be a multiple of the TTT sequence length {S}")
    n_seq = C // S
    batch = min(ecfg.ttt_batch_seqs, n_seq)
    if n_seq % batch:
        raise ValueError(f"ttt_batch_seqs={ecfg.ttt_batch_seqs} must divide the {n_seq} sequences of a chunk")


def evaluate_ttt(
    params,
    cfg: ModelConfig,
    ecfg: EvalConfig,
    tokens: np.ndarray,
    position_bytes: np.ndarray,
    win: Windows,
    mesh: Mesh,
    mix: PositionMix | None = None,
    record: bool = False,
    progress: bool = True,
    timings: dict | None = None,
) -> tuple[Totals, TTTPlan, object]:
    """Score-first TTT over the stream; returns the totals, the plan, and the adapted params."""
    if ecfg.ttt_variant != "full":
        raise NotImplementedError(f"not implemented yet: ttt_variant={ecfg.ttt_variant} (only 'full')")
    import time

    seq_len = win.seq_len
    check_ttt_shapes(ecfg, seq_len)
    t0 = time.perf_counter()
    rows = batch_rows(ecfg.eval_batch_windows, mesh)
    n_targets = len(tokens) - 1
    plan = plan_chunks(win, n_targets, ecfg.ttt_chunk_tokens, rows)
    C, G = ecfg.ttt_chunk_tokens, ecfg.ttt_chunks_per_call
    pad = C + seq_len + 2  # slices past the end read zeros, never clamp
    stream = put_replicated(np.concatenate([np.asarray(tokens, np.int32), np.zeros(pad, np.int32)]), mesh)
    ids = plan.window_ids
    safe = np.maximum(ids, 0)
    starts = np.where(ids >= 0, win.start[safe], 0).astype(np.int32)
    lengths = np.where(ids >= 0, win.length[safe], 0).astype(np.int32)
    firsts = np.where(ids >= 0, win.first[safe], 0).astype(np.int32)
    arrays, combine = device_mix(mix, mesh)
    run = make_ttt_scan(cfg, ecfg, mesh, seq_len, rows, combine)
    carry = put_replicated((params, jax.tree.map(jnp.zeros_like, params)), mesh)
    lr = (ecfg.ttt_lr * plan.lr_scale).astype(np.float32)

    def block(b: int):
        sl = slice(b, b + G)
        n = len(range(plan.n_chunks)[sl])
        padn = lambda a, v=0: np.concatenate([a[sl], np.full((G - n,) + a.shape[1:], v, a.dtype)])
        return n, (padn(starts), padn(lengths), padn(firsts),
                   padn(np.arange(plan.n_chunks, dtype=np.int32), plan.n_chunks),
                   padn(plan.train, False), padn(lr))

    _, first_block = block(0)
    t_plan = time.perf_counter()
    compiled = run.lower(carry, stream, *first_block, arrays).compile()  # cached by jax across calls
    t1 = time.perf_counter()
    totals = Totals(positions=[] if record else None, nlls=[] if record else None)
    for b in tqdm(range(0, plan.n_chunks, G), desc="ttt", unit="call", disable=None if progress else True,
                  leave=False):
        n, xs = block(b)
        carry, (nll, cnt) = compiled(carry, stream, *xs, arrays)
        nll, cnt = to_host(nll)[:n], to_host(cnt)[:n]
        for k in range(n):
            lo, hi = plan.chunk_positions(b + k)
            width = hi - lo + 1
            if not np.all(cnt[k, :width] == 1) or np.any(cnt[k, width:]):
                raise AssertionError(f"TTT chunk {b + k}: a position was scored {cnt[k].max()} times or not at all")
            pos = np.arange(lo, hi + 1)
            totals.add(nll[k, :width], pos, np.ones(width, bool), position_bytes)
    if timings is not None:
        timings["ttt_prepare"] = t_plan - t0
        timings["compile"] = t1 - t_plan
        timings["ttt_loop"] = time.perf_counter() - t1
    return totals, plan, carry[0]
