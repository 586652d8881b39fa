"""Tokenizer loading refuses unfair tokenizers; byte tables equal the reference's."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from golfjax.data.tokenizer import TokenizerError, build_byte_tables, load_tokenizer
from golfjax.eval.bpb import decoded_utf8_bytes, stream_bytes

from tests.conftest import shared


@pytest.fixture(scope="module")
def sp1024():
    return load_tokenizer(shared("data/tokenizers/fineweb_1024_bpe.model"), 1024)


@pytest.fixture(scope="module")
def no_space_model(tmp_path_factory) -> Path:
    """A byte-fallback BPE trained on text without spaces, so "▁" never became a piece."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefgh"), size=rng.integers(2, 8))) for _ in range(200)]
    docs = ["".join(rng.choice(words, size=50)) for _ in range(100)]
    prefix = tmp_path_factory.mktemp("nospace") / "nospace"
    with open(os.devnull, "w") as log:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(docs), model_prefix=str(prefix), model_type="bpe", vocab_size=300,
            byte_fallback=True, add_dummy_prefix=False, hard_vocab_limit=False, logstream=log,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        )  # fmt: skip
    return Path(f"{prefix}.model")


def test_byte_tables_equal_reference(sp1024):
    golden = np.load(shared("golden/val_luts.npz"))
    tables = build_byte_tables(sp1024, 1024)
    for ours, key in zip(tables, ("base_bytes", "has_leading_space", "is_boundary_token")):
        assert ours.dtype == golden[key].dtype, key
        np.testing.assert_array_equal(ours, golden[key], err_msg=key)


def test_byte_table_rules(sp1024):
    tables = build_byte_tables(sp1024, 1100)
    assert len(tables.base_bytes) == 1100
    assert tables.is_boundary[1024:].all() and not tables.base_bytes[1024:].any()
    assert tables.is_boundary[[0, 1, 2, 3]].all() and not tables.base_bytes[[0, 1, 2, 3]].any()
    byte_a = sp1024.piece_to_id("<0x41>")
    assert sp1024.is_byte(byte_a) and tables.base_bytes[byte_a] == 1 and not tables.has_leading_space[byte_a]
    space = sp1024.piece_to_id("\u2581")
    assert (tables.base_bytes[space], tables.has_leading_space[space]) == (0, True)
    wor = sp1024.piece_to_id("\u2581wor")
    assert (tables.base_bytes[wor], tables.has_leading_space[wor]) == (3, True)


def test_refuses_tokenizer_without_space_piece(no_space_model):
    sp = spm.SentencePieceProcessor(model_file=str(no_space_model))
    assert sp.piece_to_id("\u2581") == sp.unk_id()  # the fixture really lacks it
    with pytest.raises(TokenizerError, match=r"no '▁' \(U\+2581\) piece.*3 byte-fallback.*20%"):
        load_tokenizer(no_space_model)


def test_vocab_size_mismatch():
    path = shared("data/tokenizers/fineweb_1024_bpe.model")
    with pytest.raises(TokenizerError, match="VOCAB_SIZE=2048 does not match tokenizer vocab_size=1024"):
        load_tokenizer(path, 2048)


def test_missing_or_wrong_files(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(TokenizerError, match=r"\.model file"):
        load_tokenizer(shared("data/tokenizers/fineweb_1024_bpe.vocab"))
    garbage = tmp_path / "garbage.model"
    garbage.write_text("not a model")
    with pytest.raises(TokenizerError, match="cannot load SentencePiece model"):
        load_tokenizer(garbage)


def test_table_bytes_equal_decoded_bytes_over_all_200_docs(sp1024):
    """The independent check of the byte rule on real FineWeb text, BOS-separated as in shards."""
    path = shared("data/fineweb/fineweb_challenge_docs_200.jsonl")
    docs = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(docs) == 200
    stream = np.concatenate([[sp1024.bos_id(), *ids] for ids in sp1024.encode(docs)])
    tables = build_byte_tables(sp1024, 1024)
    assert np.isin(stream, np.flatnonzero([sp1024.is_byte(i) for i in range(1024)])).any()  # byte fallback occurs
    counted = stream_bytes(stream, tables)
    assert counted == decoded_utf8_bytes(sp1024, stream)
    # The bytes of the NFKC-normalized text (whitespace runs collapse), just under the raw 1,489,515.
    assert counted == 1_489_418
