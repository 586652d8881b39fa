"""The golfjax artifact container (``.golf``) and the challenge's size accounting.

Layout, all integers little-endian::

    magic           8 bytes   b"GOLFJAX\\0"
    format version  uint32
    header length   uint64
    payload length  uint64
    header sha256   32 bytes  (of the header JSON bytes)
    header          UTF-8 JSON: versions, run config, scheme, codec, stats,
                    payload sha256 and sizes, the streams and the tensor table
    payload         the compressed streams, concatenated

A stream is a run of stored arrays' raw little-endian bytes compressed with one
codec spec (``codec.py``). A single-codec artifact has one stream, "all", in
table order. The per-group mode (codec "pergroup") puts the int8 code matrices
("q" arrays) of each role (``GROUPS``: tok_emb, attn.c_k, ... across layers) in
their own stream, each matrix stored transposed and, for the ``HOT_GROUPS``
when asked, with its rows reordered (the permutation is stored in the "perm"
stream); everything else goes to the "other" stream; each stream gets the
smallest of the candidate codecs. An array entry of the tensor table names its
stream, offset and byte count, plus ``transposed`` / ``row_perm`` when the
per-group layout applied.

Loading never executes code: no pickle, arrays are rebuilt with np.frombuffer
from a whitelist of numeric dtypes, every checksum is verified before the
header is parsed or the payload decompressed, and a stream that parses as a
pickle opcode stream is refused outright.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import lzma
import os
import pickletools
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

import golfjax
from golfjax.export import codec as codecs
from golfjax.export.quant import SCHEME_ARRAYS, QuantizedState, QuantizedTensor, quant_stats

MAGIC = b"GOLFJAX\x00"
FORMAT_VERSION = 2  # 2: payload split into streams (per-group codec); 1 had a single stream
_PREFIX = struct.Struct("<8sIQQ32s")

# Dtypes an array may be stored in, and dtypes a tensor may be restored to.
STORED_DTYPES: frozenset[str] = frozenset(
    ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64")
)
RESTORED_DTYPES: frozenset[str] = STORED_DTYPES | {"bfloat16"}

ARTIFACT_LIMIT_BYTES = 16_000_000  # decimal, code + compressed model

# Package paths (relative to golfjax/) left out of the code count. Empty: the
# challenge counts the whole train_gpt.py, training included, and golfjax's
# equivalent of that file is the package that trains, exports and scores.
NOT_COUNTED: tuple[str, ...] = ()


# Per-group mode: code-matrix groups by role (a substring of the reference name), in stream order.
GROUPS: tuple[str, ...] = ("tok_emb", "attn.c_k", "attn.c_q", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")
HOT_GROUPS: frozenset[str] = frozenset(("tok_emb", "attn.c_q", "mlp.fc"))
PERGROUP = "pergroup"


class ArtifactError(ValueError):
    """An artifact that cannot be written, read or accepted (with the reason)."""


@dataclass(frozen=True)
class ArtifactInfo:
    """What write_artifact produced; ``total_bytes`` is the counted model size."""

    path: Path
    total_bytes: int
    header_bytes: int
    payload_bytes: int
    raw_payload_bytes: int
    codec: str
    scheme: str
    payload_sha256: str
    streams: tuple[dict, ...] = ()  # per stream: name, codec, raw_bytes, compressed_bytes, seconds


# ----------------------------------------------------------------------------
# writing


def _stored_bytes(name: str, role: str, array: np.ndarray) -> tuple[str, bytes]:
    dtype = array.dtype.name
    if dtype not in STORED_DTYPES:
        raise ArtifactError(f"tensor {name!r} array {role!r} has dtype {dtype!r}; storable: {sorted(STORED_DTYPES)}")
    little = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
    return dtype, little.tobytes()


def _check_scheme(name: str, qt: QuantizedTensor) -> None:
    expected = SCHEME_ARRAYS.get(qt.scheme)
    if expected is None:
        raise ArtifactError(f"tensor {name!r} has unknown scheme {qt.scheme!r}")
    if set(qt.arrays) != set(expected):
        raise ArtifactError(f"tensor {name!r} ({qt.scheme}) has arrays {sorted(qt.arrays)}, expected {list(expected)}")
    if qt.dtype not in RESTORED_DTYPES:
        raise ArtifactError(f"tensor {name!r} restores to dtype {qt.dtype!r}; allowed: {sorted(RESTORED_DTYPES)}")


def tensor_group(name: str) -> str | None:
    """The per-group role of a reference tensor name (None: the "other" stream)."""
    return next((group for group in GROUPS if group in name), None)


class _StreamBuilder:
    """Raw bytes per stream; ``add`` returns where an array landed."""

    def __init__(self) -> None:
        self.chunks: dict[str, list[bytes]] = {}
        self.sizes: dict[str, int] = {}

    def add(self, stream: str, raw: bytes) -> dict[str, Any]:
        offset = self.sizes.get(stream, 0)
        self.chunks.setdefault(stream, []).append(raw)
        self.sizes[stream] = offset + len(raw)
        return {"stream": stream, "offset": offset, "nbytes": len(raw)}

    def streams(self) -> list[tuple[str, bytes]]:
        order = [*GROUPS, "perm", "other", "all"]
        return [(name, b"".join(self.chunks[name])) for name in order if name in self.chunks]


def _pack_tensors(state_q: QuantizedState, pergroup: bool = False,
                  reorder: bool = False) -> tuple[list[dict[str, Any]], list[tuple[str, bytes]]]:
    """Tensor table and the raw (uncompressed) streams."""
    table: list[dict[str, Any]] = []
    builder = _StreamBuilder()
    for name, qt in state_q.tensors.items():
        _check_scheme(name, qt)
        group = tensor_group(name) if pergroup else None
        arrays: dict[str, Any] = {}
        for role in SCHEME_ARRAYS[qt.scheme]:
            array = qt.arrays[role]
            dtype, raw = _stored_bytes(name, role, array)
            spec: dict[str, Any] = {"dtype": dtype, "shape": list(array.shape)}
            if group is not None and role == "q" and array.ndim == 2 and dtype == "int8":
                stored = array
                if reorder and group in HOT_GROUPS and array.shape[0] > 2:
                    perm = codecs.greedy_row_order(array)
                    perm = perm.astype(np.uint16 if array.shape[0] <= 65_536 else np.uint32)
                    spec["row_perm"] = {"dtype": perm.dtype.name, "shape": [len(perm)],
                                        **builder.add("perm", _stored_bytes(name, "row_perm", perm)[1])}
                    stored = array[perm]
                spec["transposed"] = True
                spec.update(builder.add(group, _stored_bytes(name, role, stored.T)[1]))
            else:
                spec.update(builder.add("other" if pergroup else "all", raw))
            arrays[role] = spec
        table.append({"name": name, "scheme": qt.scheme, "dtype": qt.dtype, "shape": list(qt.shape), "arrays": arrays})
    return table, builder.streams()


def raw_payload(state_q: QuantizedState) -> bytes:
    """The single-stream raw payload (what a one-codec artifact compresses), for measuring codecs."""
    return _pack_tensors(state_q)[1][0][1] if state_q.tensors else b""


def _compress_streams(raw_streams: list[tuple[str, bytes]], codec: str,
                      candidates: tuple[str, ...]) -> tuple[list[dict[str, Any]], bytes]:
    """Compress each stream (per-group: the smallest candidate); the stream table and the payload."""
    table, parts, offset = [], [], 0
    for name, raw in raw_streams:
        start = time.perf_counter()
        if codec == PERGROUP:
            spec, packed = codecs.smallest(raw, candidates)
        else:
            spec, packed = codec, codecs.compress(raw, codec)
        table.append({"name": name, "codec": spec, "offset": offset, "compressed_bytes": len(packed),
                      "raw_bytes": len(raw), "seconds": round(time.perf_counter() - start, 3)})
        parts.append(packed)
        offset += len(packed)
    return table, b"".join(parts)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_artifact(
    path: str | os.PathLike,
    state_q: QuantizedState,
    config: dict,
    codec: str = "zlib",
    scheme: str = "int8-zlib",
    reorder: bool = False,
    candidates: Iterable[str] = codecs.PERGROUP_CANDIDATES,
) -> ArtifactInfo:
    """Write ``state_q`` and the run config as one artifact, atomically.

    ``codec`` is a codec spec (one stream) or "pergroup" (streams by role, the
    smallest of ``candidates`` each, rows of the hot groups reordered if ``reorder``).
    """
    path = Path(path)
    candidates = tuple(candidates)
    try:
        for spec in (candidates if codec == PERGROUP else (codec,)):
            codecs.parse_spec(spec)
    except codecs.CodecError as exc:
        raise ArtifactError(f"{path}: {exc} (or {PERGROUP!r})") from exc
    table, raw_streams = _pack_tensors(state_q, pergroup=codec == PERGROUP, reorder=reorder)
    streams, payload = _compress_streams(raw_streams, codec, candidates)
    raw_total = sum(len(raw) for _, raw in raw_streams)
    payload_sha = hashlib.sha256(payload).hexdigest()
    header = {
        "format_version": FORMAT_VERSION,
        "golfjax_version": golfjax.__version__,
        "scheme": scheme,
        "quant_format": state_q.format,
        "codec": codec,
        "config": config,
        "stats": quant_stats(state_q),
        "payload": {"sha256": payload_sha, "compressed_bytes": len(payload), "raw_bytes": raw_total},
        "streams": [{k: v for k, v in s.items() if k != "seconds"} for s in streams],
        "tensors": table,
    }
    try:
        header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: header is not JSON-serialisable (check the config): {exc}") from exc
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes), len(payload), hashlib.sha256(header_bytes).digest())
    blob = prefix + header_bytes + payload
    _atomic_write(path, blob)
    return ArtifactInfo(path, len(blob), len(header_bytes), len(payload), raw_total, codec, scheme, payload_sha,
                        tuple(streams))


# ----------------------------------------------------------------------------
# reading


def _not_ours_hint(blob: bytes) -> str:
    if blob.startswith(b"PK\x03\x04"):
        return " (it looks like a zip / torch.save file; golfjax never loads pickled data)"
    if blob[:1] == b"\x80" and is_pickle_stream(blob):
        return " (it is a pickle; golfjax never loads pickled data)"
    return ""


def _verified_header_and_payload(path: Path, blob: bytes) -> tuple[dict[str, Any], bytes]:
    """Check magic, version, lengths and both checksums, then parse the header."""
    if len(blob) < _PREFIX.size:
        raise ArtifactError(f"{path}: truncated: {len(blob)} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, version, header_len, payload_len, header_sha = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise ArtifactError(f"{path}: not a golfjax artifact (magic {magic!r}, expected {MAGIC!r})"
                            + _not_ours_hint(blob))
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: unsupported format version {version}; this golfjax reads version "
                            f"{FORMAT_VERSION} (re-export the checkpoint with this golfjax's scripts/export.py)")
    expected = _PREFIX.size + header_len + payload_len
    if len(blob) < expected:
        raise ArtifactError(f"{path}: truncated: {len(blob)} bytes, the prefix declares {expected}")
    if len(blob) > expected:
        raise ArtifactError(f"{path}: {len(blob) - expected} unexpected trailing bytes after the declared {expected}")
    header_bytes = blob[_PREFIX.size : _PREFIX.size + header_len]
    payload = blob[_PREFIX.size + header_len :]
    if hashlib.sha256(header_bytes).digest() != header_sha:
        raise ArtifactError(f"{path}: header checksum mismatch (sha256): the file is corrupted or was modified")
    try:
        header = json.loads(header_bytes.decode("utf-8"))
        declared_sha = header["payload"]["sha256"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: malformed header: {exc}") from exc
    if header.get("format_version") != version:
        raise ArtifactError(f"{path}: header format_version {header.get('format_version')!r} != prefix version {version}")
    if hashlib.sha256(payload).hexdigest() != declared_sha:
        raise ArtifactError(f"{path}: payload checksum mismatch (sha256): the file is corrupted or was modified")
    return header, payload


def is_pickle_stream(raw: bytes) -> bool:
    """True when ``raw`` parses as one whole pickle opcode stream (read with pickletools, never executed)."""
    if len(raw) < 2 or raw[-1:] != b".":
        return False
    try:
        ops = list(pickletools.genops(raw))
    except Exception:  # any malformed opcode: not a pickle
        return False
    return bool(ops) and ops[-1][0].name == "STOP" and ops[-1][2] == len(raw) - 1


def _decoded_streams(path: Path, header: dict[str, Any], payload: bytes) -> dict[str, bytes]:
    """Each stream decompressed and checked against its declared size; pickle streams refused."""
    table = header.get("streams")
    if not isinstance(table, list) or not table and payload:
        raise ArtifactError(f"{path}: malformed header: no stream table")
    streams: dict[str, bytes] = {}
    offset = 0
    for entry in table:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ArtifactError(f"{path}: malformed header: bad stream entry {entry!r}")
        name, size, declared = entry["name"], entry.get("compressed_bytes"), entry.get("raw_bytes")
        if entry.get("offset") != offset or not isinstance(size, int) or size < 0 or offset + size > len(payload):
            raise ArtifactError(f"{path}: stream {name!r} does not lie where the stream table says")
        try:
            raw = codecs.decompress(payload[offset : offset + size], entry.get("codec"))
        except codecs.CodecError as exc:
            raise ArtifactError(f"{path}: stream {name!r}: {exc}") from exc
        if len(raw) != declared:
            raise ArtifactError(f"{path}: stream {name!r} decompressed to {len(raw)} bytes, header declares {declared!r}")
        if is_pickle_stream(raw):
            raise ArtifactError(f"{path}: stream {name!r} is a pickle opcode stream; golfjax artifacts hold only "
                                "raw numeric arrays and never unpickle (refused)")
        if name in streams:
            raise ArtifactError(f"{path}: duplicate stream {name!r}")
        streams[name] = raw
        offset += size
    if offset != len(payload):
        raise ArtifactError(f"{path}: the stream table covers {offset} of the {len(payload)} payload bytes")
    return streams


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and d >= 0 for d in value):
        raise ArtifactError(f"{where}: bad shape {value!r}")
    return tuple(value)


def _raw_array(streams: dict[str, bytes], spec: Any, where: str) -> np.ndarray:
    """The bytes of one array entry, as declared numeric dtype and shape (no layout undone)."""
    if not isinstance(spec, dict):
        raise ArtifactError(f"{where}: bad array entry {spec!r}")
    dtype_name = spec.get("dtype")
    if dtype_name not in STORED_DTYPES:
        raise ArtifactError(f"{where}: dtype {dtype_name!r} is not an allowed numeric dtype")
    raw = streams.get(spec.get("stream"))
    if raw is None:
        raise ArtifactError(f"{where}: unknown stream {spec.get('stream')!r}")
    dtype = np.dtype(dtype_name).newbyteorder("<")
    shape = _shape(spec.get("shape"), where)
    offset, nbytes = spec.get("offset"), spec.get("nbytes")
    count = int(np.prod(shape, dtype=np.int64))
    if not (isinstance(offset, int) and isinstance(nbytes, int)) or nbytes != count * dtype.itemsize:
        raise ArtifactError(f"{where}: nbytes {nbytes!r} does not match dtype {dtype_name} and shape {list(shape)}")
    if offset < 0 or offset + nbytes > len(raw):
        raise ArtifactError(f"{where}: byte range [{offset}, {offset}+{nbytes}) outside the {len(raw)}-byte stream")
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _array(streams: dict[str, bytes], spec: Any, where: str) -> np.ndarray:
    """One stored array, with the per-group layout (transpose, row order) undone."""
    array = _raw_array(streams, spec, where)
    if spec.get("transposed", False):
        if array.ndim != 2:
            raise ArtifactError(f"{where}: only 2-D arrays can be stored transposed")
        array = np.ascontiguousarray(array.reshape(array.shape[::-1]).T)
    if spec.get("row_perm") is not None:
        perm = _raw_array(streams, spec["row_perm"], f"{where} row_perm").astype(np.int64)
        if array.ndim < 1 or perm.shape != array.shape[:1] or not np.array_equal(np.sort(perm), np.arange(len(perm))):
            raise ArtifactError(f"{where}: row_perm is not a permutation of the {array.shape[:1]} rows")
        restored = np.empty_like(array)
        restored[perm] = array
        array = restored
    return array


def _tensor(streams: dict[str, bytes], entry: Any, where: str) -> tuple[str, QuantizedTensor]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ArtifactError(f"{where}: bad tensor entry")
    name = entry["name"]
    where = f"{where} tensor {name!r}"
    scheme, dtype, specs = entry.get("scheme"), entry.get("dtype"), entry.get("arrays")
    if scheme not in SCHEME_ARRAYS or not isinstance(specs, dict) or set(specs) != set(SCHEME_ARRAYS[scheme]):
        raise ArtifactError(f"{where}: unknown scheme {scheme!r} or wrong arrays")
    if dtype not in RESTORED_DTYPES:
        raise ArtifactError(f"{where}: dtype {dtype!r} is not an allowed numeric dtype")
    arrays = {role: _array(streams, spec, f"{where} array {role!r}") for role, spec in specs.items()}
    return name, QuantizedTensor(scheme, dtype, _shape(entry.get("shape"), where), arrays)


def read_streams(path: str | os.PathLike) -> tuple[dict, dict[str, bytes]]:
    """The verified header and every decompressed stream (what inspectors look at)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}" + (" (a directory)" if path.is_dir() else ""))
    header, payload = _verified_header_and_payload(path, path.read_bytes())
    return header, _decoded_streams(path, header, payload)


