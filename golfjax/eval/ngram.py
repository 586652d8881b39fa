"""Causal n-gram blending for evaluation: interpolation with backoff, or the A2 hint-token tilt.

The n-gram model at stream position p is built from the validation tokens
before p only (the targets already scored when the evaluator scores in stream
order), and its distribution over the whole vocabulary is normalised by
construction, so the blend is a legal "prefix-only, normalised" predictor.
An evaluator that scores out of stream order (per-document LoRA TTT) gives its
`golfjax.eval.mix.ScoringOrder`: the statistics at p are then those of the
targets scored before p in that order, with contexts cut at p's document start.

All per-position statistics are computed in one vectorised pass: for every
order k the context of position p is a 64-bit hash of tokens[p-k:p]; a stable
sort by context (then by (context, target)) gives, for each p, how often its
context and its (context, target) pair occurred *before* p. Hash collisions can
only merge two contexts into one; the merged counts still add up
(sum_y count(ctx, y) == count(ctx)), so every distribution stays exactly
normalised whatever collides.

Two ways to mix with the network's distribution p_nn:

* "interp": p = lam * p_nn + (1 - lam) * p_ng, where p_ng is an interpolated
  Witten-Bell model over the given orders (each order backs off to the one
  below, down to a uniform distribution). Needs only p_nn(target).
* "tilt": A2's token tilt p'(t) ∝ p_nn(t) * exp(beta * [t == hint]); the hint
  is the most frequent continuation of the highest order whose context passes
  its confidence and count thresholds. Needs p_nn(hint) as well.

The Evaluator (modes "sliding+ngram", "ttt+ngram") takes `build_position_mix`:
the per-position arrays plus a jitted `combine` applied to the network's
log-probs on device. `NgramMixer` is the same on the host (benchmarks, tests);
its `score` enforces stream order: each call's positions are strictly
increasing and after every earlier position, so no target is scored twice.

The tilt's agreement bonus (+agree_bonus per further passing order with the
same hint) and "count" meaning the context's count are our reading of A2's
description; its C++ kernel was not reproduced.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

MODES = ("interp", "tilt")
_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio); wraps mod 2**64


@dataclass(frozen=True)
class NgramSpec:
    """What the mixer does; built from the config's `ngram` section by `spec_from_config`.

    orders: context lengths used (interp: backoff chain, tilt: candidate experts).
    lam: the network's weight in "interp".
    base_beta, agree_bonus: tilt strength beta = base_beta * confidence
        + agree_bonus * (number of other passing orders with the same hint).
    min_confidence, min_count: per tilt order, the best token's share of the
        context's count and the context count it needs.
    """

    mode: str = "interp"
    orders: tuple[int, ...] = (1, 2, 3, 4)
    lam: float = 0.9
    base_beta: float = 2.0
    agree_bonus: float = 0.1
    min_confidence: tuple[float, ...] = ()
    min_count: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown n-gram mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not self.orders or any(k < 1 for k in self.orders) or list(self.orders) != sorted(set(self.orders)):
            raise ValueError(f"n-gram orders must be distinct increasing integers >= 1, got {self.orders}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"ngram_lambda must be in [0, 1], got {self.lam}")
        if self.mode == "tilt":
            n = len(self.orders)
            if len(self.min_confidence) != n or len(self.min_count) != n:
                raise ValueError(
                    f"tilt needs one min_confidence and one min_count per order ({n} orders), "
                    f"got {len(self.min_confidence)} and {len(self.min_count)}"
                )


def a2_thresholds(orders: tuple[int, ...]) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """A2's per-order gates: share >= 0.70 with count >= 3 up to order 10, 0.60/2 to 13, 0.50/2 above."""
    conf = tuple(0.70 if k <= 10 else 0.60 if k <= 13 else 0.50 for k in orders)
    count = tuple(3 if k <= 10 else 2 for k in orders)
    return conf, count


