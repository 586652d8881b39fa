"""SentencePiece loading with the checks a fair BPB needs, and the byte lookup tables.

The tables say how many UTF-8 bytes each target token stands for; they are
built exactly as the reference's `build_sentencepiece_luts`. The arithmetic
that uses them lives in `golfjax.eval.bpb` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import sentencepiece as spm

SPACE_PIECE = "\u2581"  # "▁", SentencePiece's visible space


class TokenizerError(ValueError):
    """A tokenizer file that is missing, unreadable or unfit for BPB scoring."""


class ByteTables(NamedTuple):
    """Per-token byte facts (a NamedTuple, so it is also a JAX pytree).

    base_bytes: UTF-8 length of the piece without its leading "▁" (int16).
    has_leading_space: the piece starts with "▁" (bool).
    is_boundary: control/unknown/unused ids and ids past the SentencePiece
        vocab; they count 0 bytes and suppress the next token's space (bool).
    """

    base_bytes: np.ndarray
    has_leading_space: np.ndarray
    is_boundary: np.ndarray


def load_tokenizer(path: str | Path, expected_vocab_size: int | None = None) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model, refusing ones that would make BPB wrong or not comparable."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file not found: {path}")
    if path.suffix != ".model":
        raise TokenizerError(f"tokenizer must be a SentencePiece .model file, got {path}")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"cannot load SentencePiece model {path}: {e}") from e
    vocab = int(sp.vocab_size())
    if expected_vocab_size is not None and vocab != expected_vocab_size:
        raise TokenizerError(
            f"VOCAB_SIZE={expected_vocab_size} does not match tokenizer vocab_size={vocab} ({path})"
        )
    if sp.piece_to_id(SPACE_PIECE) == sp.unk_id():
        raise TokenizerError(
            f"tokenizer {path} has no '{SPACE_PIECE}' (U+2581) piece: every space would be "
            "encoded as 3 byte-fallback tokens counted as 3 bytes instead of 1, inflating the "
            "byte count by about 20% and making val_bpb falsely low (parameter-golf issue #897)"
        )
    return sp


def build_byte_tables(sp: spm.SentencePieceProcessor, vocab_size: int) -> ByteTables:
    """Byte tables over max(sp vocab, vocab_size) ids, as the reference builds them."""
    sp_vocab = int(sp.vocab_size())
    size = max(sp_vocab, vocab_size)
    base_bytes = np.zeros(size, dtype=np.int16)
    has_leading_space = np.zeros(size, dtype=np.bool_)
    is_boundary = np.ones(size, dtype=np.bool_)
    for i in range(sp_vocab):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        is_boundary[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1  # one raw byte, whatever the piece's "<0xNN>" spelling
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE_PIECE):
            has_leading_space[i] = True
            piece = piece[1:]
        base_bytes[i] = len(piece.encode("utf-8"))
    return ByteTables(base_bytes, has_leading_space, is_boundary)
