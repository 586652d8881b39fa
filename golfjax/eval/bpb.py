"""THE byte accounting and BPB formula: the one place golfjax counts bytes.

A scored target y with predecessor x stands for
    base_bytes[y] + (has_leading_space[y] and not is_boundary[x])
bytes: the "▁" of a piece is one space byte, except right after a boundary
token (BOS, ...), where the tokenizer (no dummy prefix) never wrote a space.
BPB = (mean NLL in nats / ln 2) * (tokens / bytes), as the reference's
`eval_val` computes it. `decoded_utf8_bytes` recounts the same bytes by
decoding text, independently of the tables, to catch a wrong table or rule.
"""

from __future__ import annotations

import math
import numpy as np
import sentencepiece as spm

from golfjax.data.tokenizer import ByteTables


def _ids(name: str, ids: np.ndarray, tables: ByteTables) -> np.ndarray:
    """Ids as a numpy integer array, checked to index the tables (negative ids would wrap)."""
    arr = np.asarray(ids)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {arr.dtype}")
    size = len(tables.base_bytes)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= size):
        raise ValueError(f"{name} has ids outside [0, {size}) of the byte tables: min {arr.min()}, max {arr.max()}")
    return arr


def target_bytes(prev_ids: np.ndarray, target_ids: np.ndarray, tables: ByteTables) -> np.ndarray:
    """Bytes each target token stands for, given its predecessor (int64, same shape)."""
    x = _ids("prev_ids", prev_ids, tables)
    y = _ids("target_ids", target_ids, tables)
    if x.shape != y.shape:
        raise ValueError(f"prev_ids shape {x.shape} differs from target_ids shape {y.shape}")
    space = tables.has_leading_space[y] & ~tables.is_boundary[x]
    return tables.base_bytes[y].astype(np.int64) + space.astype(np.int64)


def count_bytes(prev_ids: np.ndarray, target_ids: np.ndarray, tables: ByteTables) -> int:
    """Total bytes of a batch of scored targets."""
    return int(target_bytes(prev_ids, target_ids, tables).sum())


def stream_bytes(tokens: np.ndarray, tables: ByteTables) -> int:
    """Bytes of tokens[1:], each scored after its predecessor, as in a flat evaluation stream."""
    arr = np.asarray(tokens).reshape(-1)
    return count_bytes(arr[:-1], arr[1:], tables)


def loss_and_bpb(nll_sum_nats: float, n_tokens: int, n_bytes: int) -> tuple[float, float]:
    """(val_loss, val_bpb) from summed NLL, in float64 and in the reference's operation order."""
    if n_tokens <= 0:
        raise ValueError(f"cannot compute val_loss over {n_tokens} scored tokens")
    if n_bytes <= 0:
        raise ValueError(f"cannot compute val_bpb over {n_bytes} bytes ({n_tokens} tokens scored)")
    val_loss = float(nll_sum_nats) / float(n_tokens)
    bits_per_token = val_loss / math.log(2.0)
    tokens_per_byte = float(n_tokens) / float(n_bytes)
    return val_loss, bits_per_token * tokens_per_byte


def _boundary_mask(sp: spm.SentencePieceProcessor, ids: np.ndarray) -> np.ndarray:
    """Which ids are boundaries (control, unknown, unused, or past the vocab), asked of sp itself."""
    vocab = int(sp.vocab_size())
    per_id = np.array([sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) for i in range(vocab)])
    return (ids >= vocab) | per_id[np.minimum(ids, vocab - 1)]


def _runs(ids: np.ndarray, boundary: np.ndarray) -> list[np.ndarray]:
    """Maximal runs of non-boundary ids, each decodable on its own."""
    pieces = np.split(ids, np.flatnonzero(boundary))
    # Every piece after the first starts with the boundary id it was cut at.
    runs = [pieces[0]] + [p[1:] for p in pieces[1:]]
    return [r for r in runs if r.size]


def _decoded_len(sp: spm.SentencePieceProcessor, runs: list[np.ndarray], batch: int = 1024) -> int:
    """UTF-8 bytes of runs decoded separately, a batch at a time (a list of all ids would be GBs)."""
    total = 0
    for i in range(0, len(runs), batch):
        texts = sp.decode([r.tolist() for r in runs[i : i + batch]])
        total += sum(len(text.encode("utf-8")) for text in texts)
    return total


def decoded_utf8_bytes(sp: spm.SentencePieceProcessor, tokens: np.ndarray) -> int:
    """UTF-8 length of the text that the targets tokens[1:] decode to, found by decoding.

    Boundary tokens split the stream and decode to nothing. SentencePiece
    drops the "▁" at the start of a decoded run, which is right after a
    boundary; when tokens[0] is an ordinary piece, the first run is decoded
    behind it and its bytes are subtracted, so that the run's leading space
    counts. Exact for streams of whole characters (any exporter stream); a
    stream cut inside a byte-fallback character decodes the partial bytes as
    U+FFFD and cannot match.
    """
    ids = np.asarray(tokens).reshape(-1).astype(np.int64)
    if ids.size < 2:
        return 0
    if int(ids.min()) < 0:
        raise ValueError(f"token ids must be non-negative, got {int(ids.min())}")
    boundary = _boundary_mask(sp, ids)
    runs = _runs(ids[1:], boundary[1:])
    total = 0
    if runs and not boundary[0] and not boundary[1]:
        head = int(ids[0])
        first = runs.pop(0).tolist()
        total += len(sp.decode([head] + first).encode("utf-8")) - len(sp.decode([head]).encode("utf-8"))
    return total + _decoded_len(sp, runs)


# ---------------------------------------------------------------- CaseOps byte sidecar


def sidecar_target_bytes(sidecar: np.ndarray, target_positions: np.ndarray) -> np.ndarray:
    """Bytes of the targets at these stream positions, read from a CaseOps byte sidecar (int64).

    With CaseOps the tokens spell the transformed text, so the byte tables would
    count the wrong text: the sidecar (`golfjax.data.caseops`) holds, per token
    of the validation stream, the UTF-8 bytes of the *original* text it stands
    for. It replaces `target_bytes` (no predecessor rule: a token's leading
    space is inside its own count). `target_positions` index the same stream
    as the sidecar (the target of x[i] is at global position i + 1).
    """
    side = np.asarray(sidecar)
    pos = np.asarray(target_positions)
    if pos.size and not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"target_positions must be integers, got dtype {pos.dtype}")
    if pos.size and (int(pos.min()) < 0 or int(pos.max()) >= len(side)):
        raise ValueError(
            f"target positions [{int(pos.min())}, {int(pos.max())}] fall outside the sidecar's {len(side)} entries"
        )
    return side[pos].astype(np.int64)


def sidecar_count_bytes(sidecar: np.ndarray, target_positions: np.ndarray) -> int:
    """Total sidecar bytes of a batch of scored targets."""
    return int(sidecar_target_bytes(sidecar, target_positions).sum())


def sidecar_stream_bytes(sidecar: np.ndarray) -> int:
    """Bytes of tokens[1:] of a flat stream scored after its first token (the sidecar of tokens[0] is not a target)."""
    side = np.asarray(sidecar).reshape(-1)
    return int(side[1:].astype(np.int64).sum())
