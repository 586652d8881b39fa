"""The artifact container: exact round trips, refusal of damaged files, size accounting."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import golfjax
from golfjax.export import artifact
from golfjax.export.artifact import (
    ArtifactError,
    check_budget,
    code_bytes,
    code_files,
    format_size_report,
    read_artifact,
    size_report,
    write_artifact,
)
from golfjax.export.codec import CODECS
from golfjax.export.quant import REFERENCE_SCHEMES, dequantize_state, quantize_state_int8

SHARED = Path(os.environ.get("GOLFJAX_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
GOLDEN = SHARED / "golden"
PREFIX = struct.Struct("<8sIQQ32s")
CONFIG = {"model": {"num_layers": 2, "model_dim": 64}, "export": {"scheme": "int8-zlib"}, "tags": ["a", "ü"]}


def every_scheme_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "blocks.0.mlp.fc.weight": rng.standard_normal((96, 704)).astype(np.float32),  # int8_per_row
        "big.vector": rng.standard_normal(65_600).astype(np.float32),  # int8_per_tensor
        "tok_emb.weight": rng.standard_normal((64, 32)).astype(ml_dtypes.bfloat16),  # passthrough_fp16
        "blocks.0.resid_mix": rng.standard_normal((2, 32)).astype(np.float32),  # passthrough_fp32
        "counts": np.arange(10, dtype=np.int64),  # passthrough
        "flags": np.array([[True, False, True]]),  # passthrough
        "scalar": np.array(0.5, dtype=np.float64),  # passthrough, 0-d
    }


@pytest.fixture(scope="module")
def state_q():
    return quantize_state_int8(every_scheme_state())[0]


def test_fixture_covers_every_scheme(state_q) -> None:
    assert {qt.scheme for qt in state_q.tensors.values()} == set(REFERENCE_SCHEMES)


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_is_exact(tmp_path: Path, state_q, codec: str) -> None:
    path = tmp_path / "model.golf"
    info = write_artifact(path, state_q, CONFIG, codec=codec, scheme="int8-" + codec)
    assert info.total_bytes == path.stat().st_size
    assert info.payload_sha256 == hashlib.sha256(path.read_bytes()[-info.payload_bytes :]).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["model.golf"]  # no temp file left behind
    config, loaded, header = read_artifact(path)
    assert config == CONFIG
    assert header["codec"] == codec and header["scheme"] == "int8-" + codec
    assert header["golfjax_version"] == golfjax.__version__ and header["quant_format"] == state_q.format
    assert header["stats"] == quantize_state_int8(every_scheme_state())[1]
    assert list(loaded.tensors) == list(state_q.tensors)
    for name, qt in state_q.tensors.items():
        got = loaded.tensors[name]
        assert (got.scheme, got.dtype, got.shape) == (qt.scheme, qt.dtype, qt.shape)
        assert set(got.arrays) == set(qt.arrays)
        for role, array in qt.arrays.items():
            assert got.arrays[role].dtype == array.dtype and got.arrays[role].shape == array.shape
            assert np.array_equal(got.arrays[role], array), (name, role)
    for name, value in dequantize_state(loaded).items():
        assert value.dtype == every_scheme_state()[name].dtype
        assert np.array_equal(value, dequantize_state(state_q)[name])


def test_golden_final_state_round_trip(tmp_path: Path) -> None:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden data not found at {GOLDEN}")
    with np.load(GOLDEN / "final_state.npz", allow_pickle=False) as z:
        state = {k: z[k] for k in z.files}
    state_q, _ = quantize_state_int8(state)
    info = write_artifact(tmp_path / "golden.golf", state_q, CONFIG)
    restored = dequantize_state(read_artifact(tmp_path / "golden.golf")[1])
    assert all(np.array_equal(restored[k], v) for k, v in dequantize_state(state_q).items())
    # The reference's own int8+zlib artifact of these weights is 228,097 bytes.
    assert info.total_bytes < 235_000


@pytest.fixture
def written(tmp_path: Path, state_q) -> Path:
    path = tmp_path / "model.golf"
    write_artifact(path, state_q, CONFIG)
    return path


def flip_byte(path: Path, index: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[index] ^= 0x01
    path.write_bytes(bytes(blob))


def test_tampered_payload_is_refused(written: Path) -> None:
    flip_byte(written, written.stat().st_size - 10)
    with pytest.raises(ArtifactError, match="payload checksum mismatch") as exc:
        read_artifact(written)
    assert str(written) in str(exc.value)


def test_tampered_header_is_refused(written: Path) -> None:
    flip_byte(written, PREFIX.size + 20)
    with pytest.raises(ArtifactError, match="header checksum mismatch"):
        read_artifact(written)


@pytest.mark.parametrize("keep", [0, 7, PREFIX.size - 1, PREFIX.size + 5, -1])
def test_truncated_file_is_refused(written: Path, keep: int) -> None:
    blob = written.read_bytes()
    written.write_bytes(blob[:keep] if keep >= 0 else blob[:-1])
    with pytest.raises(ArtifactError, match="truncated") as exc:
        read_artifact(written)
    assert str(written) in str(exc.value)


def test_trailing_bytes_are_refused(written: Path) -> None:
    written.write_bytes(written.read_bytes() + b"\x00")
    with pytest.raises(ArtifactError, match="trailing bytes"):
        read_artifact(written)


def test_wrong_magic_is_refused(written: Path) -> None:
    written.write_bytes(b"PK\x03\x04" + written.read_bytes()[4:])
    with pytest.raises(ArtifactError, match="not a golfjax artifact") as exc:
        read_artifact(written)
    assert str(written) in str(exc.value)


def test_wrong_version_is_refused(written: Path) -> None:
    blob = bytearray(written.read_bytes())
    struct.pack_into("<I", blob, 8, artifact.FORMAT_VERSION + 1)
    written.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match=f"unsupported format version {artifact.FORMAT_VERSION + 1}"):
        read_artifact(written)


def rewrite_header(path: Path, mutate) -> None:
    """Edit the header JSON and re-seal it with valid lengths and checksum."""
    blob = path.read_bytes()
    magic, version, header_len, payload_len, _ = PREFIX.unpack_from(blob)
    header = json.loads(blob[PREFIX.size : PREFIX.size + header_len])
    mutate(header)
    header_bytes = json.dumps(header).encode()
    prefix = PREFIX.pack(magic, version, len(header_bytes), payload_len, hashlib.sha256(header_bytes).digest())
    path.write_bytes(prefix + header_bytes + blob[PREFIX.size + header_len :])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h: h["tensors"][0]["arrays"]["q"].update(dtype="object"), "'object' is not an allowed numeric dtype"),
        (lambda h: h["tensors"][0]["arrays"]["q"].update(dtype="<U4"), "is not an allowed numeric dtype"),
        (lambda h: h["tensors"][0].update(dtype="object"), "'object' is not an allowed numeric dtype"),
        (lambda h: h["tensors"][0].update(scheme="int3_magic"), "unknown scheme 'int3_magic'"),
        (lambda h: h["tensors"][0]["arrays"]["q"].update(offset=10**9), "outside the"),
        (lambda h: h["tensors"][0]["arrays"]["q"].update(shape=[3]), "does not match dtype"),
        (lambda h: h["streams"][0].update(codec="gzip"), "unknown codec 'gzip'"),
        (lambda h: h.update(format_version=artifact.FORMAT_VERSION + 1), "format_version"),
        (lambda h: h["streams"][0].update(offset=1), "does not lie where the stream table says"),
        (lambda h: h["streams"][0].update(raw_bytes=1), "header declares 1"),
        (lambda h: h.update(streams=[]), "no stream table"),
        (lambda h: h["tensors"][0]["arrays"]["q"].update(stream="tok_emb"), "unknown stream 'tok_emb'"),
    ],
)
def test_bad_header_fields_are_refused(written: Path, mutate, message: str) -> None:
    rewrite_header(written, mutate)
    with pytest.raises(ArtifactError, match=re.escape(message)):
        read_artifact(written)


def test_unwritable_inputs_fail_clearly(tmp_path: Path, state_q) -> None:
    with pytest.raises(ArtifactError, match="unknown codec"):
        write_artifact(tmp_path / "a.golf", state_q, CONFIG, codec="gzip")
    with pytest.raises(ArtifactError, match="JSON"):
        write_artifact(tmp_path / "b.golf", state_q, {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_no_pickle_in_export_sources() -> None:
    forbidden = re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib|torch)\b|allow_pickle\s*=\s*True", re.M)
    sources = sorted((Path(golfjax.__file__).parent / "export").glob("*.py"))
    assert {p.name for p in sources} >= {"artifact.py", "codec.py", "quant.py"}
    for path in sources:
        assert not forbidden.search(path.read_text()), path


def test_code_files_rule() -> None:
    files = code_files()
    package = Path(golfjax.__file__).resolve().parent
    relative = {f.relative_to(package).as_posix() for f in files}
    assert {"__init__.py", "export/artifact.py", "export/quant.py", "export/codec.py"} <= relative
    # Training code counts too, as the challenge counts the whole train_gpt.py.
    assert {"train/loop.py", "optim/muon.py", "model/gpt.py"} <= relative
    assert relative == {p.relative_to(package).as_posix() for p in package.rglob("*.py")}
    assert files == sorted(files) and all(f.suffix == ".py" for f in files)
    # the optional fused attention kernel computes what cpu_ops.py does (a library kernel, as FA3 for the records)
    assert (package / "model" / "fused_attention.cc").exists() and "model/fused_attention.py" in relative


def test_size_report_arithmetic(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n", encoding="utf-8")  # 6 bytes
    b.write_text("s = 'é'\n", encoding="utf-8")  # 9 bytes: é is 2 bytes in UTF-8
    assert code_bytes([a, b]) == 15
    report = size_report(1_000, [a, b], limit=1_015)
    assert report["code_bytes"] == 15 and report["total_bytes"] == 1_015
    assert report["fits"] and report["headroom_bytes"] == 0 and len(report["code_files"]) == 2
    over = size_report(1_001, [a, b], limit=1_015)
    assert not over["fits"] and over["headroom_bytes"] == -1
    assert size_report(0, [])["limit_bytes"] == 16_000_000
    text = format_size_report(report, "int8+zlib")
    assert "Total submission size int8+zlib: 1015 bytes" in text and "Code size: 15 bytes" in text


def test_over_budget_lists_largest_tensors(tmp_path: Path, state_q) -> None:
    fits = size_report(15_999_000, [], limit=16_000_000)
    check_budget(fits, state_q)
    over = size_report(16_000_001, [], limit=16_000_000)
    with pytest.raises(ArtifactError) as exc:
        check_budget(over, state_q)
    message = str(exc.value)
    assert "over budget by 1 bytes" in message and "16000001" in message and "limit 16000000" in message
    by_size = sorted(state_q.tensors, key=lambda n: -sum(a.nbytes for a in state_q.tensors[n].arrays.values()))
    listed = [line.split()[0] for line in message.splitlines()[2:]]
    assert listed == by_size[:5]
    assert by_size[5] not in message