def read_artifact(path: str | os.PathLike) -> tuple[dict, QuantizedState, dict]:
    """Read and verify an artifact: (run config, quantized state, header)."""
    path = Path(path)
    header, streams = read_streams(path)
    if sum(len(raw) for raw in streams.values()) != header["payload"].get("raw_bytes"):
        raise ArtifactError(f"{path}: streams hold {sum(map(len, streams.values()))} bytes, header declares "
                            f"{header['payload'].get('raw_bytes')!r}")
    table = header.get("tensors")
    if not isinstance(table, list):
        raise ArtifactError(f"{path}: malformed header: no tensor table")
    tensors = dict(_tensor(streams, entry, str(path)) for entry in table)
    if len(tensors) != len(table):
        raise ArtifactError(f"{path}: duplicate tensor names in the tensor table")
    state_q = QuantizedState(tensors, header.get("quant_format", ""))
    return header.get("config", {}), state_q, header


# ----------------------------------------------------------------------------
# size accounting


def code_files() -> list[Path]:
    """The golfjax source files counted as code bytes, sorted.

    Rule: every ``.py`` file of the installed ``golfjax`` package minus the
    paths in :data:`NOT_COUNTED` (none today). The challenge counts the whole
    ``train_gpt.py``, which trains, exports and scores; golfjax's equivalent is
    the package. The thin CLIs in ``scripts/`` only parse flags and call it.
    New modules count by default, so the rule errs towards over-counting.
    Not counted: the C++ attention kernel for x86 CPUs (``model/fused_attention.cc``),
    a faster way to compute what ``model/cpu_ops.py`` computes, in the role
    FlashAttention-3 plays for the records' PyTorch code (which do not count it).
    """
    package = Path(golfjax.__file__).resolve().parent
    files = []
    for path in package.rglob("*.py"):
        relative = path.relative_to(package).as_posix()
        if not any(relative == skip or relative.startswith(skip) for skip in NOT_COUNTED):
            files.append(path)
    return sorted(files)


