"""The container's per-group layout round-trips exactly; pickle is never called and pickle payloads are refused."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from golfjax.export import artifact
from golfjax.export.artifact import GROUPS, ArtifactError, read_artifact, write_artifact
from golfjax.export.quant import (
    QuantizedState,
    QuantizedTensor,
    dequantize_state,
    quantize_int8_per_row,
    quantize_state_int8,
)

PREFIX = struct.Struct("<8sIQQ32s")
CONFIG = {"model": {"num_layers": 1}}


SHAPES = {
    "tok_emb.weight": (96, 32),
    "blocks.0.attn.c_q.weight": (32, 32),
    "blocks.0.attn.c_k.weight": (16, 32),
    "blocks.0.attn.c_v.weight": (16, 32),
    "blocks.0.attn.proj.weight": (32, 32),
    "blocks.0.mlp.fc.weight": (64, 32),
    "blocks.0.mlp.proj.weight": (32, 64),
    "blocks.1.mlp.fc.weight": (64, 32),
}


@pytest.fixture(scope="module")
def state_q() -> QuantizedState:
    """Reference names, every group present; small matrices quantized per row (the routing is not under test)."""
    rng = np.random.default_rng(11)
    tensors = {}
    for name, shape in SHAPES.items():
        q, scale = quantize_int8_per_row(rng.standard_normal(shape).astype(np.float32))
        tensors[name] = QuantizedTensor("int8_per_row", "float32", shape, {"q": q, "scale": scale})
    small = quantize_state_int8({"blocks.0.attn_scale": rng.standard_normal(32).astype(np.float32),
                                 "blocks.0.resid_mix": rng.standard_normal((2, 32)).astype(np.float32)})[0]
    return QuantizedState({**tensors, **small.tensors})


def assert_same_state(a, b) -> None:
    assert list(a.tensors) == list(b.tensors)
    for name, qt in a.tensors.items():
        got = b.tensors[name]
        assert (got.scheme, got.dtype, got.shape) == (qt.scheme, qt.dtype, qt.shape)
        for role, array in qt.arrays.items():
            assert got.arrays[role].dtype == array.dtype and np.array_equal(got.arrays[role], array), (name, role)


@pytest.mark.parametrize("reorder", [False, True])
def test_pergroup_round_trip_is_exact(tmp_path: Path, state_q, reorder: bool) -> None:
    path = tmp_path / "pg.golf"
    info = write_artifact(path, state_q, CONFIG, codec="pergroup", scheme="x", reorder=reorder,
                          candidates=("zlib", "brotli", "shuffle2+brotli"))
    _, loaded, header = read_artifact(path)
    assert_same_state(state_q, loaded)
    names = [s["name"] for s in header["streams"]]
    assert names == [*GROUPS, *(["perm"] if reorder else []), "other"]
    assert all(s["codec"] in ("zlib", "brotli", "shuffle2+brotli") for s in header["streams"])
    assert [s["name"] for s in info.streams] == names and info.payload_bytes == sum(
        s["compressed_bytes"] for s in info.streams)
    fc = next(t for t in header["tensors"] if t["name"] == "blocks.0.mlp.fc.weight")["arrays"]
    assert fc["q"]["stream"] == "mlp.fc" and fc["q"]["transposed"] and fc["scale"]["stream"] == "other"
    assert ("row_perm" in fc["q"]) == reorder
    proj = next(t for t in header["tensors"] if t["name"] == "blocks.0.mlp.proj.weight")["arrays"]
    assert "row_perm" not in proj["q"]  # mlp.proj is not a hot group


def test_pergroup_picks_the_smallest_candidate(tmp_path: Path, state_q) -> None:
    single = {c: write_artifact(tmp_path / f"{c}.golf", state_q, CONFIG, codec=c).payload_bytes
              for c in ("zlib", "none")}
    info = write_artifact(tmp_path / "pg.golf", state_q, CONFIG, codec="pergroup", candidates=("zlib", "none"))
    assert info.payload_bytes < single["none"]
    for stream in info.streams:  # incompressible stream -> "none"; otherwise zlib
        assert stream["compressed_bytes"] <= stream["raw_bytes"]


def reseal(path: Path, mutate_header=None, payload: bytes | None = None) -> None:
    """Rewrite the header and/or payload with every length and checksum valid again."""
    blob = path.read_bytes()
    magic, version, header_len, payload_len, _ = PREFIX.unpack_from(blob)
    header = json.loads(blob[PREFIX.size : PREFIX.size + header_len])
    payload = blob[PREFIX.size + header_len :] if payload is None else payload
    header["payload"]["sha256"] = hashlib.sha256(payload).hexdigest()
    if mutate_header:
        mutate_header(header)
    header_bytes = json.dumps(header).encode()
    prefix = PREFIX.pack(magic, version, len(header_bytes), len(payload), hashlib.sha256(header_bytes).digest())
    path.write_bytes(prefix + header_bytes + payload)


def test_row_perm_that_is_not_a_permutation_is_refused(tmp_path: Path, state_q) -> None:
    path = tmp_path / "pg.golf"
    write_artifact(path, state_q, CONFIG, codec="pergroup", reorder=True, candidates=("none",))
    header = read_artifact(path)[2]
    perm = next(s for s in header["streams"] if s["name"] == "perm")
    blob = bytearray(path.read_bytes())
    payload = bytearray(blob[-header["payload"]["compressed_bytes"]:])
    payload[perm["offset"] : perm["offset"] + 4] = b"\x00\x00\x00\x00"  # two rows -> row 0
    reseal(path, payload=bytes(payload))
    with pytest.raises(ArtifactError, match="row_perm is not a permutation"):
        read_artifact(path)


@pytest.mark.parametrize("codec", ["none", "zlib"])
def test_pickle_opcode_payload_is_refused(tmp_path: Path, state_q, codec: str) -> None:
    path = tmp_path / "evil.golf"
    write_artifact(path, state_q, CONFIG, codec=codec)
    evil = pickle.dumps({"w": np.zeros(4, np.float32), "exec": "print"}, protocol=4)
    packed = evil if codec == "none" else zlib.compress(evil, 9)

    def point_at_pickle(h: dict) -> None:
        h["streams"] = [{"name": "all", "codec": codec, "offset": 0, "compressed_bytes": len(packed),
                         "raw_bytes": len(evil)}]
        h["payload"].update(compressed_bytes=len(packed), raw_bytes=len(evil))

    reseal(path, point_at_pickle, payload=packed)
    with pytest.raises(ArtifactError, match="pickle opcode stream.*never unpickle"):
        read_artifact(path)


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_whole_pickle_or_torch_file_is_named(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"w": list(range(20))} , protocol=protocol) + b"\0" * 0)
    with pytest.raises(ArtifactError, match="not a golfjax artifact"):
        read_artifact(path)
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ArtifactError, match="torch.save"):
        read_artifact(path)


def test_is_pickle_stream_has_no_false_positive_on_codes(state_q) -> None:
    for qt in state_q.tensors.values():
        for array in qt.arrays.values():
            assert not artifact.is_pickle_stream(array.tobytes())
    assert artifact.is_pickle_stream(pickle.dumps([1, 2, 3], protocol=2))
    assert not artifact.is_pickle_stream(pickle.dumps([1, 2, 3], protocol=2)[:-1])


@pytest.mark.parametrize("codec", ["zlib", "zstd", "brotli", "lzma", "shuffle2+brotli", "pergroup"])
def test_loading_never_calls_pickle(tmp_path: Path, state_q, codec: str, monkeypatch) -> None:
    path = tmp_path / "m.golf"
    write_artifact(path, state_q, CONFIG, codec=codec, reorder=True)

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle was called while loading an artifact")

    for name in ("load", "loads", "Unpickler", "_load", "_loads", "_Unpickler"):
        if hasattr(pickle, name):
            monkeypatch.setattr(pickle, name, forbidden)
    _, loaded, _ = read_artifact(path)
    assert_same_state(state_q, loaded)
    restored = dequantize_state(loaded)
    assert set(restored) == set(state_q.tensors)