def parse_orders(text: str) -> tuple[int, ...]:
    """'1,2,3' or '8:16:2' (start:stop:step, stop included) -> a tuple of orders."""
    text = text.strip()
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            start, stop, step = (parts + [1])[:3] if len(parts) == 2 else parts
            return tuple(range(start, stop + 1, step))
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"cannot read n-gram orders {text!r}: use '1,2,3' or 'start:stop:step'") from None


# ---------------------------------------------------------------- per-position counts


def context_hashes(tokens: np.ndarray, order: int) -> np.ndarray:
    """uint64 hash of tokens[p-order:p] for every p >= order (length len(tokens) - order)."""
    t = np.asarray(tokens).astype(np.uint64) + np.uint64(1)
    n = len(t)
    h = np.zeros(n - order, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(order, 0, -1):  # oldest token first
            h = (h + t[order - i : n - i]) * _HASH_MULT  # the multiply spreads every token into the top bits
            h ^= h >> np.uint64(32)
    return h


def _index_bits(m: int) -> int:
    """Bits that hold an index into m elements (the low bits of the sort keys)."""
    return max(1, int(m - 1).bit_length())


def _sort_with_index(high: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort by (high, index) as one uint64 value sort; returns (sorted high, index).

    Sorting values is several times faster than a stable argsort, and the index
    in the low bits makes the order stable by construction.
    """
    mask = np.uint64((1 << bits) - 1)
    keys = (high.astype(np.uint64) << np.uint64(bits)) | np.arange(len(high), dtype=np.uint64)
    keys.sort()
    return keys >> np.uint64(bits), (keys & mask).astype(_index_dtype(len(high)))


def _index_dtype(m: int) -> type:
    """int32 indices while they fit: half the memory traffic of the gathers and scatters."""
    return np.int32 if m < 2**31 - 1 else np.int64


def _run_starts(new: np.ndarray) -> np.ndarray:
    """For each element of a sorted array, the index where its run of equal keys starts."""
    idx = np.arange(len(new), dtype=_index_dtype(len(new)))
    return np.maximum.accumulate(np.where(new, idx, 0))


@dataclass(frozen=True)
class OrderCounts:
    """Counts seen strictly before each position p (arrays of length len(tokens)).

    ctx: times the order-k context of p occurred before p (0 where p < k).
    joint: times (context, tokens[p]) occurred before p.
    types: distinct tokens that followed the context before p.
    best, best_count: the most frequent follower before p (first to reach the
        count wins ties) and its count; best = -1 when ctx == 0 (empty arrays
        unless asked for with with_best).
    """

    ctx: np.ndarray
    joint: np.ndarray
    types: np.ndarray
    best: np.ndarray
    best_count: np.ndarray


def order_counts(tokens: np.ndarray, order: int, with_best: bool = False) -> OrderCounts:
    """Causal counts of one order at every position of the stream, vectorised.

    Contexts are grouped by the top (64 - index bits) bits of their hash (a
    collision merges two contexts, which keeps every count consistent), pairs
    (context, target) exactly.
    """
    tokens = np.asarray(tokens).astype(np.int64)
    n = len(tokens)
    out = _empty_counts(n, with_best)
    if n <= order:
        return OrderCounts(**out)
    _check_stream(tokens, n - order)
    _count_rows(context_hashes(tokens, order), tokens[order:], with_best, out, order)
    return OrderCounts(**out)


def scoring_order_counts(tokens: np.ndarray, order: int, scoring, with_best: bool = False) -> OrderCounts:
    """`order_counts` when the targets are scored in the order `scoring` (a
    `golfjax.eval.mix.ScoringOrder`): the counts at position p are those of the targets
    scored before p, and a context tokens[p-order:p] exists only if it starts at or after
    p's `context_start` (elsewhere: ctx 0, and p adds to no count of this order). Arrays are
    indexed by stream position, as order_counts'; in stream order the two are equal."""
    tokens = np.asarray(tokens).astype(np.int64)
    n = len(tokens)
    out = _empty_counts(n, with_best)
    pos = np.asarray(scoring.positions, np.int64)
    rows = pos[pos - order >= np.asarray(scoring.context_start, np.int64)]
    if rows.size == 0:
        return OrderCounts(**out)
    _check_stream(tokens, rows.size)
    _count_rows(context_hashes(tokens, order)[rows - order], tokens[rows], with_best, out, rows)
    return OrderCounts(**out)


def _empty_counts(n: int, with_best: bool) -> dict:
    out = {name: np.zeros(n, np.int64) for name in ("ctx", "joint", "types")}
    out["best"] = np.full(n if with_best else 0, -1, np.int64)  # left empty when not asked for
    out["best_count"] = np.zeros(n if with_best else 0, np.int64)
    return out


def _check_stream(tokens: np.ndarray, m: int) -> None:
    if _index_bits(m) > 40 or int(tokens.min()) < 0 or int(tokens.max()) >= 1 << 16:
        raise ValueError("n-gram streams are limited to 2**40 positions and token ids in [0, 2**16)")


def _count_rows(hashes: np.ndarray, y: np.ndarray, with_best: bool, out: dict, dest) -> None:
    """Counts of rows (context hash, target), each counting only the rows before it, written to
    out[name][dest + row] (dest an int) or out[name][dest[row]] (dest an index array)."""
    m = len(hashes)
    bits = _index_bits(m)
    ctx_hi, c_order = _sort_with_index(hashes >> np.uint64(bits), bits)
    where = dest + c_order if isinstance(dest, int) else dest[c_order]
    idx = np.arange(m, dtype=_index_dtype(m))
    new_ctx = np.empty(m, dtype=bool)
    new_ctx[0] = True
    new_ctx[1:] = ctx_hi[1:] != ctx_hi[:-1]
    c_start = _run_starts(new_ctx)
    dense = np.cumsum(new_ctx, dtype=idx.dtype) - 1  # context id, in ctx-sorted order
    y_s = y[c_order]
    # pairs: sort by (target, ctx-sorted index); equal (target, context) are then contiguous runs
    y2, i2 = _sort_with_index(y_s, bits)
    d2 = dense[i2]
    new_pair = np.empty(m, dtype=bool)
    new_pair[0] = True
    new_pair[1:] = (y2[1:] != y2[:-1]) | (d2[1:] != d2[:-1])
    joint_s = np.empty(m, idx.dtype)
    joint_s[i2] = idx - _run_starts(new_pair)
    # distinct followers before p: first occurrences of a pair, cumulated within the context group
    first = (joint_s == 0).astype(idx.dtype)
    incl = np.cumsum(first, dtype=idx.dtype)
    types_s = incl - first - (incl[c_start] - first[c_start])
    for name, values in (("ctx", idx - c_start), ("joint", joint_s), ("types", types_s)):
        out[name][where] = values
    if with_best:
        best_s, count_s = _running_best(c_start, joint_s, y_s)
        out["best"][where] = best_s
        out["best_count"][where] = count_s


def _running_best(c_start: np.ndarray, joint_s: np.ndarray, y_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Most frequent earlier follower of each position's context, in ctx-sorted order.

    Within a context group (contiguous, in stream order) a pair's count after a
    position is joint + 1; the best token changes only when that count beats the
    running maximum (ties keep the earlier best).
    """
    m = len(c_start)
    idx = np.arange(m, dtype=c_start.dtype)
    count_after = joint_s.astype(np.int64) + 1
    offset = c_start.astype(np.int64) * np.int64(m + 1)  # keeps each group's running max apart
    run_max = np.maximum.accumulate(offset + count_after) - offset
    first = idx == c_start
    prev_max = np.where(first, 0, np.concatenate([[0], run_max[:-1]]))
    record = count_after > prev_max
    best_after = y_s[np.maximum.accumulate(np.where(record, idx, -1))]
    best = np.where(first, -1, np.concatenate([[-1], best_after[:-1]]))
    best_count = np.where(first, 0, np.concatenate([[0], run_max[:-1]]))
    return best, best_count


# ---------------------------------------------------------------- the two n-gram predictors


def _counts_per_order(tokens: np.ndarray, orders: tuple[int, ...], with_best: bool,
                      scoring=None) -> list[OrderCounts]:
    """order_counts (or scoring_order_counts) for every order, the orders in parallel threads
    (NumPy's sorts and element-wise passes release the GIL); GOLFJAX_NGRAM_THREADS caps the threads."""
    if scoring is None:
        count = lambda k: order_counts(tokens, k, with_best)
    else:
        count = lambda k: scoring_order_counts(tokens, k, scoring, with_best)
    threads = int(os.environ.get("GOLFJAX_NGRAM_THREADS", "0")) or min(len(orders), os.cpu_count() or 1)
    if threads <= 1 or len(orders) == 1:
        return [count(k) for k in orders]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(count, orders))


def witten_bell_target_prob(tokens: np.ndarray, orders: tuple[int, ...], vocab_size: int,
                            scoring=None) -> np.ndarray:
    """p_ng(tokens[p] | tokens[:p]) for every p (float64), interpolated Witten-Bell over `orders`.

    p_k(y) = (c(ctx, y) + T(ctx) * p_{k-1}(y)) / (c(ctx) + T(ctx)), or p_{k-1}(y) when the
    context is unseen; the chain starts from the uniform 1/V, so p_k sums to 1 over the vocab.
    With a `scoring` order the counts are those of the targets scored before p (see
    `scoring_order_counts`).
    """
    tokens = np.asarray(tokens)
    p = np.full(len(tokens), 1.0 / vocab_size)
    for c in _counts_per_order(tokens, orders, False, scoring):
        seen = c.ctx > 0
        denom = np.where(seen, c.ctx + c.types, 1).astype(np.float64)
        p = np.where(seen, (c.joint + c.types * p) / denom, p)
    return p


def witten_bell_distribution(tokens: np.ndarray, p: int, orders: tuple[int, ...], vocab_size: int) -> np.ndarray:
    """The full distribution over the vocab at position p, from explicit counts of tokens[:p].

    A slow, independent re-statement of the model (dictionaries, no sorting, no hashing),
    used by the tests to check normalisation and the vectorised path.
    """
    toks = [int(t) for t in np.asarray(tokens)[:p]]
    dist = np.full(vocab_size, 1.0 / vocab_size)
    for k in orders:
        if p < k:
            continue
        ctx = tuple(toks[p - k : p])
        follow = np.zeros(vocab_size)
        for q in range(k, p):
            if tuple(toks[q - k : q]) == ctx:
                follow[toks[q]] += 1
        total = follow.sum()
        if total == 0:
            continue
        types = float((follow > 0).sum())
        dist = (follow + types * dist) / (total + types)
    return dist


@dataclass(frozen=True)
class Hints:
    """Per position: the hint token (-1 for none) and its tilt strength beta (0 for none)."""

    token: np.ndarray
    beta: np.ndarray


def tilt_hints(tokens: np.ndarray, spec: NgramSpec, scoring=None) -> Hints:
    """A2's hint per position from prefix-only counts (prefix of the `scoring` order if given):
    the highest passing order wins."""
    n = len(tokens)
    hint = np.full(n, -1, np.int64)
    conf_won = np.zeros(n)
    per_order = []
    counts = _counts_per_order(tokens, spec.orders, True, scoring)
    for c, min_conf, min_count in zip(counts, spec.min_confidence, spec.min_count):
        conf = np.where(c.ctx > 0, c.best_count / np.maximum(c.ctx, 1), 0.0)
        ok = (c.ctx >= min_count) & (conf >= min_conf) & (c.best >= 0)
        per_order.append((ok, c.best))
        hint = np.where(ok, c.best, hint)  # later (higher) orders override
        conf_won = np.where(ok, conf, conf_won)
    agree = np.zeros(n)
    for ok, best in per_order:
        agree += ok & (best == hint)
    has = hint >= 0
    beta = np.where(has, spec.base_beta * conf_won + spec.agree_bonus * np.maximum(agree - 1, 0), 0.0)
    return Hints(hint, beta)


# ---------------------------------------------------------------- mixing


def interp_nll(nll_nn: np.ndarray, p_ng: np.ndarray, lam: float) -> np.ndarray:
    """-log(lam * p_nn(y) + (1 - lam) * p_ng(y)), computed stably in float64."""
    nll_nn = np.asarray(nll_nn, np.float64)
    p_ng = np.asarray(p_ng, np.float64)
    if lam >= 1.0:
        return nll_nn
    if lam <= 0.0:
        return -np.log(p_ng)
    return -np.logaddexp(math.log(lam) - nll_nn, math.log1p(-lam) + np.log(p_ng))


def tilt_nll(nll_nn: np.ndarray, logp_hint: np.ndarray, beta: np.ndarray, target_is_hint: np.ndarray) -> np.ndarray:
    """NLL under p'(t) ∝ p(t) exp(beta [t = hint]): NLL + log(1 + p_hint (e^beta - 1)) - beta [y = hint]."""
    nll_nn = np.asarray(nll_nn, np.float64)
    beta = np.asarray(beta, np.float64)
    p_hint = np.exp(np.minimum(np.asarray(logp_hint, np.float64), 0.0))
    log_z = np.log1p(p_hint * np.expm1(beta))
    return nll_nn + log_z - beta * np.asarray(target_is_hint, np.float64)


class NgramMixer:
    """Blends the network's per-target NLL with the causal n-gram, in stream order (or in a
    given `golfjax.eval.mix.ScoringOrder`).

    Built once over the whole validation stream (every statistic at position p
    uses tokens before p only, or the targets scored before p in `scoring`); `score`
    then mixes chunk by chunk and refuses positions that are not strictly after
    everything scored so far in that order.
    """

    def __init__(self, spec: NgramSpec, tokens: np.ndarray, vocab_size: int, scoring=None):
        tokens = np.asarray(tokens)
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
            raise ValueError(f"token ids outside [0, {vocab_size}) for the n-gram")
        self.spec = spec
        self.vocab_size = vocab_size
        self.tokens = tokens
        self.scoring = scoring
        self.last_scored = 0  # rank of the last scored target; position 0 (the first BOS) is never one
        self._rank = None  # stream order: a position's rank is itself
        if scoring is not None:
            scoring.check(len(tokens))
            self._rank = np.zeros(len(tokens), np.int64)
            self._rank[np.asarray(scoring.positions, np.int64)] = np.arange(1, len(tokens))
        if spec.mode == "interp":
            self.p_ng = witten_bell_target_prob(tokens, spec.orders, vocab_size, scoring)
            self.hints = None
        else:
            self.p_ng = None
            self.hints = tilt_hints(tokens, spec, scoring)

    @property
    def needs_hint_logprob(self) -> bool:
        return self.spec.mode == "tilt"

    def hint_ids(self, positions: np.ndarray) -> np.ndarray:
        """Token ids whose network log-prob `score` needs (0 where there is no hint; harmless)."""
        pos = np.asarray(positions, np.int64)
        if self.hints is None:
            return np.zeros(len(pos), np.int32)
        return np.maximum(self.hints.token[pos], 0).astype(np.int32)

    def score(self, positions: np.ndarray, nll: np.ndarray, logp_hint: np.ndarray | None = None) -> np.ndarray:
        """Blended NLL (float64) of the targets tokens[positions]; advances the scored frontier."""
        pos = np.asarray(positions, np.int64).reshape(-1)
        nll = np.asarray(nll, np.float64).reshape(-1)
        if pos.shape != nll.shape:
            raise ValueError(f"{len(pos)} positions but {len(nll)} NLLs")
        if pos.size == 0:
            return nll
        if int(pos.max()) >= len(self.tokens) or int(pos.min()) < 1:
            raise ValueError(f"positions {int(pos.min())}..{int(pos.max())} outside the stream's targets "
                             f"1..{len(self.tokens) - 1}")
        rank = pos if self._rank is None else self._rank[pos]
        if int(rank[0]) <= self.last_scored or (pos.size > 1 and bool(np.any(np.diff(rank) <= 0))):
            order = "stream order" if self._rank is None else "the scoring order"
            raise ValueError(
                f"n-gram blending scores targets in {order}, each once: positions must come strictly "
                f"after each other and after the last one scored (got {int(pos[0])}..{int(pos[-1])})"
            )
        self.last_scored = int(rank[-1])
        if self.spec.mode == "interp":
            return interp_nll(nll, self.p_ng[pos], self.spec.lam)
        if logp_hint is None:
            raise ValueError("tilt mode needs the network's log-prob of the hint token (logp_hint)")
        hint = self.hints.token[pos]
        lp = np.asarray(logp_hint, np.float64).reshape(-1)
        return tilt_nll(nll, lp, self.hints.beta[pos], hint == self.tokens[pos])


def spec_from_config(ng) -> NgramSpec:
    """NgramSpec from the config's `ngram` section (golfjax.config.NgramConfig)."""
    if ng.ngram_mode not in ("interp", "tilt"):
        raise ValueError(f"unknown n-gram mode {ng.ngram_mode!r} (ngram.ngram_mode): choose interp or tilt")
    orders = parse_orders(ng.ngram_orders)
    conf, count = a2_thresholds(orders)
    return NgramSpec(
        mode=ng.ngram_mode, orders=orders, lam=ng.ngram_lambda, base_beta=ng.ngram_base_beta,
        agree_bonus=ng.ngram_agree_bonus, min_confidence=conf, min_count=count,
    )


def build_mixer(ng, tokens: np.ndarray, vocab_size: int, scoring=None) -> NgramMixer:
    """The host-side mixer a config's `ngram` section asks for over the validation stream
    (scored in stream order, or in the `scoring` order)."""
    return NgramMixer(spec_from_config(ng), tokens, vocab_size, scoring)


# ---------------------------------------------------------------- the Evaluator's hook (golfjax.eval.mix)


@dataclass(frozen=True)
class InterpCombine:
    """Device-side interp: -log(lam p_nn(y) + (1 - lam) p_ng(y)); hashable so the scorer compiles once."""

    lam: float

    def __call__(self, nll, query_logp, side, targets):
        import jax.numpy as jnp

        if self.lam >= 1.0:
            return nll
        log_ng = side["log_p_ng"]
        if self.lam <= 0.0:
            return -log_ng
        return -jnp.logaddexp(math.log(self.lam) - nll, math.log1p(-self.lam) + log_ng)


@dataclass(frozen=True)
class TiltCombine:
    """Device-side A2 tilt: NLL + log(1 + p_hint (e^beta - 1)) - beta [y = hint]."""

    def __call__(self, nll, query_logp, side, targets):
        import jax.numpy as jnp

        beta = side["beta"]
        p_hint = jnp.exp(jnp.minimum(query_logp[..., 0], 0.0))
        is_hint = (targets == side["hint"]).astype(nll.dtype)
        return nll + jnp.log1p(p_hint * jnp.expm1(beta)) - beta * is_hint


def position_mix_from_spec(spec: NgramSpec, tokens: np.ndarray, vocab_size: int, scoring=None):
    """A `golfjax.eval.mix.PositionMix` over the stream: per-position arrays from prefix-only counts
    (the prefix in the `scoring` order if given, else in stream order)."""
    from golfjax.eval.mix import PositionMix

    tokens = np.asarray(tokens).reshape(-1)
    mixer = NgramMixer(spec, tokens, vocab_size, scoring)
    n = len(tokens)
    if spec.mode == "interp":
        side = {"log_p_ng": np.log(mixer.p_ng).astype(np.float32)}
        return PositionMix(np.zeros((n, 0), np.int32), side, InterpCombine(float(spec.lam)))
    hint = mixer.hints.token.astype(np.int32)
    side = {"beta": mixer.hints.beta.astype(np.float32), "hint": hint}
    return PositionMix(np.maximum(hint, 0)[:, None], side, TiltCombine())


def build_position_mix(cfg, tokens: np.ndarray, scoring=None):
    """The Evaluator's n-gram hook (modes "sliding+ngram" / "ttt+ngram"): cfg.ngram over `tokens`,
    scored in stream order or in the evaluator's `scoring` order (LoRA TTT)."""
    return position_mix_from_spec(spec_from_config(cfg.ngram), tokens, cfg.model.vocab_size, scoring)