CODE_BYTES_MODES: tuple[str, ...] = ("raw", "compressed")
CODE_BYTES_LABELS: dict[str, str] = {
    "raw": "raw UTF-8 bytes",
    "compressed": "records' counting: comments+docstrings stripped (ast), lzma, base85 in an exec stub",
}


def minify_source(source: str, filename: str = "<code>") -> str:
    """The same program without comments and docstrings (parsed with ``ast``, printed by ``ast.unparse``).

    Docstrings are the leading string statements of modules, classes and
    functions; a body left empty becomes ``pass``. golfjax never reads
    ``__doc__`` at run time, so the program does the same thing.
    """
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def minified_code_bundle(files: Iterable[Path]) -> bytes:
    """All files minified and concatenated, each after a ``# <path>`` line (what "compressed" compresses)."""
    parts = []
    for f in files:
        path = Path(f)
        parts.append(f"# {_display(path)}\n{minify_source(path.read_text(encoding='utf-8'), str(path))}\n")
    return "".join(parts).encode("utf-8")


_EXEC_STUB = ('import lzma,base64;exec(lzma.decompress(base64.b85decode("', '")))\n')


def code_bytes(files: Iterable[Path], mode: str = "raw") -> int:
    """Code size. "raw": the UTF-8 bytes of each file, as the challenge counts
    train_gpt.py. "compressed": the records' way, labelled as such in reports: the
    length of a self-extracting script holding the files minified
    (:func:`minify_source`), concatenated, lzma-compressed (preset 9 | extreme) and
    base85-encoded, as the records ship (or count) their train_gpt.py.
    """
    if mode == "raw":
        return sum(len(Path(f).read_bytes()) for f in files)
    if mode == "compressed":
        packed = base64.b85encode(lzma.compress(minified_code_bundle(files), preset=9 | lzma.PRESET_EXTREME))
        return len(_EXEC_STUB[0]) + len(packed) + len(_EXEC_STUB[1])
    raise ArtifactError(f"unknown code_bytes_mode {mode!r}; known: {', '.join(CODE_BYTES_MODES)}")


