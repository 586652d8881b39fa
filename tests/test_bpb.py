"""BPB formula and byte counting: hand numbers, the golden, and the known ways to get bytes wrong."""

import json
import math

import numpy as np
import pytest

from golfjax.data.tokenizer import ByteTables, build_byte_tables, load_tokenizer
from golfjax.eval.bpb import count_bytes, decoded_utf8_bytes, loss_and_bpb, stream_bytes, target_bytes

from tests.conftest import shared


# ids: 0 BOS (boundary), 1 "▁ab", 2 "cd", 3 a byte-fallback piece
TOY = ByteTables(
    base_bytes=np.array([0, 2, 2, 1], dtype=np.int16),
    has_leading_space=np.array([False, True, False, False]),
    is_boundary=np.array([True, False, False, False]),
)


@pytest.fixture(scope="module")
def sp():
    return load_tokenizer(shared("data/tokenizers/fineweb_1024_bpe.model"), 1024)


@pytest.fixture(scope="module")
def docs_stream(sp):
    path = shared("data/fineweb/fineweb_challenge_docs_200.jsonl")
    docs = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    return np.concatenate([[sp.bos_id(), *ids] for ids in sp.encode(docs)])


def test_loss_and_bpb_hand_numbers():
    # 10 tokens at 2 bits each over 20 bytes: 1 bit per byte.
    loss, bpb = loss_and_bpb(10 * 2 * math.log(2), 10, 20)
    assert loss == pytest.approx(2 * math.log(2), rel=1e-15)
    assert bpb == pytest.approx(1.0, rel=1e-15)
    loss, bpb = loss_and_bpb(30.0, 12, 40)
    assert loss == 2.5 and bpb == pytest.approx(2.5 / math.log(2) * 12 / 40, rel=1e-15)


def test_loss_and_bpb_reproduces_golden_exactly():
    for name in ("golden/golden.json", "golden/trained/golden.json"):
        golden = json.loads(shared(name).read_text())
        n_tokens, n_bytes = golden["data"]["val_tokens_evaluated"], golden["data"]["val_bytes_evaluated"]
        for loss_key, bpb_key in (("init_val_loss", "init_val_bpb"), ("val_loss", "val_bpb")):
            loss, bpb = loss_and_bpb(golden[loss_key] * n_tokens, n_tokens, n_bytes)
            assert loss == golden[loss_key]
            assert bpb == golden[bpb_key], (name, bpb_key)


@pytest.mark.parametrize("tokens, n_bytes", [(0, 10), (10, 0)])
def test_loss_and_bpb_refuses_empty(tokens, n_bytes):
    with pytest.raises(ValueError, match="cannot compute"):
        loss_and_bpb(1.0, tokens, n_bytes)


def test_target_bytes_by_hand():
    stream = np.array([0, 1, 2, 1, 0, 1, 3])
    # "ab" after BOS: no space; "cd"; " ab"; BOS: 0; "ab" after BOS; one raw byte.
    per_target = target_bytes(stream[:-1], stream[1:], TOY)
    assert per_target.dtype == np.int64 and per_target.tolist() == [2, 2, 3, 0, 2, 1]
    assert stream_bytes(stream, TOY) == count_bytes(stream[:-1], stream[1:], TOY) == 10
    batch = np.stack([stream, stream[::-1]])
    assert target_bytes(batch[:, :-1], batch[:, 1:], TOY).shape == (2, 6)


def test_target_bytes_refuses_bad_ids():
    with pytest.raises(ValueError, match="outside"):
        target_bytes(np.array([0, -1]), np.array([1, 1]), TOY)
    with pytest.raises(ValueError, match="outside"):
        target_bytes(np.array([0, 1]), np.array([1, 4]), TOY)
    with pytest.raises(ValueError, match="shape"):
        target_bytes(np.array([0, 1]), np.array([1]), TOY)


def test_space_after_boundary_and_mid_stream(sp):
    tables = build_byte_tables(sp, 1024)
    wor, ld, o = sp.piece_to_id("\u2581wor"), sp.piece_to_id("ld"), sp.piece_to_id("o")
    after_bos = np.array([sp.bos_id(), wor, ld])  # decodes to "world": the space is not counted
    mid_stream = np.array([o, wor, ld])  # the targets decode to " world"
    assert stream_bytes(after_bos, tables) == decoded_utf8_bytes(sp, after_bos) == 5
    no_boundary_rule = tables._replace(is_boundary=np.zeros_like(tables.is_boundary))
    assert stream_bytes(after_bos, no_boundary_rule) == 6  # the bug the decoded check catches here
    assert stream_bytes(mid_stream, tables) == decoded_utf8_bytes(sp, mid_stream) == 6
    text = [sp.bos_id(), *sp.encode("hello world")]
    assert stream_bytes(np.array(text), tables) == decoded_utf8_bytes(sp, text) == len(b"hello world")


def test_ids_past_the_tokenizer_are_boundaries(sp):
    tables = build_byte_tables(sp, 1100)
    stream = np.array([sp.bos_id(), *sp.encode("a cat"), 1050, *sp.encode("dog run"), sp.bos_id()])
    assert stream_bytes(stream, tables) == decoded_utf8_bytes(sp, stream) == len(b"a catdog run")


def test_decoded_check_catches_known_byte_bugs(sp, docs_stream):
    """Each table pitfall of record-stack 3.3 changes the count, so the decoded check would flag it.
    (The boundary rule never fires on these docs: the normalizer strips a document's leading space.)"""
    right = build_byte_tables(sp, 1024)
    decoded = decoded_utf8_bytes(sp, docs_stream)
    assert stream_bytes(docs_stream, right) == decoded
    is_byte = np.array([sp.is_byte(i) for i in range(1024)])
    wrong = {
        "space counted twice": right._replace(
            base_bytes=(right.base_bytes + right.has_leading_space).astype(np.int16)
        ),
        "byte fallback as U+FFFD (3 bytes)": right._replace(
            base_bytes=np.where(is_byte, 3, right.base_bytes).astype(np.int16)
        ),
    }
    for bug, tables in wrong.items():
        assert stream_bytes(docs_stream, tables) > decoded, bug
