"""Byte codecs for the artifact payload, with the records' settings, and what a codec buys.

A codec *spec* is a base codec, optionally after a byte shuffle:
``"brotli"``, ``"shuffle2+brotli"`` (the records' BSHF stream: all bytes at
even offsets, then all at odd ones, then Brotli). Base codecs and defaults:
zlib level 9 (the reference), zstd level 22, brotli quality 11 with lgwin 24,
lzma preset 9 | PRESET_EXTREME, and "none" (identity, for tests and for
measuring what a codec buys). Shuffling puts the high and low bytes of 16-bit
values (fp16 scales) in separate runs, which a byte-level compressor models
better.

:func:`greedy_row_order` is the per-group mode's row reordering (a greedy L1
nearest-neighbour chain); the grouping itself lives in ``artifact``.
"""

from __future__ import annotations

import lzma
import re
import time
import zlib
from typing import Iterable, Sequence

import brotli
import numpy as np
import zstandard

CODECS: tuple[str, ...] = ("zlib", "zstd", "brotli", "lzma", "none")

DEFAULT_LEVELS: dict[str, int | None] = {
    "zlib": 9,
    "zstd": 22,
    "brotli": 11,  # quality
    "lzma": 9 | lzma.PRESET_EXTREME,  # preset, flags included
    "none": None,
}
BROTLI_LGWIN = 24
MAX_SHUFFLE_STRIDE = 8

# What the per-group mode tries on every stream unless told otherwise.
PERGROUP_CANDIDATES: tuple[str, ...] = ("zstd", "brotli", "lzma", "shuffle2+brotli")

_SPEC = re.compile(r"^(?:shuffle(\d+)\+)?([a-z]+)$")


class CodecError(ValueError):
    """Unknown codec name, or bytes the codec cannot decode."""


def parse_spec(spec: str) -> tuple[int, str]:
    """``"shuffle2+brotli"`` -> (2, "brotli"); ``"zlib"`` -> (1, "zlib")."""
    match = _SPEC.match(spec) if isinstance(spec, str) else None
    if match is None or match.group(2) not in CODECS:
        raise CodecError(
            f"unknown codec {spec!r}; known codecs: {', '.join(CODECS)}, optionally after a byte shuffle "
            f"as shuffleN+CODEC (N = 2..{MAX_SHUFFLE_STRIDE}, e.g. shuffle2+brotli)"
        )
    stride = int(match.group(1) or 1)
    if match.group(1) is not None and not 2 <= stride <= MAX_SHUFFLE_STRIDE:
        raise CodecError(f"codec {spec!r}: shuffle stride must be 2..{MAX_SHUFFLE_STRIDE}")
    return stride, match.group(2)


def shuffle_bytes(data: bytes, stride: int) -> bytes:
    """Byte ``i*stride + k`` goes to plane ``k``; a tail shorter than ``stride`` stays at the end."""
    if stride <= 1:
        return bytes(data)
    whole = len(data) - len(data) % stride
    planes = np.frombuffer(data, np.uint8, count=whole).reshape(-1, stride).T
    return planes.tobytes() + bytes(data[whole:])


def unshuffle_bytes(data: bytes, stride: int) -> bytes:
    """Inverse of :func:`shuffle_bytes`."""
    if stride <= 1:
        return bytes(data)
    whole = len(data) - len(data) % stride
    rows = np.frombuffer(data, np.uint8, count=whole).reshape(stride, -1).T
    return rows.tobytes() + bytes(data[whole:])


def _compress_base(data: bytes, codec: str, level: int | None) -> bytes:
    level = DEFAULT_LEVELS[codec] if level is None else level
    if codec == "zlib":
        return zlib.compress(data, level)
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=level).compress(data)
    if codec == "brotli":
        return brotli.compress(data, quality=level, lgwin=BROTLI_LGWIN)
    if codec == "lzma":
        return lzma.compress(data, preset=level)
    return bytes(data)


def compress(data: bytes, codec: str, level: int | None = None) -> bytes:
    """Compress ``data`` with a codec spec; ``level`` overrides the base codec's default (lzma: the preset)."""
    stride, base = parse_spec(codec)
    return _compress_base(shuffle_bytes(data, stride), base, level)


def decompress(data: bytes, codec: str) -> bytes:
    """Inverse of :func:`compress`; raises CodecError on undecodable bytes."""
    stride, base = parse_spec(codec)
    try:
        if base == "zlib":
            raw = zlib.decompress(data)
        elif base == "zstd":
            # Frames written by compress() carry their size; refuse to guess for others.
            raw = zstandard.ZstdDecompressor().decompress(data)
        elif base == "brotli":
            raw = brotli.decompress(data)
        elif base == "lzma":
            raw = lzma.decompress(data)
        else:
            raw = bytes(data)
    except (zlib.error, zstandard.ZstdError, brotli.error, lzma.LZMAError) as exc:
        raise CodecError(f"{codec} could not decode {len(data)} bytes: {exc}") from exc
    return unshuffle_bytes(raw, stride)


def smallest(data: bytes, candidates: Sequence[str]) -> tuple[str, bytes]:
    """The candidate codec giving the fewest bytes (first wins a tie), and its output."""
    if not candidates:
        raise CodecError("no candidate codecs given")
    best: tuple[str, bytes] | None = None
    for spec in candidates:
        out = compress(data, spec)
        if best is None or len(out) < len(best[1]):
            best = (spec, out)
    return best


def measure(data: bytes, specs: Iterable[str]) -> list[dict]:
    """Bytes, ratio and seconds to compress and decompress ``data`` with each codec (checked lossless)."""
    rows = []
    for spec in specs:
        t0 = time.perf_counter()
        out = compress(data, spec)
        t1 = time.perf_counter()
        back = decompress(out, spec)
        t2 = time.perf_counter()
        if back != data:
            raise CodecError(f"{spec} did not round-trip")
        rows.append({"codec": spec, "bytes": len(out), "ratio": len(data) / max(len(out), 1),
                     "compress_s": round(t1 - t0, 4), "decompress_s": round(t2 - t1, 4)})
    return rows


def greedy_row_order(rows: np.ndarray) -> np.ndarray:
    """A row order where each row follows its nearest unvisited row in L1 distance, from row 0.

    Neighbouring rows that look alike give the compressor repeats to find.
    O(rows^2 * cols) integer work, vectorised per step.
    """
    m = np.asarray(rows)
    n = m.shape[0]
    if n <= 2:
        return np.arange(n, dtype=np.int64)
    flat = m.reshape(n, -1).astype(np.int16)
    remaining = np.ones(n, dtype=bool)
    order = np.empty(n, dtype=np.int64)
    current = 0
    for i in range(n):
        order[i] = current
        remaining[current] = False
        if i == n - 1:
            break
        candidates = np.flatnonzero(remaining)
        dist = np.abs(flat[candidates] - flat[current]).sum(axis=1, dtype=np.int64)
        current = int(candidates[int(np.argmin(dist))])
    return order
