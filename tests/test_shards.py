"""The reference shard format: exact bytes on disk, and a named ShardError for every defect."""

import re
from pathlib import Path

import numpy as np
import pytest

from golfjax.data.shards import (
    HEADER_BYTES,
    MAGIC,
    ShardError,
    list_shards,
    read_shard,
    validate_shard,
    write_shard,
)


def _shard(tmp_path: Path, tokens, name: str = "fineweb_train_000000.bin") -> Path:
    path = tmp_path / name
    write_shard(path, np.asarray(tokens))
    return path


def test_round_trip_and_exact_layout(tmp_path):
    tokens = np.array([0, 1, 2, 65535, 1024, 7], dtype=np.int64)
    path = _shard(tmp_path, tokens)
    raw = path.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * len(tokens)
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[:3].tolist() == [MAGIC, 1, len(tokens)] and not header[3:].any()
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").tolist() == tokens.tolist()
    back = read_shard(path)
    assert isinstance(back, np.memmap) and back.dtype == np.uint16
    assert back.tolist() == tokens.tolist()
    assert validate_shard(path) == len(tokens)


def test_empty_shard_round_trips(tmp_path):
    path = _shard(tmp_path, np.zeros(0, dtype=np.uint16))
    assert validate_shard(path) == 0
    assert read_shard(path).size == 0


@pytest.mark.parametrize("bad", [65536, -1])
def test_write_refuses_ids_outside_uint16(tmp_path, bad):
    path = tmp_path / "x.bin"
    with pytest.raises(ShardError, match=rf"{re.escape(str(path))}.*token id {bad}"):
        write_shard(path, np.array([5, bad, 6]))
    assert not path.exists()


def test_write_refuses_non_1d(tmp_path):
    with pytest.raises(ShardError, match="1-D"):
        write_shard(tmp_path / "x.bin", np.zeros((2, 3), dtype=np.int32))


def _patch(path: Path, offset: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 4] = np.array([value], dtype="<i4").tobytes()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: _patch(p, 0, 12345), r"magic 12345, expected 20240520"),
        (lambda p: _patch(p, 4, 2), r"version 2, expected 1"),
        (lambda p: _patch(p, 8, -4), r"negative token count"),
        (lambda p: p.write_bytes(p.read_bytes() + b"\0\0"), r"10 tokens.*1044 bytes expected.*1046 bytes"),
        (lambda p: p.write_bytes(p.read_bytes()[:-3]), r"truncated.*1044 bytes expected.*1041 bytes"),
        (lambda p: _patch(p, 8, 11), r"truncated.*11 tokens.*1046 bytes expected.*1044 bytes"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), r"truncated.*100 bytes, shorter than the 1024-byte header"),
        (lambda p: p.unlink(), r"not found"),
    ],
    ids=["magic", "version", "negative-count", "too-long", "truncated", "count-too-big", "short-header", "missing"],
)
def test_every_defect_is_a_shard_error_naming_the_file(tmp_path, corrupt, message):
    path = _shard(tmp_path, np.arange(10))
    corrupt(path)
    for check in (read_shard, validate_shard):
        with pytest.raises(ShardError, match=message) as info:
            check(path)
        assert str(path) in str(info.value)


def test_list_shards_sorted_and_filtered(tmp_path):
    for name in ["train_000002", "train_000000", "val_000000", "train_000001"]:
        _shard(tmp_path, [1, 2], f"fineweb_{name}.bin")
    found = list_shards(tmp_path, "fineweb_train_*.bin")
    assert [p.name for p in found] == [f"fineweb_train_{i:06d}.bin" for i in range(3)]


def test_list_shards_names_directory_and_pattern(tmp_path):
    with pytest.raises(ShardError, match=rf"{re.escape(str(tmp_path))}.*'fineweb_val_\*\.bin'.*no file matches"):
        list_shards(tmp_path, "fineweb_val_*.bin")
    with pytest.raises(ShardError, match="directory does not exist"):
        list_shards(tmp_path / "nope", "*.bin")
