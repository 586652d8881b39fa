"""Deterministic token stream and batch assembly in the reference's exact order.

The reference trains on one shared stream: shards in sorted order, read
front to back, wrapping forever. Each micro-batch takes `ranks * (local + 1)`
contiguous tokens and gives rank r the r-th `local + 1` span (the extra token
makes the shifted targets). We assemble all ranks' spans of all micro-batches
of a step on the host, so that sharding axis 1 over R devices hands device r
exactly the span the reference's rank r would read. In a multi-process run
each process reads the same chunk and keeps only its own ranks' spans
(`local_ranks`). Host-side numpy only: device placement belongs to the
training code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from golfjax.data.shards import read_shard, validate_shard


class LoaderError(ValueError):
    """A batch geometry, stream position or validation split that cannot work."""


def default_grad_accum_steps(ranks: int) -> int:
    """The reference's rule: 8 micro-batches per step in total, split over the ranks."""
    if ranks <= 0 or 8 % ranks:
        raise LoaderError(
            f"{ranks} devices: the count must be positive and divide 8 for the reference rule grad_accum_steps = 8 // devices; "
            "otherwise set train.grad_accum_steps (GRAD_ACCUM_STEPS) explicitly"
        )
    return 8 // ranks


class TokenStream:
    """Shards read sequentially in sorted order, wrapping around forever."""

    def __init__(self, files: Sequence[str | Path]):
        self.files = sorted(Path(f) for f in files)
        if not self.files:
            raise LoaderError("TokenStream needs at least one shard file, got none")
        self.lengths = [validate_shard(f) for f in self.files]
        if not any(self.lengths):
            raise LoaderError(f"all {len(self.files)} shards are empty; the stream has no tokens")
        self._open(0, 0)

    def _open(self, shard: int, offset: int) -> None:
        self.shard = shard
        self.offset = offset
        self.tokens = read_shard(self.files[shard])

    def take(self, n: int) -> np.ndarray:
        """The next n tokens (uint16), crossing shard ends as the reference does."""
        if n < 0:
            raise LoaderError(f"cannot take a negative number of tokens ({n})")
        out = np.empty(n, dtype=np.uint16)
        filled = 0
        while filled < n:
            available = len(self.tokens) - self.offset
            if available <= 0:
                self._open((self.shard + 1) % len(self.files), 0)
                continue
            k = min(n - filled, available)
            out[filled : filled + k] = self.tokens[self.offset : self.offset + k]
            self.offset += k
            filled += k
        return out

    def state(self) -> dict[str, int]:
        """The position to checkpoint: shard index and token offset within it."""
        return {"shard": self.shard, "offset": self.offset}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continue from a saved position, refusing one that does not fit these shards."""
        try:
            shard, offset = int(state["shard"]), int(state["offset"])
        except (KeyError, TypeError, ValueError) as e:
            raise LoaderError(f"bad stream state {state!r}: need integer 'shard' and 'offset'") from e
        if not 0 <= shard < len(self.files):
            raise LoaderError(f"bad stream state {state!r}: shard must be in [0, {len(self.files)})")
        if not 0 <= offset <= self.lengths[shard]:
            raise LoaderError(
                f"bad stream state {state!r}: offset must be in [0, {self.lengths[shard]}] "
                f"for {self.files[shard]}"
            )
        self._open(shard, offset)


class TokenLoader:
    """Global training batches of shape (grad_accum_steps, ranks * seqs_per_rank, seq_len)."""

    def __init__(
        self,
        files: Sequence[str | Path],
        global_tokens: int,
        seq_len: int,
        ranks: int = 1,
        grad_accum_steps: int | None = None,
        local_ranks: Sequence[int] | None = None,
    ):
        """`local_ranks`: return only these ranks' rows (ascending rank order), as a process of a
        multi-process run needs (`golfjax.parallel.process_ranks`); default all ranks."""
        if grad_accum_steps is None:
            grad_accum_steps = default_grad_accum_steps(ranks)
        if ranks <= 0 or grad_accum_steps <= 0 or seq_len <= 0:
            raise LoaderError(
                f"ranks={ranks}, grad_accum_steps={grad_accum_steps} and seq_len={seq_len} must be positive"
            )
        local_tokens = global_tokens // (ranks * grad_accum_steps)
        if local_tokens <= 0 or local_tokens % seq_len:
            raise LoaderError(
                f"TRAIN_BATCH_TOKENS={global_tokens} // (ranks={ranks} * grad_accum_steps={grad_accum_steps}) "
                f"= {local_tokens} tokens per rank and micro-batch, which must be a positive multiple "
                f"of TRAIN_SEQ_LEN={seq_len}"
            )
        if local_ranks is None:
            local_ranks = range(ranks)
        chosen = sorted(int(r) for r in local_ranks)
        if not chosen or len(set(chosen)) != len(chosen) or not 0 <= chosen[0] <= chosen[-1] < ranks:
            raise LoaderError(
                f"local_ranks={list(local_ranks)} must be distinct ranks in [0, {ranks}), at least one"
            )
        self.local_ranks = tuple(chosen)
        self.seq_len = seq_len
        self.ranks = ranks
        self.grad_accum_steps = grad_accum_steps
        self.local_tokens = local_tokens
        self.stream = TokenStream(files)

    @property
    def batch_shape(self) -> tuple[int, int, int]:
        """(grad_accum_steps, sequences over all ranks, seq_len) of every batch."""
        return (self.grad_accum_steps, self.ranks * self.local_tokens // self.seq_len, self.seq_len)

    @property
    def local_batch_shape(self) -> tuple[int, int, int]:
        """(grad_accum_steps, sequences of `local_ranks`, seq_len): what `next_batch` returns."""
        return (self.grad_accum_steps, len(self.local_ranks) * self.local_tokens // self.seq_len, self.seq_len)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """One step's inputs and targets (int32), micro-batch by micro-batch in stream order.

        Rows are the spans of `local_ranks` in ascending rank order (all ranks by
        default). The stream always advances by the whole global chunk, so every
        process keeps the same position (`state()`)."""
        span = self.local_tokens + 1
        shape = self.local_batch_shape
        rows = shape[1]
        mine = None if len(self.local_ranks) == self.ranks else list(self.local_ranks)
        x = np.empty(shape, dtype=np.int32)
        y = np.empty(shape, dtype=np.int32)
        for micro in range(self.grad_accum_steps):
            spans = self.stream.take(self.ranks * span).reshape(self.ranks, span)
            if mine is not None:
                spans = spans[mine]
            x[micro] = spans[:, :-1].reshape(rows, self.seq_len)
            y[micro] = spans[:, 1:].reshape(rows, self.seq_len)
        return x, y

    def state(self) -> dict[str, int]:
        return self.stream.state()

    def restore(self, state: Mapping[str, int]) -> None:
        self.stream.restore(state)


def load_validation_tokens(files: Sequence[str | Path], seq_len: int) -> np.ndarray:
    """All validation tokens (uint16), cut to whole sequences plus the one extra target token."""
    if not files:
        raise LoaderError("no validation shards given")
    if seq_len <= 0:
        raise LoaderError(f"TRAIN_SEQ_LEN={seq_len} must be positive")
    paths = sorted(Path(f) for f in files)
    tokens = np.concatenate([np.asarray(read_shard(p)) for p in paths])
    usable = ((len(tokens) - 1) // seq_len) * seq_len
    if usable <= 0:
        raise LoaderError(
            f"validation split ({len(tokens)} tokens in {len(paths)} shard(s), first {paths[0]}) "
            f"is shorter than one sequence of TRAIN_SEQ_LEN={seq_len} plus one target token"
        )
    return tokens[: usable + 1]
