"""CaseOps: bijective case transform, reserved-operator tokenizer, original-byte sidecar, BPB from it."""

import json

import numpy as np
import pytest

from conftest import FINEWEB_DOCS, require
from golfjax.data import caseops as co
from golfjax.data import prepare
from golfjax.data.shards import read_shard
from golfjax.data.tokenizer import load_tokenizer
from golfjax.eval import bpb


@pytest.fixture(scope="module")
def docs() -> list[str]:
    with open(require(FINEWEB_DOCS), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@pytest.fixture(scope="module")
def caseops_sp(docs, tmp_path_factory):
    """A small CaseOps tokenizer trained on the 200 challenge documents (a second or two)."""
    prefix = tmp_path_factory.mktemp("caseops_tok") / "caseops_512"
    return load_tokenizer(prepare.train_caseops_tokenizer(docs, 512, prefix))


@pytest.fixture(scope="module")
def encoded(docs, caseops_sp) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids, sidecar counts) of every document, computed once."""
    return [co.encode_document(caseops_sp, doc) for doc in docs]


def test_roundtrips_all_challenge_documents(docs):
    assert len(docs) == 200
    changed = 0
    for doc in docs:
        enc = co.encode(doc)
        assert co.decode(enc) == doc
        assert not any(c.isascii() and c.isupper() for c in enc)  # no ASCII capital survives
        changed += enc != doc
    assert changed > 150  # the transform really acted on the text


@pytest.mark.parametrize("text, encoded", [
    ("The NASA Launch", "\ue001the \ue002nasa \ue001launch"),
    ("iPhone McDonald", "i\ue003phone \ue001mc\ue003donald"),
    ("A I x", "\ue001a \ue001i x"),
    ("ABc aB", "\ue001a\ue003bc a\ue003b"),
    ("lit \ue001\ue004 op", "lit \ue004\ue001\ue004\ue004 op"),
    ("ÉCOLE café ÜBER", "É\ue002cole café Ü\ue002ber"),  # only ASCII letters are folded
    ("", ""),
])
def test_examples(text, encoded):
    assert co.encode(text) == encoded
    assert co.decode(encoded) == text


@pytest.mark.parametrize("bad", ["\ue001", "\ue003a", "\ue001A", "A", "\ue004a", "ab\ue001c",
                                 "\ue001n\ue003a\ue003s\ue003a"])
def test_decode_rejects_strings_no_text_encodes_to(bad):
    with pytest.raises(co.CaseOpsError):
        co.decode(bad)


def test_tokenizer_reserves_the_operators(caseops_sp):
    ids = [caseops_sp.piece_to_id(op) for op in co.OPERATORS]
    assert ids == [4, 5, 6, 7]  # right after pad/bos/eos/unk, as the records' model
    for op, i in zip(co.OPERATORS, ids):
        assert caseops_sp.encode("x" + op + "y", out_type=int).count(i) == 1
    co.check_tokenizer(caseops_sp)
    plain = load_tokenizer(require(FINEWEB_DOCS.parents[1] / "tokenizers" / "fineweb_1024_bpe.model"))
    with pytest.raises(co.CaseOpsError, match="operator"):
        co.check_tokenizer(plain)


def test_sidecar_total_is_the_original_utf8_length_of_every_document(docs, caseops_sp, encoded):
    naive_differs = 0
    for doc, (ids, counts) in zip(docs, encoded):
        assert len(ids) == len(counts) and counts.min() >= 0
        assert int(counts.sum()) == len(doc.encode("utf-8"))
        op_tokens = np.isin(ids, [caseops_sp.piece_to_id(op) for op in co.OPERATORS])
        assert np.all(counts[op_tokens] == 0)
        # counting the transformed text (operators as their 3 UTF-8 bytes) would be wrong here
        naive_differs += len(co.encode(doc).encode("utf-8")) != len(doc.encode("utf-8"))
    assert naive_differs > 150


def test_sidecar_matches_piece_surfaces_where_the_normaliser_changes_nothing(docs, caseops_sp, encoded):
    """Per token, the offset-based counts equal the records' piece-surface rule, an independent count."""
    checked = 0
    for doc, (ids, counts) in zip(docs, encoded):
        # SentencePiece spells a newline "▁" (one byte either way); NFKC ("…" -> "...") or
        # collapsed spaces make the pieces spell another text, where only offsets are right
        if caseops_sp.decode(ids.tolist()) != co.encode(doc).replace("\n", " "):
            continue
        assert co.piece_surface_bytes(caseops_sp, ids) == counts.tolist()
        checked += 1
    assert checked >= 60


