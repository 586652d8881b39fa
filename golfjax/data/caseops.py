"""CaseOps: the lossless case transform, its tokenizer, and the original-byte sidecar.

The transform (the records' `lossless_caps_caseops_v1`) rewrites every maximal
run of ASCII letters in lower case, with operator characters saying how to
restore it:

* a lowercase word is unchanged;
* a TitleCase word becomes TITLE + word.lower();
* an ALL-CAPS word of two or more letters becomes ALLCAPS + word.lower();
* any other word: TITLE first if its first letter is upper case, then
  CAPNEXT before every later upper-case letter;
* a literal operator character in the text is written ESC + itself.

The operators are the private-use characters U+E001..U+E004, reserved as
SentencePiece user-defined symbols so each is one token. `decode(encode(s))
== s` for every string, and `decode` rejects strings `encode` cannot produce.

Because the tokens now spell a different text, BPB must count the bytes of
the *original* text: the validation byte sidecar holds, per token, the UTF-8
bytes of the original text it stands for (operators 0, BOS 0), found from
SentencePiece's byte offsets into the transformed text, so the per-document
total is exactly the original document's UTF-8 length. The arithmetic that
turns the sidecar into BPB lives in `golfjax.eval.bpb` only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from golfjax.data.shards import list_shards, read_shard

TITLE = "\ue001"
ALLCAPS = "\ue002"
CAPNEXT = "\ue003"
ESC = "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
_OPS = frozenset(OPERATORS)
TRANSFORM_NAME = "lossless_caps_caseops_v1"
VAL_TOKEN_PATTERN = "fineweb_val_[0-9]*.bin"  # token shards only; "fineweb_val_*.bin" also matches the sidecars
VAL_BYTES_PATTERN = "fineweb_val_bytes_*.bin"
MAX_SIDECAR_BYTES = 2**16 - 1


class CaseOpsError(ValueError):
    """A string that is not a valid CaseOps encoding, or a sidecar that does not fit its tokens."""


def _upper(ch: str) -> bool:
    return "A" <= ch <= "Z"


def _lower(ch: str) -> bool:
    return "a" <= ch <= "z"


def _letter(ch: str) -> bool:
    return _upper(ch) or _lower(ch)


def _encode_word(word: str) -> str:
    low = word.lower()
    if word == low:
        return word
    if len(word) >= 2 and word == word.upper():
        return ALLCAPS + low
    if len(word) >= 2 and _upper(word[0]) and word[1:] == low[1:]:
        return TITLE + low
    # mixed case (or a single capital letter): TITLE for the first, CAPNEXT for later capitals
    head = TITLE + low[0] if _upper(word[0]) else low[0]
    return head + "".join(CAPNEXT + c.lower() if _upper(c) else c for c in word[1:])


def _encode_match(m: re.Match) -> str:
    s = m.group()
    return ESC + s if s in _OPS else _encode_word(s)


_WORD_OR_OPERATOR = re.compile("[A-Za-z]+|[" + "".join(OPERATORS) + "]")


def encode(text: str) -> str:
    """The CaseOps form of `text` (see the module docstring)."""
    return _WORD_OR_OPERATOR.sub(_encode_match, text)


def decode(text: str) -> str:
    """Invert `encode`; raises CaseOpsError on a string that no text encodes to."""
    out: list[str] = []
    mode = None  # TITLE or ALLCAPS waiting for the first letter of a word
    capnext = False
    in_word = False  # the previous output character was an ASCII letter
    allcaps_word = False
    escaped = False
    for ch in text:
        if escaped:
            if ch not in _OPS:
                raise CaseOpsError(f"ESC must be followed by an operator character, got {ch!r}")
            out.append(ch)
            escaped = False
            in_word = allcaps_word = False
            continue
        if mode is not None or capnext:
            if not _lower(ch):
                raise CaseOpsError(f"a case operator must be followed by a lowercase ASCII letter, got {ch!r}")
        if ch == ESC:
            escaped = True
        elif ch in (TITLE, ALLCAPS):
            if in_word:
                raise CaseOpsError("TITLE/ALLCAPS inside a word")
            mode = ch
        elif ch == CAPNEXT:
            if not in_word:  # a word's first capital is spelled TITLE, never CAPNEXT
                raise CaseOpsError("CAPNEXT at the start of a word")
            capnext = True
        elif _letter(ch):
            if _upper(ch):
                raise CaseOpsError(f"upper-case letter {ch!r} in a CaseOps string")
            if not in_word:
                allcaps_word = mode == ALLCAPS
                out.append(ch.upper() if mode is not None else ch)
                mode = None
            else:
                out.append(ch.upper() if (allcaps_word or capnext) else ch)
                capnext = False
            in_word = True
        else:
            out.append(ch)
            in_word = allcaps_word = False
    if escaped or mode is not None or capnext:
        raise CaseOpsError("CaseOps string ends with a dangling operator")
    result = "".join(out)
    if encode(result) != text:  # e.g. "NASA" spelled with CAPNEXTs instead of ALLCAPS
        raise CaseOpsError("not the canonical CaseOps encoding of any text")
    return result


def original_char_bytes(transformed: str) -> list[int]:
    """Per character of a CaseOps string, the UTF-8 bytes it stands for in the original text.

    Operators stand for nothing (0); an operator escaped by ESC is a literal
    character of the original (its 3 bytes); everything else is itself.
    """
    weights: list[int] = []
    escaped = False
    for ch in transformed:
        if ch in _OPS and not escaped:
            weights.append(0)
            escaped = ch == ESC
            continue
        escaped = False
        weights.append(len(ch.encode("utf-8")))
    return weights


def _byte_prefix(transformed: str) -> np.ndarray:
    """C[b] = original bytes of the transformed text's first b UTF-8 bytes (b on character starts)."""
    per_byte = np.zeros(len(transformed.encode("utf-8")) + 1, dtype=np.int64)
    pos = 0
    for ch, w in zip(transformed, original_char_bytes(transformed)):
        per_byte[pos + 1] = w  # a character's bytes are credited at its first byte
        pos += len(ch.encode("utf-8"))
    return np.cumsum(per_byte)


