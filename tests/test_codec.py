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


# ----------------------------------------------------------------------------
# codec specs: byte shuffle, smallest-of, measurement, row reordering

from golfjax.export.codec import (  # noqa: E402
    greedy_row_order,
    measure,
    parse_spec,
    shuffle_bytes,
    smallest,
    unshuffle_bytes,
)

SPECS = (*CODECS, "shuffle2+brotli", "shuffle2+zstd", "shuffle4+lzma", "shuffle3+zlib", "shuffle2+none")


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("length", [0, 1, 2, 7, 4097])
def test_every_spec_round_trips_any_length(spec: str, length: int) -> None:
    data = PAYLOADS["int8_like"][:length]
    assert decompress(compress(data, spec), spec) == data


def test_shuffle_layout() -> None:
    assert shuffle_bytes(b"abcdef", 2) == b"acebdf"
    assert shuffle_bytes(b"abcde", 2) == b"acbde"  # the odd tail byte stays last
    assert shuffle_bytes(b"abcdefg", 3) == b"adbecfg"
    for stride in (1, 2, 3, 8):
        data = PAYLOADS["random"][:1001]
        assert unshuffle_bytes(shuffle_bytes(data, stride), stride) == data
    assert compress(b"abcdef", "shuffle2+none") == b"acebdf"


def test_shuffle_helps_float16() -> None:
    fp16 = np.random.default_rng(3).normal(0, 0.01, 50_000).astype(np.float16).tobytes()
    assert len(compress(fp16, "shuffle2+brotli")) < len(compress(fp16, "brotli"))


@pytest.mark.parametrize("bad", ["shuffle1+zlib", "shuffle9+zlib", "shuffle2+gzip", "pergroup", "ZLIB", "", None])
def test_bad_specs_are_refused(bad) -> None:
    with pytest.raises(CodecError, match="codec"):
        parse_spec(bad)


def test_smallest_and_measure_agree() -> None:
    data = PAYLOADS["int8_like"]
    rows = measure(data, SPECS)
    assert [r["codec"] for r in rows] == list(SPECS)
    sizes = {r["codec"]: r["bytes"] for r in rows}
    assert sizes["none"] == len(data) and all(r["compress_s"] >= 0 for r in rows)
    spec, out = smallest(data, SPECS)
    assert len(out) == min(sizes.values()) == sizes[spec]
    assert decompress(out, spec) == data
    with pytest.raises(CodecError):
        smallest(data, ())


def test_greedy_row_order_chains_similar_rows() -> None:
    rng = np.random.default_rng(5)
    smooth = (np.arange(200)[:, None] + rng.integers(0, 2, (200, 64))).astype(np.int8)
    rows = smooth[rng.permutation(200)]
    order = greedy_row_order(rows)
    assert sorted(order.tolist()) == list(range(200)) and order[0] == 0

    def path_length(m: np.ndarray) -> int:
        return int(np.abs(np.diff(m.astype(np.int64), axis=0)).sum())

    assert path_length(rows[order]) < path_length(rows) / 5
    assert greedy_row_order(rows[:2]).tolist() == [0, 1]
