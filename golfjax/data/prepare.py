"""Make training data: tokenize local documents into shards, train tokenizers, download FineWeb.

Everything here follows the reference exporter
(`data/download_hf_docs_and_tokenize.py`) and downloader
(`data/cached_challenge_fineweb.py`) of openai/parameter-golf, so that shards
made here are byte-identical to the challenge's and tokenizers are trained
with the challenge's settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from golfjax.data.shards import validate_shard, write_shard
from golfjax.data.tokenizer import TokenizerError, load_tokenizer

SHARD_SIZE = 10**8
NUM_VAL_DOCS = 50_000  # the challenge's validation split: the first 50,000 documents
TXT_SPLITS = ("document", "lines", "paragraphs")
SHARD_PATTERNS = ("fineweb_train_*.bin", "fineweb_val_*.bin")

# The reference exporter's SentencePiece settings. It leaves max_sentence_length
# at SentencePiece's default, so documents longer than this many bytes are
# skipped when the tokenizer is trained (not when data is tokenized).
EXPORTER_TRAINER_SETTINGS: dict[str, Any] = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}
SP_DEFAULT_MAX_SENTENCE_LENGTH = 4192

HF_REPO_ID = "willdepueoai/parameter-golf"
HF_REMOTE_ROOT = "datasets"
DOCS_FILES = ("docs_selected.jsonl", "docs_selected.source_manifest.json")


class PrepareError(ValueError):
    """A data preparation input or request that cannot be carried out."""


# ---------------------------------------------------------------- documents


def read_documents(paths: Sequence[str | Path], txt_split: str = "document") -> Iterator[str]:
    """Documents from .jsonl files ({"text": ...} per line) and .txt files, in the given order.

    All paths are checked before the first document is produced, so that a
    typo fails before any output is written. A .txt file is one document, or
    one per line / per blank-line-separated paragraph with `txt_split`.
    """
    if txt_split not in TXT_SPLITS:
        raise PrepareError(f"unknown txt split {txt_split!r}; choose one of {', '.join(TXT_SPLITS)}")
    if not paths:
        raise PrepareError("no input documents given")
    files = [Path(p) for p in paths]
    for f in files:
        if not f.is_file():
            raise PrepareError(f"input file not found: {f}")
        if f.suffix not in (".txt", ".jsonl"):
            raise PrepareError(f"unsupported input {f}: expected a .txt or .jsonl file")
    return _iter_documents(files, txt_split)


def _iter_documents(files: list[Path], txt_split: str) -> Iterator[str]:
    for f in files:
        if f.suffix == ".jsonl":
            yield from _jsonl_documents(f)
        else:
            yield from _split_text(_read_text(f), txt_split)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path} is not valid UTF-8 text: {e}") from e


def _split_text(text: str, txt_split: str) -> list[str]:
    if txt_split == "document":
        return [text]
    parts = text.splitlines() if txt_split == "lines" else re.split(r"\n(?:[ \t\r]*\n)+", text)
    return [p for p in parts if p.strip()]


def _jsonl_documents(path: Path) -> Iterator[str]:
    with path.open("rb") as f:  # bytes, so a decoding error is pinned to its line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PrepareError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(f"{path}:{lineno}: bad JSON line: {e}") from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise PrepareError(f'{path}:{lineno}: expected a JSON object with a string "text" field')
            yield record["text"]


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------- shards


class _ShardWriter:
    """Fills shards of `shard_size` tokens split by split, as the reference exporter does.

    A document may straddle two shards; switching split closes the open shard.
    """

    def __init__(self, out_dir: Path, shard_size: int):
        self.out_dir = out_dir
        self.shard_size = shard_size
        self.split = "val"
        self.chunks: list[np.ndarray] = []
        self.fill = 0
        self.counts = {"val": 0, "train": 0, "val_bytes": 0}
        self.written: list[str] = []

    def add(self, split: str, tokens: np.ndarray) -> None:
        if split != self.split:
            self.flush()
            self.split = split
        pos = 0
        while pos < len(tokens):
            take = min(self.shard_size - self.fill, len(tokens) - pos)
            self.chunks.append(tokens[pos : pos + take])
            self.fill += take
            pos += take
            if self.fill == self.shard_size:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        name = f"fineweb_{self.split}_{self.counts[self.split]:06d}.bin"
        write_shard(self.out_dir / name, np.concatenate(self.chunks))
        self.written.append(name)
        self.counts[self.split] += 1
        self.chunks, self.fill = [], 0


def _fresh_shard_dir(sp: spm.SentencePieceProcessor, out_dir: str | Path, num_val_docs: int,
                     shard_size: int) -> tuple[Path, int, int]:
    """Check the export arguments and the tokenizer, empty `out_dir` of earlier shards
    (so the `fineweb_*` globs never mix two exports); returns (out_dir, BOS id, shards removed)."""
    if num_val_docs < 0:
        raise PrepareError(f"num_val_docs must be >= 0, got {num_val_docs}")
    if shard_size <= 0:
        raise PrepareError(f"shard_size must be positive, got {shard_size}")
    vocab = int(sp.vocab_size())
    if vocab > 2**16:
        raise PrepareError(f"vocab_size={vocab} is too large for uint16 shards")
    bos = int(sp.bos_id())
    if bos < 0:
        raise PrepareError("the tokenizer has no BOS id; every document must start with BOS")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = [p for pattern in SHARD_PATTERNS for p in out.glob(pattern)]
    for p in stale:
        p.unlink()
    return out, bos, len(stale)


def tokenize_documents_to_shards(
    docs: Iterable[str],
    sp: spm.SentencePieceProcessor,
    out_dir: str | Path,
    num_val_docs: int,
    shard_size: int = SHARD_SIZE,
    *,
    batch_size: int = 1024,
    num_threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write `[BOS] + sp.encode(text)` per document into fineweb_{val,train}_NNNNNN.bin shards.

    The first `num_val_docs` documents are validation, the rest training; the
    text is encoded as-is and no EOS is appended, as in the challenge export.
    Shards of a previous export in `out_dir` are removed first, so the
    `fineweb_*` globs never mix two exports. Returns the manifest-style stats
    plus the written shard names.
    """
    out, bos, removed = _fresh_shard_dir(sp, out_dir, num_val_docs, shard_size)

    writer = _ShardWriter(out, shard_size)
    docs_n = {"val": 0, "train": 0}
    tokens_n = {"val": 0, "train": 0}
    threads = num_threads or os.cpu_count() or 1
    with tqdm(desc=f"tokenizing into {out}", unit="doc", disable=not progress) as bar:
        for batch in _batched(docs, batch_size):
            for ids in sp.encode(batch, out_type=int, num_threads=threads):
                split = "val" if docs_n["val"] < num_val_docs else "train"
                tokens = np.empty(len(ids) + 1, dtype=np.int32)
                tokens[0] = bos
                tokens[1:] = ids
                writer.add(split, tokens)
                docs_n[split] += 1
                tokens_n[split] += len(tokens)
            bar.update(len(batch))
    writer.flush()
    if docs_n["val"] < num_val_docs:
        for name in writer.written:  # leave no half export behind
            (out / name).unlink()
        raise PrepareError(
            f"only {docs_n['val']} documents were given, fewer than num_val_docs={num_val_docs}; "
            "the validation split would be short and there would be no training split"
        )
    return {
        "out_dir": str(out),
        "docs_total": docs_n["val"] + docs_n["train"],
        "docs_val": docs_n["val"],
        "docs_train": docs_n["train"],
        "files_total": len(writer.written),
        "files_val": writer.counts["val"],
        "files_train": writer.counts["train"],
        "tokens_total": tokens_n["val"] + tokens_n["train"],
        "tokens_val": tokens_n["val"],
        "tokens_train": tokens_n["train"],
        "shards": writer.written,
        "removed_stale_shards": removed,
    }