def _display(path: Path) -> str:
    package_parent = Path(golfjax.__file__).resolve().parent.parent
    try:
        return Path(path).resolve().relative_to(package_parent).as_posix()
    except ValueError:
        return str(path)


def size_report(
    model_bytes: int, code_files: Iterable[Path], limit: int = ARTIFACT_LIMIT_BYTES, code_mode: str = "raw"
) -> dict[str, Any]:
    """Model + code bytes against the decimal limit, with the files counted (code counted by `code_mode`)."""
    files = list(code_files)
    code = code_bytes(files, code_mode)
    total = model_bytes + code
    return {
        "model_bytes": model_bytes,
        "code_bytes": code,
        "code_bytes_mode": code_mode,
        "code_bytes_raw": code if code_mode == "raw" else code_bytes(files),
        "total_bytes": total,
        "limit_bytes": limit,
        "fits": total <= limit,
        "headroom_bytes": limit - total,
        "code_files": [_display(f) for f in files],
    }


def format_size_report(report: dict[str, Any], label: str = "") -> str:
    """Log lines in the reference's wording (``label`` e.g. "int8+zlib")."""
    tag = f" {label}" if label else ""
    verdict = "fits" if report["fits"] else "OVER BUDGET"
    return "\n".join(
        (
            f"Serialized model{tag}: {report['model_bytes']} bytes",
            f"Code size: {report['code_bytes']} bytes ({len(report['code_files'])} files)"
            + _code_mode_note(report),
            f"Total submission size{tag}: {report['total_bytes']} bytes "
            f"(limit {report['limit_bytes']}, {verdict}, headroom {report['headroom_bytes']})",
        )
    )


def _code_mode_note(report: dict[str, Any]) -> str:
    mode = report.get("code_bytes_mode", "raw")
    if mode == "raw":
        return ""
    return f" [code_bytes_mode={mode}: {CODE_BYTES_LABELS[mode]}; raw {report['code_bytes_raw']} bytes]"


def check_budget(report: dict[str, Any], state_q: QuantizedState, top: int = 5) -> None:
    """Raise ArtifactError with the breakdown and the largest tensors when over the limit."""
    if report["total_bytes"] <= report["limit_bytes"]:
        return
    sizes = sorted(
        ((sum(int(a.nbytes) for a in qt.arrays.values()), name, qt) for name, qt in state_q.tensors.items()),
        key=lambda item: -item[0],
    )
    largest = "\n".join(
        f"  {name} {qt.scheme} {list(qt.shape)}: {nbytes} bytes stored (before compression)"
        for nbytes, name, qt in sizes[:top]
    )
    raise ArtifactError(
        f"artifact over budget by {report['total_bytes'] - report['limit_bytes']} bytes: "
        f"model {report['model_bytes']} + code {report['code_bytes']} = {report['total_bytes']} "
        f"> limit {report['limit_bytes']}\nlargest tensors:\n{largest}"
    )
