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

Other token orders of the records (`data.data_order`), all deterministic from
the seed and resumable from `state()`:
- "shuffled": windows of seq_len + 1 tokens inside each shard (a random phase
  per shard and epoch), visited in a random permutation per epoch (the
  records' ShuffledSequenceLoader draws the same distribution of orders).
- "stride": the same windows at phase 0, visited as (a + k*s) mod N with s
  coprime to the number of windows N (a new a, s every epoch): every window
  once per epoch, neighbours far apart.
- "packed": the records' document packing: the stream read front to back from
  the first BOS of each shard; a micro-batch's chunk never crosses a shard end
  (the rest of the shard is skipped). Documents stay whole and contiguous; their
  boundaries are the BOS tokens, which the model's document masking reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import math

import numpy as np

from golfjax.data.shards import read_shard, validate_shard

ORDERS: tuple[str, ...] = ("sequential", "shuffled", "stride", "packed")
BOS_ID = 1  # every challenge tokenizer: pad 0, bos 1, eos 2, unk 3


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


class WindowOrder:
    """Windows of `window` tokens inside shards, visited in a per-epoch order ("shuffled" or "stride").

    Window j of an epoch lies in shard i at offset phase_i + (j - first_i) * step,
    where step = window - 1 (consecutive windows share their boundary token, as
    consecutive sequences of the reference stream do).
    """

    def __init__(self, stream: TokenStream, window: int, kind: str, seed: int):
        if kind not in ("shuffled", "stride"):
            raise LoaderError(f"unknown window order {kind!r}")
        self.stream, self.window, self.kind, self.seed = stream, window, kind, int(seed)
        self.maps = [read_shard(f) if n else None for f, n in zip(stream.files, stream.lengths)]
        self._set_epoch(0)
        if self.count == 0:
            raise LoaderError(f"no shard holds a whole window of {window} tokens (seq_len + 1)")
        self.pos = 0

    def _set_epoch(self, epoch: int) -> None:
        step = self.window - 1
        rng = np.random.default_rng([self.seed, epoch, 0 if self.kind == "shuffled" else 1])
        phases, counts = [], []
        for n in self.stream.lengths:
            max_phase = min(step - 1, max(0, n - self.window))
            phase = int(rng.integers(max_phase + 1)) if self.kind == "shuffled" and max_phase > 0 else 0
            phases.append(phase)
            counts.append(max(0, (n - 1 - phase) // step))
        self.epoch = epoch
        self.phases = np.asarray(phases, np.int64)
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.count = int(self.first[-1])
        if self.count == 0:
            return
        if self.kind == "shuffled":
            self.perm = rng.permutation(self.count)
        else:
            self.offset0 = int(rng.integers(self.count))
            self.stride = coprime_stride(self.count, rng)

    def indices(self, start: int, n: int) -> np.ndarray:
        """Window indices at positions start..start+n-1 of the current epoch's order."""
        k = np.arange(start, start + n, dtype=np.int64)
        if self.kind == "shuffled":
            return self.perm[k]
        return (self.offset0 + k * self.stride) % self.count

    def locate(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, token offset) of window indices."""
        shard = np.searchsorted(self.first, idx, side="right") - 1
        return shard, self.phases[shard] + (idx - self.first[shard]) * (self.window - 1)

    def take(self, n: int) -> np.ndarray:
        """The next n windows, (n, window) uint16, crossing into the next epoch when one ends."""
        out = np.empty((n, self.window), np.uint16)
        filled = 0
        while filled < n:
            if self.pos >= self.count:
                self._set_epoch(self.epoch + 1)
                self.pos = 0
            k = min(n - filled, self.count - self.pos)
            shards, offsets = self.locate(self.indices(self.pos, k))
            for i, (s, o) in enumerate(zip(shards, offsets)):
                out[filled + i] = self.maps[s][o : o + self.window]
            self.pos += k
            filled += k
        return out

    def state(self) -> dict:
        return {"order": self.kind, "epoch": self.epoch, "pos": self.pos}

    def restore(self, state: Mapping) -> None:
        try:
            kind, epoch, pos = state["order"], int(state["epoch"]), int(state["pos"])
        except (KeyError, TypeError, ValueError) as e:
            raise LoaderError(f"bad {self.kind} loader state {state!r}: need order, epoch and pos") from e
        if kind != self.kind:
            raise LoaderError(f"loader state {state!r} is of data order {kind!r}, not {self.kind!r}")
        if epoch < 0:
            raise LoaderError(f"bad loader state {state!r}: negative epoch")
        self._set_epoch(epoch)
        if not 0 <= pos <= self.count:
            raise LoaderError(f"bad loader state {state!r}: pos must be in [0, {self.count}]")
        self.pos = pos


def coprime_stride(n: int, rng: np.random.Generator) -> int:
    """A stride in [n/4, 3n/4] (1 for n < 4) with gcd(stride, n) = 1: k -> (a + k*stride) mod n is a permutation."""
    if n < 4:
        return 1
    s = int(rng.integers(n // 4, 3 * n // 4 + 1))
    while math.gcd(s, n) != 1:
        s += 1
    return s


class PackedStream:
    """The stream of document packing: front to back from each shard's first BOS; a chunk never
    crosses a shard end (the shard's rest is skipped, the next shard starts at its first BOS)."""

    def __init__(self, stream: TokenStream, chunk: int, bos_id: int = BOS_ID):
        self.stream, self.chunk, self.bos_id = stream, chunk, bos_id
        self.starts = [self._first_bos(i) for i in range(len(stream.files))]
        if not any(n - s >= chunk for n, s in zip(stream.lengths, self.starts)):
            raise LoaderError(f"data_order=packed: no shard holds {chunk} tokens from its first BOS "
                              f"(ranks * (tokens per rank + 1)); use smaller batches or bigger shards")
        self.shard, self.offset = 0, self.starts[0]

    def _first_bos(self, i: int, block: int = 1 << 16) -> int:
        """Offset of shard i's first BOS (0 if none), reading only as far as needed."""
        tokens = read_shard(self.stream.files[i]) if self.stream.lengths[i] else np.zeros(0, np.uint16)
        for start in range(0, len(tokens), block):
            hits = np.flatnonzero(np.asarray(tokens[start : start + block]) == self.bos_id)
            if hits.size:
                return start + int(hits[0])
        return 0

    def take(self) -> np.ndarray:
        while self.offset + self.chunk > self.stream.lengths[self.shard]:
            self.shard = (self.shard + 1) % len(self.stream.files)
            self.offset = self.starts[self.shard]
        tokens = read_shard(self.stream.files[self.shard])
        out = np.array(tokens[self.offset : self.offset + self.chunk], dtype=np.uint16)
        self.offset += self.chunk
        return out

    def state(self) -> dict:
        return {"order": "packed", "shard": self.shard, "offset": self.offset}

    def restore(self, state: Mapping) -> None:
        try:
            kind, shard, offset = state["order"], int(state["shard"]), int(state["offset"])
        except (KeyError, TypeError, ValueError) as e:
            raise LoaderError(f"bad packed loader state {state!r}: need order, shard and offset") from e
        if kind != "packed":
            raise LoaderError(f"loader state {state!r} is of data order {kind!r}, not 'packed'")
        if not 0 <= shard < len(self.stream.files) or not 0 <= offset <= self.stream.lengths[shard]:
            raise LoaderError(f"bad packed loader state {state!r} for these shards")
        self.shard, self.offset = shard, offset


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
        order: str = "sequential",
        seed: int = 0,
    ):
        """`local_ranks`: return only these ranks' rows (ascending rank order), as a process of a
        multi-process run needs (`golfjax.parallel.process_ranks`); default all ranks.
        `order`: the token order (module docstring); `seed` drives shuffled and stride."""
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
        if order not in ORDERS:
            raise LoaderError(f"unknown data order {order!r}; one of {', '.join(ORDERS)}")
        self.order = order
        self.windows = WindowOrder(self.stream, seq_len + 1, order, seed) if order in ("shuffled", "stride") else None
        self.packed = PackedStream(self.stream, ranks * (local_tokens + 1)) if order == "packed" else None

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
        if self.windows is not None:  # one window per sequence; rank r's rows are the r-th block
            per_rank = self.local_tokens // self.seq_len
            for micro in range(self.grad_accum_steps):
                w = self.windows.take(self.ranks * per_rank).reshape(self.ranks, per_rank, self.seq_len + 1)
                if mine is not None:
                    w = w[mine]
                x[micro] = w[..., :-1].reshape(rows, self.seq_len)
                y[micro] = w[..., 1:].reshape(rows, self.seq_len)
            return x, y
        for micro in range(self.grad_accum_steps):
            chunk = self.packed.take() if self.packed is not None else self.stream.take(self.ranks * span)
            spans = chunk.reshape(self.ranks, span)
            if mine is not None:
                spans = spans[mine]
            x[micro] = spans[:, :-1].reshape(rows, self.seq_len)
            y[micro] = spans[:, 1:].reshape(rows, self.seq_len)
        return x, y

    def state(self) -> dict:
        """The position to checkpoint (the reference stream's {shard, offset} for "sequential")."""
        source = self.windows or self.packed
        return source.state() if source is not None else self.stream.state()

    def restore(self, state: Mapping) -> None:
        source = self.windows or self.packed
        if source is None and "order" in state and state["order"] != "sequential":
            raise LoaderError(f"loader state {dict(state)!r} is of data order {state['order']!r}, not 'sequential'")
        (source or self.stream).restore(state)


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