# ---------------------------------------------------------------- CaseOps shards


def tokenize_caseops_to_shards(
    docs: Iterable[str],
    sp: spm.SentencePieceProcessor,
    out_dir: str | Path,
    num_val_docs: int,
    shard_size: int = SHARD_SIZE,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """CaseOps shards: `[BOS] + sp.encode(caseops.encode(text))` per document, plus the
    validation byte sidecar `fineweb_val_bytes_NNNNNN.bin` (one uint16 per validation
    token, the original UTF-8 bytes it stands for; BOS 0), cut at the same places as
    the validation token shards.

    Every validation document's sidecar total is checked against the UTF-8 length
    of its original text before anything is written for it.
    """
    from golfjax.data import caseops

    try:
        caseops.check_tokenizer(sp)
    except caseops.CaseOpsError as e:
        raise PrepareError(str(e)) from None
    out, bos, removed = _fresh_shard_dir(sp, out_dir, num_val_docs, shard_size)
    tokens_w = _ShardWriter(out, shard_size)
    bytes_w = _ShardWriter(out, shard_size)
    docs_n = {"val": 0, "train": 0}
    tokens_n = {"val": 0, "train": 0}
    val_bytes = 0
    with tqdm(desc=f"CaseOps tokenizing into {out}", unit="doc", disable=not progress) as bar:
        for text in docs:
            split = "val" if docs_n["val"] < num_val_docs else "train"
            if split == "val":
                ids, counts = caseops.encode_document(sp, text)
                expected = len(text.encode("utf-8"))
                if int(counts.sum()) != expected or (counts.size and int(counts.max()) > caseops.MAX_SIDECAR_BYTES):
                    raise PrepareError(
                        f"validation document {docs_n['val']}: sidecar bytes {int(counts.sum())} differ from its "
                        f"UTF-8 length {expected} (or a token exceeds uint16)"
                    )
                bytes_w.add("val_bytes", np.concatenate([[0], counts]).astype(np.int64))
                val_bytes += expected
            else:
                ids = np.asarray(sp.encode(caseops.encode(text), out_type=int), dtype=np.int64)
            tokens = np.empty(len(ids) + 1, dtype=np.int64)
            tokens[0] = bos
            tokens[1:] = ids
            tokens_w.add(split, tokens)
            docs_n[split] += 1
            tokens_n[split] += len(tokens)
            bar.update(1)
    tokens_w.flush()
    bytes_w.flush()
    if docs_n["val"] < num_val_docs:
        for name in tokens_w.written + bytes_w.written:
            (out / name).unlink()
        raise PrepareError(
            f"only {docs_n['val']} documents were given, fewer than num_val_docs={num_val_docs}; "
            "the validation split would be short and there would be no training split"
        )
    return {
        "out_dir": str(out),
        "transform": caseops.TRANSFORM_NAME,
        "docs_val": docs_n["val"],
        "docs_train": docs_n["train"],
        "tokens_val": tokens_n["val"],
        "tokens_train": tokens_n["train"],
        "bytes_val": val_bytes,
        "files_val": tokens_w.counts["val"],
        "files_train": tokens_w.counts["train"],
        "files_val_bytes": bytes_w.counts["val_bytes"],
        "shards": tokens_w.written + bytes_w.written,
        "removed_stale_shards": removed,
    }


def train_caseops_tokenizer(
    docs: Iterable[str], vocab_size: int, out_prefix: str | Path, **kwargs: Any
) -> Path:
    """`train_tokenizer` on the CaseOps forms of `docs`, with the four operators reserved
    as user-defined symbols (ids 4..7 after pad/bos/eos/unk), so each is always one token."""
    from golfjax.data import caseops

    settings = {"user_defined_symbols": list(caseops.OPERATORS)}
    model = train_tokenizer(caseops.transformed_documents(docs), vocab_size, out_prefix,
                            extra_settings=settings, **kwargs)
    try:
        caseops.check_tokenizer(load_tokenizer(model))
    except caseops.CaseOpsError as e:
        raise TokenizerError(str(e)) from None
    return model


# ---------------------------------------------------------------- tokenizers


def training_text(docs: Iterable[str], max_docs: int | None = None) -> Iterator[str]:
    """The exporter's tokenizer-training text: NULs become spaces, strip, skip empty documents."""
    for i, doc in enumerate(docs):
        if max_docs is not None and i >= max_docs:
            return
        text = doc.replace("\x00", " ").strip()
        if text:
            yield text


def train_tokenizer(
    docs: Iterable[str],
    vocab_size: int,
    out_prefix: str | Path,
    *,
    max_docs: int | None = None,
    max_sentence_length: int | None = None,
    verbose: bool = False,
    extra_settings: Mapping[str, Any] | None = None,
) -> Path:
    """Train a SentencePiece BPE with the challenge exporter's settings; return the .model path.

    `extra_settings` adds SentencePiece trainer options (CaseOps reserves its
    operators as user_defined_symbols). `max_sentence_length` None keeps
    SentencePiece's default (4192 bytes), as the exporter does: longer documents are left out of training. The result
    is refused (and deleted) if it lacks the "▁" piece or has fewer pieces than
    asked for (hard_vocab_limit=False lets a small corpus shrink the vocab,
    and VOCAB_SIZE must equal the tokenizer's).
    """
    prefix = Path(out_prefix)
    model_path = Path(f"{prefix}.model")
    outputs = (model_path, Path(f"{prefix}.vocab"))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for p in outputs:
        p.unlink(missing_ok=True)
    settings = dict(EXPORTER_TRAINER_SETTINGS, **(extra_settings or {}), vocab_size=vocab_size, model_prefix=str(prefix))
    if max_sentence_length is not None:
        settings["max_sentence_length"] = max_sentence_length
    limit = max_sentence_length or SP_DEFAULT_MAX_SENTENCE_LENGTH
    seen = {"docs": 0, "too_long": 0}

    def counted() -> Iterator[str]:
        for text in training_text(docs, max_docs):
            seen["docs"] += 1
            seen["too_long"] += len(text.encode("utf-8")) > limit
            yield text

    try:
        with contextlib.nullcontext(None) if verbose else open(os.devnull, "w") as log:
            spm.SentencePieceTrainer.train(sentence_iterator=counted(), logstream=log, **settings)
    except RuntimeError as e:
        if seen["docs"] == seen["too_long"]:
            raise TokenizerError(
                f"none of the {seen['docs']} training documents is at most max_sentence_length={limit} bytes, "
                "and SentencePiece skips longer ones; split the text into smaller documents or raise the limit"
            ) from e
        raise TokenizerError(f"SentencePiece training failed for vocab_size={vocab_size}: {e}") from e
    try:
        sp = load_tokenizer(model_path)
        if sp.vocab_size() != vocab_size:
            raise TokenizerError(
                f"the corpus only supports {sp.vocab_size()} pieces, not vocab_size={vocab_size}; "
                "use more text or a smaller vocab"
            )
    except TokenizerError:
        for p in outputs:
            p.unlink(missing_ok=True)
        raise
    return model_path


# ---------------------------------------------------------------- FineWeb download


def dataset_name_for_variant(variant: str) -> str:
    """The published dataset directory for a variant: byte260 or sp<vocab>."""
    if variant == "byte260" or (variant.startswith("sp") and variant[2:].isdigit()):
        return f"fineweb10B_{variant}"
    raise PrepareError(f"unknown variant {variant!r}; expected byte260 or sp<VOCAB_SIZE> such as sp1024")


def _remote(remote_root: str, relative: str) -> str:
    return f"{remote_root.strip('/')}/{relative}" if remote_root.strip("/") else relative


def fineweb_file_list(
    manifest: Mapping[str, Any],
    variant: str,
    train_shards: int,
    remote_root: str = HF_REMOTE_ROOT,
    with_docs: bool = False,
) -> list[str]:
    """Repo paths to fetch for a variant, from the dataset manifest (pure; no network).

    Validation shards, the first `train_shards` training shards, and the
    tokenizer files the manifest names; optionally the raw documents first.
    """
    name = dataset_name_for_variant(variant)
    datasets = manifest.get("datasets") or []
    entry = next((d for d in datasets if d.get("name") == name), None)
    if entry is None:
        known = ", ".join(str(d.get("name")) for d in datasets) or "none"
        raise PrepareError(f"dataset {name} (variant {variant}) is not in the manifest; it has: {known}")
    stats = entry.get("stats") or {}
    try:
        files_train, files_val = int(stats["files_train"]), int(stats["files_val"])
    except (KeyError, TypeError, ValueError) as e:
        raise PrepareError(f"manifest entry for {name} lacks integer stats.files_train/files_val") from e
    if not 0 <= train_shards <= files_train:
        raise PrepareError(f"{variant} has {files_train} training shards; requested {train_shards}")
    tok_name = entry.get("tokenizer_name")
    tok = next((t for t in manifest.get("tokenizers") or [] if t.get("name") == tok_name), None)
    if tok is None:
        raise PrepareError(f"tokenizer {tok_name!r} of {name} is not in the manifest")
    artifacts = [str(tok[k]) for k in ("model_path", "vocab_path", "path") if tok.get(k)]
    if not artifacts:
        raise PrepareError(f"manifest tokenizer {tok_name!r} names no files to download")

    shard_dir = f"datasets/{name}"
    files = list(DOCS_FILES) if with_docs else []
    files += [f"{shard_dir}/fineweb_val_{i:06d}.bin" for i in range(files_val)]
    files += [f"{shard_dir}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    files += artifacts
    return [_remote(remote_root, f) for f in files]


def local_path_for_remote(remote_path: str, remote_root: str, out_root: str | Path) -> Path:
    """Where a repo file goes locally: its path below the remote root, under out_root."""
    root = remote_root.strip("/")
    relative = remote_path[len(root) + 1 :] if root and remote_path.startswith(root + "/") else remote_path
    return Path(out_root) / relative


def _hf_download(repo_id: str, remote_path: str, destination: Path) -> None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise PrepareError("downloading needs huggingface_hub: pip install golfjax[download]") from e
    parent, _, filename = remote_path.rpartition("/")
    try:
        cached = hf_hub_download(repo_id=repo_id, filename=filename, subfolder=parent or None, repo_type="dataset")
    except Exception as e:  # the hub raises many types (HTTP, connection, offline mode)
        raise PrepareError(f"could not download {remote_path} from dataset repo {repo_id}: {e}") from e
    source = Path(cached).resolve(strict=True)  # the cache entry may be a symlink into blobs/
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def download_fineweb(
    variant: str,
    train_shards: int,
    out_root: str | Path,
    *,
    repo_id: str = HF_REPO_ID,
    remote_root: str = HF_REMOTE_ROOT,
    manifest_path: str | Path | None = None,
    with_docs: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fetch the published export of a variant into out_root/{datasets,tokenizers}/, manifest-driven.

    The manifest is `manifest_path` if given, else out_root/manifest.json,
    downloaded when absent. Files already present are kept (shards are
    validated either way).
    """
    out = Path(out_root)
    dataset_dir = out / "datasets" / dataset_name_for_variant(variant)  # a bad variant fails before any download
    if train_shards < 0:
        raise PrepareError(f"train_shards must be >= 0, got {train_shards}")
    local_manifest = Path(manifest_path) if manifest_path else out / "manifest.json"
    if not local_manifest.is_file():
        if manifest_path:
            raise PrepareError(f"manifest file not found: {local_manifest}")
        _hf_download(repo_id, _remote(remote_root, "manifest.json"), local_manifest)
    try:
        manifest = json.loads(local_manifest.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrepareError(f"manifest {local_manifest} is not valid JSON: {e}") from e
    remote_files = fineweb_file_list(manifest, variant, train_shards, remote_root, with_docs)
    fetched = 0
    for remote in tqdm(remote_files, desc=f"downloading {variant}", unit="file", disable=not progress):
        local = local_path_for_remote(remote, remote_root, out)
        if not local.exists():
            _hf_download(repo_id, remote, local)
            fetched += 1
        if local.suffix == ".bin":
            validate_shard(local)
    return {
        "dataset_dir": str(dataset_dir),
        "manifest": str(local_manifest),
        "files": len(remote_files),
        "downloaded": fetched,
        "already_present": len(remote_files) - fetched,
    }


# ---------------------------------------------------------------- the CPU golf track

# Inputs, relative to the shared data folder (`../shared/data` or any copy of it),
# with the sha256 of the published files (each folder's PROVENANCE.md).
CPU_TRACK_TOKENIZER = "tokenizers/fineweb_1024_bpe.model"
CPU_TRACK_FINEWEB = "fineweb/fineweb_challenge_docs_200.jsonl"
CPU_TRACK_PYTHON_DOCS = "text/python311_docs.jsonl"
CPU_TRACK_TEXTS = ("text/kjv_bible.txt", "text/tinyshakespeare.txt")
CPU_TRACK_INPUTS: dict[str, str] = {
    CPU_TRACK_TOKENIZER: "4f5e8adb109c66b4886963bc75a7befd73bda36d27fd7102df8e9e66503b0e2a",
    CPU_TRACK_FINEWEB: "d20c996a4eed293d9ae4fff9c0aec8c1b49a3190895f2a146a5f70695a750f22",
    CPU_TRACK_PYTHON_DOCS: "8ba4b8332adb3028d2e08ca710261655ab650f7173ea2ef0380486c6e3f13546",
    "text/kjv_bible.txt": "d2e6b22b666f44e680621c54cb5ad7f3918c431134c7fad9a5e159bec64264d5",
    "text/tinyshakespeare.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
}
CPU_TRACK_VAL_DOCS = range(150, 200)  # 0-based, file order, of the 200 FineWeb documents
CPU_TRACK_CHUNK_BYTES = 4096
CPU_TRACK_SHUFFLE_SEED = 0
# What the track is: every result on it is comparable because these are fixed.
CPU_TRACK_SHARDS: dict[str, dict[str, Any]] = {
    "fineweb_val_000000.bin": {
        "sha256": "eeee2f1090a7e7f1dd82d7777be18b029d8f98d03e09790f7ce1940162320185",
        "tokens": 113_483,
    },
    "fineweb_train_000000.bin": {
        "sha256": "adf236b9d8e5dda39ad97ac2a9b5f57e22df53d867aa947da2ea269441c14baa",
        "tokens": 7_923_495,
    },
}
CPU_TRACK_MANIFEST = "cpu_track.json"
CPU_TRACK_TOKENIZER_NAME = "fineweb_1024_bpe.model"  # the tokenizer is copied beside the shards

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs of `text` split at blank lines (regex `\\n\\s*\\n`), whitespace-only ones dropped.

    Paragraphs are kept as they are (not stripped).
    """
    return [p for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def chunk_paragraphs(paragraphs: Iterable[str], max_bytes: int = CPU_TRACK_CHUNK_BYTES) -> list[str]:
    """Group paragraphs greedily, in order, into chunks joined by "\\n\\n" of at most `max_bytes` UTF-8 bytes.

    A paragraph joins the current chunk unless the joined chunk would pass
    `max_bytes`; then it starts a new chunk. A paragraph longer than
    `max_bytes` on its own is a chunk of its own (never cut).
    """
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for p in paragraphs:
        n = len(p.encode("utf-8"))
        if current and size + 2 + n <= max_bytes:
            current.append(p)
            size += 2 + n
            continue
        if current:
            chunks.append("\n\n".join(current))
        current, size = [p], n
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def resolve_shared_data_dir(shared: str | Path) -> Path:
    """The folder holding tokenizers/, fineweb/ and text/: `shared` itself or `shared/data`."""
    root = Path(shared)
    for candidate in (root, root / "data"):
        if (candidate / CPU_TRACK_FINEWEB).is_file():
            return candidate
    raise PrepareError(
        f"{root} does not hold the shared data: expected {CPU_TRACK_FINEWEB} in it or in {root / 'data'}"
    )


def cpu_track_documents(data_dir: str | Path) -> tuple[list[str], list[str]]:
    """(validation documents, shuffled training documents) of the CPU track, by its spec.

    Validation: FineWeb documents 150-199 (file order). Training: the other 150
    FineWeb documents in file order, then every document of the Python docs,
    then the KJV Bible and then tiny Shakespeare, each split into paragraphs
    and grouped into chunks of at most 4,096 bytes; then the whole list
    permuted by `numpy.random.RandomState(0).permutation`.
    """
    d = Path(data_dir)
    for relative in CPU_TRACK_INPUTS:
        if not (d / relative).is_file():
            raise PrepareError(f"CPU track input not found: {d / relative}")
    fineweb = list(_jsonl_documents(d / CPU_TRACK_FINEWEB))
    if len(fineweb) != 200:
        raise PrepareError(f"{d / CPU_TRACK_FINEWEB} holds {len(fineweb)} documents; the CPU track needs 200")
    val = [fineweb[i] for i in CPU_TRACK_VAL_DOCS]
    train = [doc for i, doc in enumerate(fineweb) if i not in CPU_TRACK_VAL_DOCS]
    train += list(_jsonl_documents(d / CPU_TRACK_PYTHON_DOCS))
    for relative in CPU_TRACK_TEXTS:
        train += chunk_paragraphs(split_paragraphs(_read_text(d / relative)))
    order = np.random.RandomState(CPU_TRACK_SHUFFLE_SEED).permutation(len(train))
    return val, [train[i] for i in order]


def _sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _differing_inputs(data_dir: Path) -> list[str]:
    out = []
    for relative, expected in CPU_TRACK_INPUTS.items():
        path = data_dir / relative
        actual = _sha256_file(path) if path.is_file() else "missing"
        if actual != expected:
            out.append(f"{relative} (sha256 {actual[:16]}..., published {expected[:16]}...)")
    return out


def verify_cpu_track(out_dir: str | Path, expected: Mapping[str, Mapping[str, Any]] = CPU_TRACK_SHARDS) -> dict[str, str]:
    """Check the track's shards in `out_dir` against the fixed sha256s; returns {name: sha256}.

    Raises PrepareError naming every shard that is missing, extra or different.
    """
    out = Path(out_dir)
    found = sorted(p.name for pattern in SHARD_PATTERNS for p in out.glob(pattern))
    problems = [f"unexpected shard {name}" for name in found if name not in expected]
    hashes: dict[str, str] = {}
    for name, spec in expected.items():
        path = out / name
        if not path.is_file():
            problems.append(f"missing shard {name}")
            continue
        hashes[name] = _sha256_file(path)
        if hashes[name] != spec["sha256"]:
            problems.append(f"{name} has sha256 {hashes[name]}, the track's is {spec['sha256']}")
    if problems:
        raise PrepareError(f"{out} is not the CPU track: " + "; ".join(problems))
    return hashes


def build_cpu_track(
    shared_data_dir: str | Path,
    out_dir: str | Path,
    *,
    expected: Mapping[str, Mapping[str, Any]] = CPU_TRACK_SHARDS,
    num_threads: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Build the CPU golf track's shards from the shared data and check them.

    Writes fineweb_val_000000.bin, fineweb_train_000000.bin, a copy of the
    tokenizer and `cpu_track.json` (hashes, counts, sources) into `out_dir`.
    When a shard's sha256 differs from the track's, everything written is
    removed and PrepareError says which shards and which inputs differ: results
    are only comparable on the exact track.
    """
    data_dir = resolve_shared_data_dir(shared_data_dir)
    out = Path(out_dir)
    val, train = cpu_track_documents(data_dir)
    sp = load_tokenizer(data_dir / CPU_TRACK_TOKENIZER, 1024)
    manifest_path = out / CPU_TRACK_MANIFEST
    tokenizer_copy = out / CPU_TRACK_TOKENIZER_NAME
    manifest_path.unlink(missing_ok=True)  # a failed rebuild must not leave an old "valid" marker
    summary = tokenize_documents_to_shards(
        [*val, *train], sp, out, num_val_docs=len(val), shard_size=SHARD_SIZE,
        batch_size=len(val) + len(train), num_threads=num_threads, progress=progress,
    )
    try:
        hashes = verify_cpu_track(out, expected)
    except PrepareError as e:
        for name in summary["shards"]:
            (out / name).unlink(missing_ok=True)
        differing = _differing_inputs(data_dir)
        why = (
            "inputs that differ from the published files: " + ", ".join(differing)
            if differing
            else "all inputs match the published files, so the build itself differs (tokenizer library version?)"
        )
        raise PrepareError(f"refusing to build the CPU track (shards removed): {e}. {why}") from None
    shutil.copyfile(data_dir / CPU_TRACK_TOKENIZER, tokenizer_copy)
    manifest = {
        "track": "golfjax CPU golf track v1",
        "source_dir": str(data_dir),
        "inputs": dict(CPU_TRACK_INPUTS),
        "tokenizer": CPU_TRACK_TOKENIZER_NAME,
        "docs_val": summary["docs_val"],
        "docs_train": summary["docs_train"],
        "tokens_val": summary["tokens_val"],
        "tokens_train": summary["tokens_train"],
        "shards": {name: {"sha256": sha, "tokens": int(expected[name]["tokens"])} for name, sha in hashes.items()},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return {**summary, "sha256": hashes, "tokenizer_path": str(tokenizer_copy), "manifest": str(manifest_path)}