def test_a_wrong_sidecar_count_is_refused(docs, caseops_sp, tmp_path, monkeypatch):
    def transformed_bytes(transformed, proto):  # the classic bug: bytes of the transformed text
        return np.array([len(p.surface.encode("utf-8")) for p in proto.pieces], dtype=np.int64)

    monkeypatch.setattr(co, "token_original_bytes", transformed_bytes)
    with pytest.raises(prepare.PrepareError, match="sidecar bytes .* differ from its UTF-8 length"):
        prepare.tokenize_caseops_to_shards(docs[:5], caseops_sp, tmp_path, num_val_docs=3, progress=False)


def test_prepare_writes_aligned_sidecar_shards_and_bpb_counts_original_bytes(docs, caseops_sp, tmp_path):
    val_docs = 12
    summary = prepare.tokenize_caseops_to_shards(docs[:40], caseops_sp, tmp_path, num_val_docs=val_docs,
                                                 shard_size=7000, progress=False)
    val_shards = sorted(tmp_path.glob(co.VAL_TOKEN_PATTERN))
    side_shards = sorted(tmp_path.glob(co.VAL_BYTES_PATTERN))
    assert len(val_shards) == len(side_shards) == summary["files_val"] > 1
    assert not set(val_shards) & set(side_shards)
    for tok, side in zip(val_shards, side_shards):
        assert co.sidecar_path_for(tok) == side and len(read_shard(tok)) == len(read_shard(side))
    tokens = np.concatenate([np.asarray(read_shard(p)) for p in val_shards])
    sidecar = co.load_val_byte_sidecar(tmp_path)
    expected = [len(d.encode("utf-8")) for d in docs[:val_docs]]
    assert co.sidecar_doc_totals(tokens, sidecar, caseops_sp.bos_id()) == expected
    assert np.all(sidecar[tokens == caseops_sp.bos_id()] == 0)
    # the whole flat stream's targets are tokens[1:], whose bytes are every document's bytes
    assert bpb.sidecar_stream_bytes(sidecar) == sum(expected) == summary["bytes_val"]
    positions = np.arange(1, len(tokens))
    assert bpb.sidecar_count_bytes(sidecar, positions) == sum(expected)
    # and decoding the tokens and undoing the transform gives the documents back
    doc_starts = list(np.flatnonzero(tokens == caseops_sp.bos_id())) + [len(tokens)]
    for i, (a, b) in enumerate(zip(doc_starts[:-1], doc_starts[1:])):
        text = caseops_sp.decode(tokens[a + 1 : b].tolist())
        if text == co.encode(docs[i]):
            assert co.decode(text) == docs[i]
    truncated = co.load_val_byte_sidecar(tmp_path, n_tokens=1000)
    np.testing.assert_array_equal(truncated, sidecar[:1000])
    # a stream read with the default pattern holds the sidecar shards too: say how to fix it
    with pytest.raises(co.CaseOpsError, match=r"set data.val_pattern='fineweb_val_\[0-9\]\*.bin'"):
        co.load_val_byte_sidecar(tmp_path, n_tokens=2 * len(sidecar))


