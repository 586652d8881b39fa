"""The hook through which a causal side model (the n-gram) mixes into evaluation.

A `PositionMix` is computed once per validation stream on the host, from
prefix-only information, and combined with the network inside the jitted
scorer at every scored position p (the target tokens[p]). The evaluator
gathers `query_ids[p]` log-probs of the network and `side[name][p]`, calls
`combine`, and masks padding afterwards. See /work/coord/INTERFACES.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


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
