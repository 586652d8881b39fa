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
        self.counts = {"val": 0, "train": 0}
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
        "removed_stale_shards": len(stale),
    }


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
) -> Path:
    """Train a SentencePiece BPE with the challenge exporter's settings; return the .model path.

    `max_sentence_length` None keeps SentencePiece's default (4192 bytes), as
    the exporter does: longer documents are left out of training. The result
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
    settings = dict(EXPORTER_TRAINER_SETTINGS, vocab_size=vocab_size, model_prefix=str(prefix))
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