def test_sidecar_bytes_in_bpb():
    sidecar = np.array([0, 3, 0, 1, 5, 0, 2], dtype=np.uint16)
    np.testing.assert_array_equal(bpb.sidecar_target_bytes(sidecar, np.array([[1, 2], [4, 6]])), [[3, 0], [5, 2]])
    assert bpb.sidecar_count_bytes(sidecar, np.arange(1, 7)) == 11 == bpb.sidecar_stream_bytes(sidecar)
    with pytest.raises(ValueError, match="outside"):
        bpb.sidecar_target_bytes(sidecar, np.array([7]))
    with pytest.raises(ValueError, match="outside"):
        bpb.sidecar_target_bytes(sidecar, np.array([-1]))
    with pytest.raises(ValueError, match="integers"):
        bpb.sidecar_target_bytes(sidecar, np.array([1.0]))
    # BPB with the sidecar: 2 nats over 11 bytes of 6 targets
    loss, val_bpb = bpb.loss_and_bpb(2.0, 6, bpb.sidecar_stream_bytes(sidecar))
    assert val_bpb == pytest.approx(2.0 / np.log(2) / 11)


def test_missing_or_misaligned_sidecar_is_refused(docs, caseops_sp, tmp_path):
    prepare.tokenize_caseops_to_shards(docs[:6], caseops_sp, tmp_path, num_val_docs=4, progress=False)
    side = tmp_path / "fineweb_val_bytes_000000.bin"
    from golfjax.data.shards import write_shard

    write_shard(side, np.asarray(read_shard(side))[:-1].copy())
    with pytest.raises(co.CaseOpsError, match="entries but"):
        co.load_val_byte_sidecar(tmp_path)
    side.unlink()
    with pytest.raises(co.CaseOpsError, match="missing CaseOps byte sidecar"):
        co.load_val_byte_sidecar(tmp_path)


def test_cli_builds_a_caseops_tokenizer_and_shards(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).parents[1]

    def run(*args):
        return subprocess.run([sys.executable, str(repo / "scripts" / "prepare_data.py"), *args],
                              capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(repo)))

    src = str(require(FINEWEB_DOCS))
    made = run("caseops-tokenizer", src, "--vocab-size", "400", "--max-docs", "60", "--out-prefix", str(tmp_path / "tok"))
    assert made.returncode == 0, made.stderr
    assert "U+E001=4" in made.stdout
    shards = run("caseops", src, "--tokenizer", str(tmp_path / "tok.model"), "--out", str(tmp_path / "d"),
                 "--num-val-docs", "5", "--quiet")
    assert shards.returncode == 0, shards.stderr
    assert (tmp_path / "d" / "fineweb_val_bytes_000000.bin").is_file()
    plain = str(require(FINEWEB_DOCS.parents[1] / "tokenizers" / "fineweb_1024_bpe.model"))
    refused = run("caseops", src, "--tokenizer", plain, "--out", str(tmp_path / "e"), "--num-val-docs", "5")
    assert refused.returncode == 1
    assert refused.stderr.strip().startswith("error: tokenizer has no single piece for CaseOps operator")


def test_evaluation_bytes_for_the_evaluator(docs, caseops_sp, tmp_path):
    from dataclasses import replace

    from golfjax.config import Config

    prepare.tokenize_caseops_to_shards(docs[:8], caseops_sp, tmp_path, num_val_docs=5, progress=False)
    c = Config()
    cfg = replace(c, data=replace(c.data, data_path=str(tmp_path), val_pattern=co.VAL_TOKEN_PATTERN))
    tokens = np.concatenate([np.asarray(read_shard(p)) for p in sorted(tmp_path.glob(co.VAL_TOKEN_PATTERN))])
    assert co.evaluation_bytes(cfg, tokens) is None  # CaseOps off: the byte tables count
    on = replace(cfg, caseops=replace(c.caseops, caseops_enabled=True))
    side = co.evaluation_bytes(on, tokens)
    assert len(side) == len(tokens) and bpb.sidecar_stream_bytes(side) == sum(len(d.encode()) for d in docs[:5])
    default_pattern = replace(on, data=replace(on.data, val_pattern="fineweb_val_*.bin"))
    with pytest.raises(co.CaseOpsError, match="also matches the CaseOps byte sidecar"):
        co.evaluation_bytes(default_pattern, tokens)
    with pytest.raises(co.CaseOpsError, match="entries, the validation stream"):
        co.evaluation_bytes(on, tokens[:-3])
