"""Byte codecs for the artifact payload, with the records' default settings.

Defaults: zlib level 9 (the reference), zstd level 22, brotli quality 11 with
lgwin 24, lzma preset 9 | PRESET_EXTREME, and "none" (identity, for tests and
for measuring what a codec buys).
"""

from __future__ import annotations

import lzma
import zlib

import brotli
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


class CodecError(ValueError):
    """Unknown codec name, or bytes the codec cannot decode."""


def _check(codec: str) -> None:
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; known codecs: {', '.join(CODECS)}")


def compress(data: bytes, codec: str, level: int | None = None) -> bytes:
    """Compress ``data``; ``level`` overrides the codec's default (lzma: the preset)."""
    _check(codec)
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


def decompress(data: bytes, codec: str) -> bytes:
    """Inverse of :func:`compress`; raises CodecError on undecodable bytes."""
    _check(codec)
    try:
        if codec == "zlib":
            return zlib.decompress(data)
        if codec == "zstd":
            return zstandard.ZstdDecompressor().decompress(data)
        if codec == "brotli":
            return brotli.decompress(data)
        if codec == "lzma":
            return lzma.decompress(data)
    except (zlib.error, zstandard.ZstdError, brotli.error, lzma.LZMAError) as exc:
        raise CodecError(f"{codec} could not decode {len(data)} bytes: {exc}") from exc
    return bytes(data)
