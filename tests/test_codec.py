"""Every payload codec round-trips; unknown codecs and bad bytes fail clearly."""

from __future__ import annotations

import numpy as np
import pytest

from golfjax.export.codec import CODECS, CodecError, compress, decompress

PAYLOADS = {
    "empty": b"",
    "repetitive": b"golfjax " * 4096,
    "random": np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes(),
    "int8_like": np.clip(np.random.default_rng(1).normal(0, 20, 100_000), -127, 127).astype(np.int8).tobytes(),
}


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("payload", PAYLOADS, ids=str)
def test_round_trip(codec: str, payload: str) -> None:
    data = PAYLOADS[payload]
    assert decompress(compress(data, codec), codec) == data


@pytest.mark.parametrize("codec", [c for c in CODECS if c != "none"])
def test_real_codecs_compress(codec: str) -> None:
    data = PAYLOADS["repetitive"]
    assert len(compress(data, codec)) < len(data) // 10


def test_level_override() -> None:
    data = PAYLOADS["int8_like"]
    assert decompress(compress(data, "zlib", level=1), "zlib") == data
    assert decompress(compress(data, "lzma", level=1), "lzma") == data
    assert len(compress(data, "lzma")) <= len(compress(data, "lzma", level=0))


def test_none_is_identity() -> None:
    assert compress(b"abc", "none") == b"abc" == decompress(b"abc", "none")


@pytest.mark.parametrize("fn", [lambda: compress(b"x", "gzip"), lambda: decompress(b"x", "gzip")])
def test_unknown_codec_names_the_known_ones(fn) -> None:
    with pytest.raises(CodecError, match=r"unknown codec 'gzip'.*zlib, zstd, brotli, lzma, none"):
        fn()
    assert issubclass(CodecError, ValueError)


@pytest.mark.parametrize("codec", [c for c in CODECS if c != "none"])
def test_garbage_raises_codec_error(codec: str) -> None:
    with pytest.raises(CodecError, match=codec):
        decompress(b"\x00definitely not compressed\xff" * 3, codec)
