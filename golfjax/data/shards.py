"""The reference token shard format, read and written byte for byte.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1,
token count, then zeros) followed by the tokens as little-endian uint16.
Every problem with a shard is a `ShardError` naming the file, because a bad
shard found deep inside a training run is otherwise hard to trace.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_BYTES = 2
MAX_TOKEN_ID = 2**16 - 1

_HEADER_DTYPE = np.dtype("<i4")
_TOKEN_DTYPE = np.dtype("<u2")


class ShardError(ValueError):
    """A shard file is missing, malformed or cannot hold the given tokens."""


def _read_header(path: Path) -> int:
    """Check the header and the file size; return the token count."""
    if not path.is_file():
        raise ShardError(f"shard file not found: {path}")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(
            f"truncated shard {path}: {size} bytes, shorter than the "
            f"{HEADER_BYTES}-byte header"
        )
    header = np.fromfile(path, dtype=_HEADER_DTYPE, count=HEADER_INTS)
    magic, version, n_tokens = (int(v) for v in header[:3])
    if magic != MAGIC:
        raise ShardError(f"bad shard header in {path}: magic {magic}, expected {MAGIC}")
    if version != VERSION:
        raise ShardError(f"bad shard header in {path}: version {version}, expected {VERSION}")
    if n_tokens < 0:
        raise ShardError(f"bad shard header in {path}: negative token count {n_tokens}")
    expected = HEADER_BYTES + n_tokens * TOKEN_BYTES
    if size != expected:
        kind = "truncated shard" if size < expected else "shard size mismatch for"
        raise ShardError(
            f"{kind} {path}: header says {n_tokens} tokens, so {expected} bytes "
            f"expected, but the file has {size} bytes"
        )
    return n_tokens


def validate_shard(path: str | Path) -> int:
    """Check a shard's header and size without reading its tokens; return the token count."""
    return _read_header(Path(path))


def read_shard(path: str | Path) -> np.ndarray:
    """Map a shard's tokens read-only (uint16), so large shards cost no RAM until touched."""
    path = Path(path)
    n_tokens = _read_header(path)
    if n_tokens == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=_TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write tokens as a shard; ids must fit uint16, or the data would be silently corrupted."""
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ShardError(f"cannot write {path}: tokens must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ShardError(f"cannot write {path}: tokens must be integers, got {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > MAX_TOKEN_ID:
            bad = lo if lo < 0 else hi
            raise ShardError(
                f"cannot write {path}: token id {bad} does not fit the uint16 shard "
                f"format (ids must be in [0, {MAX_TOKEN_ID}])"
            )
    if arr.size >= 2**31:
        raise ShardError(f"cannot write {path}: {arr.size} tokens exceed the int32 header count")
    header = np.zeros(HEADER_INTS, dtype=_HEADER_DTYPE)
    header[:3] = (MAGIC, VERSION, arr.size)
    with path.open("wb") as f:
        f.write(header.tobytes())
        f.write(arr.astype(_TOKEN_DTYPE, copy=False).tobytes())


def list_shards(directory: str | Path, pattern: str) -> list[Path]:
    """Shards matching a glob pattern in a directory, in the sorted order the reference reads them."""
    directory = Path(directory)
    files = sorted(p for p in directory.glob(pattern) if p.is_file())
    if not files:
        where = "directory does not exist" if not directory.is_dir() else "no file matches"
        raise ShardError(f"no shards found in {directory} matching {pattern!r} ({where})")
    return files
