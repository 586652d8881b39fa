"""The hook through which a causal side model (the n-gram) mixes into evaluation.

The network side runs jitted: at every scored position p (the target
tokens[p]) the scorer returns the network's NLL and its log-softmax at the
`query_ids[p]` tokens (e.g. the n-gram's hint). The host then calls
`score(positions, nll, query_logp)` in stream order, each position once,
and sums what it returns instead of the network NLL. TTT adaptation is not
affected: it always trains on the network's own loss. See
/work/coord/INTERFACES.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class PositionMix:
    """query_ids (N, K) int32; score(positions (n,), nll (n,), query_logp (n, K)) -> float64 (n,)."""

    query_ids: np.ndarray
    score: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

    def check(self, n_tokens: int) -> None:
        if self.query_ids.ndim != 2 or self.query_ids.shape[0] != n_tokens:
            raise ValueError(f"PositionMix.query_ids must be ({n_tokens}, K), got {self.query_ids.shape}")


def from_ngram_mixer(mixer, n_tokens: int) -> PositionMix:
    """Adapt golfjax.eval.ngram's NgramMixer (hint_ids / score / needs_hint_logprob)."""
    query = np.zeros((n_tokens, 1), np.int32)
    if n_tokens > 1:
        query[1:, 0] = mixer.hint_ids(np.arange(1, n_tokens))
    if mixer.needs_hint_logprob:
        return PositionMix(query, lambda pos, nll, qlogp: mixer.score(pos, nll, qlogp[:, 0]))
    return PositionMix(query[:, :0], lambda pos, nll, qlogp: mixer.score(pos, nll))
