"""The hook through which a causal side model (the n-gram) mixes into evaluation.

A `PositionMix` is computed once per validation stream on the host, from
prefix-only information (the prefix in the evaluator's `ScoringOrder`), and
combined with the network inside the jitted scorer at every scored position p
(the target tokens[p]). The evaluator gathers `query_ids[p]` log-probs of the
network and `side[name][p]`, calls `combine`, and masks padding afterwards. See /work/coord/INTERFACES.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class ScoringOrder:
    """The order in which an evaluator scores the targets, for side models that learn from
    the scored tokens as they go (the n-gram): entry i is target `positions[i]`, whose side
    statistics may use only the entries before i, and whose context may read the stream
    from `context_start[i]` on (its document's BOS when other documents' tokens before it
    are not scored yet). Stream order (`stream`) is every position 1..N-1 in turn, context
    from 0: what sliding windows and full-model TTT do."""

    positions: np.ndarray  # int64 (N - 1,): every target position once
    context_start: np.ndarray  # int64 (N - 1,)

    @staticmethod
    def stream(n_tokens: int) -> "ScoringOrder":
        return ScoringOrder(np.arange(1, n_tokens, dtype=np.int64), np.zeros(max(n_tokens - 1, 0), np.int64))

    def check(self, n_tokens: int) -> None:
        """Every target 1..N-1 exactly once, and each context starts before its target."""
        pos = np.asarray(self.positions)
        if pos.shape != (n_tokens - 1,) or np.asarray(self.context_start).shape != pos.shape:
            raise ValueError(f"a scoring order of {n_tokens} tokens lists {n_tokens - 1} targets, got {pos.shape}")
        if not np.array_equal(np.sort(pos), np.arange(1, n_tokens)):
            raise ValueError("a scoring order lists every target position 1..N-1 exactly once")
        if np.any(self.context_start < 0) or np.any(self.context_start >= pos):
            raise ValueError("a scoring order's contexts start in [0, position)")


@dataclass(frozen=True)
class PositionMix:
    """query_ids (N, K) int32; side {name: (N, ...)}; combine(nll, query_logp, side, targets) -> nll.

    combine is traced by jax: nll (B, T) float32 is the network's NLL of the
    target, query_logp (B, T, K) its log-softmax at query_ids, side the rows of
    `side` at the same positions, targets (B, T) int32. It returns the NLL in
    nats of a distribution normalised over the whole vocabulary, and must stay
    finite for any finite inputs (padding rows get position 0's data).
    """

    query_ids: np.ndarray
    side: dict
    combine: Callable

    def check(self, n_tokens: int) -> None:
        """Every array covers the whole stream, one row per position."""
        if self.query_ids.ndim != 2 or self.query_ids.shape[0] != n_tokens:
            raise ValueError(f"PositionMix.query_ids must be ({n_tokens}, K), got {self.query_ids.shape}")
        for name, arr in self.side.items():
            if np.shape(arr)[0] != n_tokens:
                raise ValueError(f"PositionMix.side[{name!r}] has {np.shape(arr)[0]} rows, stream has {n_tokens}")