def token_original_bytes(transformed: str, proto) -> np.ndarray:
    """Original UTF-8 bytes of each token of `proto` (SentencePiece's encoding of `transformed`).

    Token i covers the input from the end of token i-1 to its own end (byte
    offsets given by SentencePiece), the last token also the rest of the
    input: text the normaliser drops (extra whitespace) is charged to the
    token after it, so the counts add up to the whole original document.
    """
    prefix = _byte_prefix(transformed)
    ends = np.array([p.end for p in proto.pieces], dtype=np.int64)
    if ends.size == 0:
        return np.zeros(0, dtype=np.int64)
    ends[-1] = len(prefix) - 1
    cum = prefix[ends]
    return np.diff(np.concatenate([[0], cum]))


def encode_document(sp: spm.SentencePieceProcessor, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, original bytes per token) of one document, without the BOS."""
    transformed = encode(text)
    proto = sp.encode(transformed, out_type="proto")
    ids = np.array([p.id for p in proto.pieces], dtype=np.int64)
    return ids, token_original_bytes(transformed, proto)


def check_tokenizer(sp: spm.SentencePieceProcessor) -> None:
    """Refuse a tokenizer that does not keep each CaseOps operator as a single token."""
    for op in OPERATORS:
        pid = sp.piece_to_id(op)
        if pid == sp.unk_id() or sp.encode(op, out_type=int) != [pid]:
            raise CaseOpsError(
                f"tokenizer has no single piece for CaseOps operator U+{ord(op):04X}; train it with "
                "`prepare_data.py caseops-tokenizer` (operators reserved as user_defined_symbols)"
            )


def transformed_documents(docs: Iterable[str]) -> Iterable[str]:
    """CaseOps forms of documents, lazily (for tokenizer training)."""
    return (encode(doc) for doc in docs)


# ---------------------------------------------------------------- the sidecar on disk


def sidecar_path_for(token_shard: Path) -> Path:
    """fineweb_val_000003.bin -> fineweb_val_bytes_000003.bin beside it."""
    name = token_shard.name
    if not name.startswith("fineweb_val_") or name.startswith("fineweb_val_bytes_"):
        raise CaseOpsError(f"{token_shard} is not a validation token shard")
    return token_shard.with_name("fineweb_val_bytes_" + name[len("fineweb_val_") :])


def load_val_byte_sidecar(data_dir: str | Path, n_tokens: int | None = None,
                          token_pattern: str = VAL_TOKEN_PATTERN) -> np.ndarray:
    """The validation byte sidecar (int64), one entry per validation token, in shard order.

    Each token shard must have a sidecar shard of the same length; `n_tokens`
    truncates the result the way the validation tokens were truncated.
    """
    pieces = []
    for shard in list_shards(data_dir, token_pattern):
        side = sidecar_path_for(shard)
        if not side.is_file():
            raise CaseOpsError(f"missing CaseOps byte sidecar {side} for {shard.name}")
        tokens, counts = read_shard(shard), read_shard(side)
        if len(tokens) != len(counts):
            raise CaseOpsError(f"{side.name} has {len(counts)} entries but {shard.name} has {len(tokens)} tokens")
        pieces.append(np.asarray(counts, dtype=np.int64))
    sidecar = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    if n_tokens is not None:
        if n_tokens > len(sidecar):
            hint = ""
            if n_tokens == 2 * len(sidecar) or n_tokens > len(sidecar) + 1:
                hint = (f"; if data.val_pattern also matches the sidecar shards {VAL_BYTES_PATTERN} (the default "
                        f"'fineweb_val_*.bin' does), set data.val_pattern={VAL_TOKEN_PATTERN!r}")
            raise CaseOpsError(
                f"the sidecar has {len(sidecar)} entries, fewer than the {n_tokens} tokens to score{hint}")
        sidecar = sidecar[:n_tokens]
    return sidecar


def sidecar_doc_totals(tokens: np.ndarray, sidecar: np.ndarray, bos_id: int) -> list[int]:
    """Sum of the sidecar per document (documents start at BOS), to compare with the source texts."""
    starts = list(np.flatnonzero(np.asarray(tokens) == bos_id)) + [len(tokens)]
    return [int(np.asarray(sidecar[a:b]).sum()) for a, b in zip(starts[:-1], starts[1:])]


def _utf8_length_from_lead(b: int) -> int:
    return 1 if b < 0xC0 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4


def piece_surface_bytes(sp: spm.SentencePieceProcessor, ids: Sequence[int]) -> list[int]:
    """Original bytes per token from the piece strings alone (the records' `piece.surface` rule).

    An independent restatement used to cross-check the offset-based sidecar on
    text the normaliser leaves unchanged: "▁" is one space, operators 0 unless
    escaped, and a character spelled by byte-fallback pieces counts its bytes
    on its last piece (where SentencePiece puts the character's surface).
    """
    out: list[int] = []
    escaped = False
    need = seen = 0
    for i in ids:
        i = int(i)
        if sp.is_byte(i):
            b = int(sp.id_to_piece(i)[3:-1], 16)
            if seen == 0:
                need = _utf8_length_from_lead(b)
            seen += 1
            out.append(need if seen == need else 0)
            if seen == need:
                seen = 0
            continue
        total = 0
        for ch in sp.id_to_piece(i).replace("\u2581", " "):
            if ch in _OPS and not escaped:
                escaped = ch == ESC
                continue
            escaped = False
            total += len(ch.encode("utf-8"))
        out.append(total)
    return out


def evaluation_bytes(cfg, tokens: np.ndarray) -> np.ndarray | None:
    """The per-position byte vector for `Evaluator(position_bytes_override=...)`, or None.

    None unless `cfg.caseops.caseops_enabled`; then the validation byte sidecar
    aligned with `tokens` (the untruncated validation stream loaded with
    `cfg.data.val_pattern`), after checking that the pattern does not also
    pick up the sidecar shards and that the sidecar covers the stream.
    """
    c = cfg.caseops
    if not c.caseops_enabled:
        return None
    data_dir = Path(cfg.data.data_path)
    pattern = cfg.data.val_pattern
    side = sorted(p.name for p in data_dir.glob(c.val_bytes_pattern))
    clash = [name for name in side if Path(name).match(pattern)]
    if clash:
        raise CaseOpsError(
            f"data.val_pattern {pattern!r} also matches the CaseOps byte sidecar ({clash[0]}): "
            f"set data.val_pattern={VAL_TOKEN_PATTERN!r} (VAL_PATTERN) for CaseOps data"
        )
    sidecar = load_val_byte_sidecar(data_dir, None, pattern)
    if len(sidecar) != len(tokens):
        raise CaseOpsError(f"the byte sidecar has {len(sidecar)} entries, the validation stream {len(tokens)} tokens")
    return sidecar
