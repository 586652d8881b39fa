"""Resolve a run's data: shards, validation tokens, tokenizer and byte tables.

With `data.data_path` empty (the smoke config) the data are built offline:
a corpus from Python's standard-library docstrings, a SentencePiece tokenizer
trained on it with the reference exporter's settings, and shards written by
the same code as `prepare_data.py text`. They are cached under
`<out_dir>/_smoke_data/` so repeated smoke runs reuse them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import sentencepiece as spm

from golfjax.config import Config, ConfigError
from golfjax.data.loader import load_validation_tokens
from golfjax.data.prepare import tokenize_documents_to_shards, train_tokenizer
from golfjax.data.shards import list_shards
from golfjax.data.smoke import stdlib_documents
from golfjax.data.tokenizer import ByteTables, build_byte_tables, load_tokenizer

SMOKE_VAL_DOCS = 12


@dataclass(frozen=True)
class EvalData:
    val_tokens: np.ndarray
    tables: ByteTables
    tokenizer: spm.SentencePieceProcessor


@dataclass(frozen=True)
class RunData:
    config: Config
    train_files: list[Path]
    val_tokens: np.ndarray
    tables: ByteTables


def load_eval_data(cfg: Config) -> EvalData:
    """Tokenizer (checked against the vocab size), byte tables, validation tokens."""
    d = cfg.data
    if not d.tokenizer_path:
        raise ConfigError("data.tokenizer_path (TOKENIZER_PATH) is empty")
    sp = load_tokenizer(d.tokenizer_path, cfg.model.vocab_size)
    tables = build_byte_tables(sp, cfg.model.vocab_size)
    val_tokens = load_validation_tokens(list_shards(d.data_path, d.val_pattern), cfg.train.train_seq_len)
    return EvalData(val_tokens, tables, sp)


def build_smoke_data(out_dir: Path, vocab_size: int, log: Callable[[str], None]) -> tuple[Path, Path]:
    """Build (once) the offline smoke corpus; returns (data dir, tokenizer path)."""
    data_dir = out_dir / "_smoke_data" / f"stdlib_sp{vocab_size}"
    model = data_dir / "tokenizer.model"
    done = data_dir / "COMPLETE"  # written last: a build cut short is rebuilt, never reused
    if done.is_file():
        log(f"smoke_data: reusing {data_dir}")
        return data_dir, model
    log("smoke_data: no data.data_path given; building an offline corpus from the docstrings of "
        "Python's standard library (ships with Python) and training a tokenizer on it")
    docs = stdlib_documents()
    data_dir.mkdir(parents=True, exist_ok=True)
    model = train_tokenizer(docs[SMOKE_VAL_DOCS:], vocab_size, data_dir / "tokenizer")
    sp = load_tokenizer(model, vocab_size)
    summary = tokenize_documents_to_shards(docs, sp, data_dir, num_val_docs=SMOKE_VAL_DOCS)
    log(f"smoke_data: {data_dir} {summary}")
    done.write_text("built\n")
    return data_dir, model


def prepare_run_data(cfg: Config, log: Callable[[str], None]) -> RunData:
    """Everything a training run reads; fills in the smoke data paths when none are given."""
    d = cfg.data
    if not d.data_path:
        data_dir, tokenizer = build_smoke_data(Path(cfg.train.out_dir), cfg.model.vocab_size, log)
        cfg = replace(cfg, data=replace(d, data_path=str(data_dir), tokenizer_path=str(tokenizer)))
        d = cfg.data
    train_files = list_shards(d.data_path, d.train_pattern)
    evaluation = load_eval_data(cfg)
    val_tokens = evaluation.val_tokens
    log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={d.tokenizer_path}")
    log(f"train_loader:dataset:{Path(d.data_path).name} train_shards:{len(train_files)}")
    log(f"val_loader:shards pattern={Path(d.data_path) / d.val_pattern} tokens:{len(val_tokens) - 1}")
    return RunData(cfg, train_files, val_tokens, evaluation.tables)
