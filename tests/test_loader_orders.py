"""Data orders: shuffled windows, coprime stride and document packing cover what they promise,
are deterministic from the seed and restore exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from golfjax.data.loader import BOS_ID, LoaderError, TokenLoader, coprime_stride
from golfjax.data.shards import list_shards, write_shard

SEQ = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Four shards of uneven sizes (one too short for a window), tokens = global position (unique)."""
    directory = tmp_path_factory.mktemp("order_shards")
    sizes = [203, 5, 97, 150]
    tokens, start = [], 0
    for i, n in enumerate(sizes):
        t = (np.arange(start, start + n) % 60000 + 100).astype(np.uint16)
        start += n
        tokens.append(t)
        write_shard(directory / f"fineweb_train_{i:06d}.bin", t)
    return list_shards(directory, "fineweb_train_*.bin"), tokens


def windows_of(loader, steps):
    out = []
    for _ in range(steps):
        x, y = loader.next_batch()
        assert np.array_equal(x[..., 1:], y[..., :-1])  # targets are the inputs shifted by one
        out += [tuple(np.concatenate([r, yr[-1:]])) for r, yr in zip(x.reshape(-1, SEQ), y.reshape(-1, SEQ))]
    return out


def expected_windows(tokens, phases):
    """Every window of SEQ+1 tokens at phase + k*SEQ inside each shard."""
    return sorted(tuple(t[p + k * SEQ : p + k * SEQ + SEQ + 1]) for t, p in zip(tokens, phases)
                  for k in range(max(0, (len(t) - 1 - p) // SEQ)))


@pytest.mark.parametrize("order", ["shuffled", "stride"])
def test_window_orders_cover_every_window_once_per_epoch(shards, order):
    files, tokens = shards
    loader = TokenLoader(files, 2 * 2 * SEQ, SEQ, ranks=2, grad_accum_steps=1, order=order, seed=3)
    count = loader.windows.count
    phases = [int(p) for p in loader.windows.phases]
    assert count == sum(max(0, (len(t) - 1 - p) // SEQ) for t, p in zip(tokens, phases))
    if order == "stride":
        assert count == 25 + 0 + 12 + 18
    seen = windows_of(loader, math.ceil(count / 4) + 3)
    epoch0 = seen[:count]
    assert sorted(epoch0) == expected_windows(tokens, phases)  # each window exactly once
    assert len(set(epoch0)) == count
    assert epoch0 != sorted(epoch0)  # and not in stream order
    if order == "stride":
        assert phases == [0] * len(tokens)
    # the same seed gives the same order; another seed another one
    again = TokenLoader(files, 2 * 2 * SEQ, SEQ, ranks=2, grad_accum_steps=1, order=order, seed=3)
    assert windows_of(again, 4) == seen[:16]
    other = TokenLoader(files, 2 * 2 * SEQ, SEQ, ranks=2, grad_accum_steps=1, order=order, seed=4)
    assert windows_of(other, 4) != seen[:16]


def test_shuffled_phases_vary_by_epoch(shards):
    files, _ = shards
    loader = TokenLoader(files, 4 * SEQ, SEQ, ranks=1, grad_accum_steps=1, order="shuffled", seed=0)
    phases = set()
    for epoch in range(6):
        loader.windows._set_epoch(epoch)
        phases.add(tuple(int(p) for p in loader.windows.phases))
    assert len(phases) > 1
    assert all(0 <= p < SEQ for ps in phases for p in ps)


@pytest.mark.parametrize("order", ["shuffled", "stride", "packed", "sequential"])
def test_orders_restore_exactly_across_an_epoch_end(shards, order):
    files, _ = shards
    make = lambda: TokenLoader(files, 2 * 2 * SEQ, SEQ, ranks=2, grad_accum_steps=2, order=order, seed=5)
    a = make()
    for _ in range(11):  # past the first epoch (55 windows / 8 per step)
        a.next_batch()
    state = a.state()
    expect = [a.next_batch() for _ in range(5)]
    b = make()
    b.restore(state)
    for (x1, y1), (x2, y2) in zip(expect, [b.next_batch() for _ in range(5)]):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)


def test_multi_process_rows_are_the_ranks_share(shards):
    files, _ = shards
    full = TokenLoader(files, 4 * 2 * SEQ, SEQ, ranks=4, grad_accum_steps=1, order="shuffled", seed=1)
    mine = TokenLoader(files, 4 * 2 * SEQ, SEQ, ranks=4, grad_accum_steps=1, order="shuffled", seed=1,
                       local_ranks=[1, 3])
    for _ in range(3):
        (xf, _), (xm, _) = full.next_batch(), mine.next_batch()
        assert np.array_equal(xm[0], np.concatenate([xf[0][2:4], xf[0][6:8]]))
        assert mine.state() == full.state()


def test_restore_refuses_another_order(shards):
    files, _ = shards
    shuffled = TokenLoader(files, 4 * SEQ, SEQ, ranks=1, grad_accum_steps=1, order="shuffled")
    seq = TokenLoader(files, 4 * SEQ, SEQ, ranks=1, grad_accum_steps=1)
    with pytest.raises(LoaderError, match="order"):
        seq.restore(shuffled.state())
    with pytest.raises(LoaderError, match="order"):
        shuffled.restore({"shard": 0, "offset": 0})
    with pytest.raises(LoaderError, match="pos"):
        shuffled.restore({"order": "shuffled", "epoch": 0, "pos": 10**6})
    with pytest.raises(LoaderError, match="unknown data order"):
        TokenLoader(files, 4 * SEQ, SEQ, ranks=1, grad_accum_steps=1, order="random")


def test_coprime_stride_is_a_permutation():
    rng = np.random.default_rng(0)
    for n in [1, 2, 3, 4, 12, 97, 360, 1000]:
        s = coprime_stride(n, rng)
        assert math.gcd(s, n) == 1
        assert sorted((7 + k * s) % n for k in range(n)) == list(range(n))


@pytest.fixture(scope="module")
def doc_shards(tmp_path_factory):
    """Two shards of BOS-led documents of random lengths; the first shard starts mid-document."""
    rng = np.random.default_rng(2)
    directory = tmp_path_factory.mktemp("doc_shards")
    out = []
    for i in range(2):
        docs = [np.concatenate([[BOS_ID], rng.integers(10, 1000, size=rng.integers(3, 30))]) for _ in range(12)]
        t = np.concatenate(([rng.integers(10, 1000, size=5)] if i == 0 else []) + docs).astype(np.uint16)
        write_shard(directory / f"fineweb_train_{i:06d}.bin", t)
        out.append(t)
    return list_shards(directory, "fineweb_train_*.bin"), out


def test_packed_reads_whole_documents_from_the_first_bos_within_shards(doc_shards):
    files, tokens = doc_shards
    ranks, local = 2, 2 * SEQ
    chunk = ranks * (local + 1)
    loader = TokenLoader(files, ranks * local, SEQ, ranks=ranks, grad_accum_steps=1, order="packed")
    # expected: per shard, from its first BOS, consecutive chunks that fit; then the next shard
    expected = []
    for t in tokens:
        start = int(np.flatnonzero(t == BOS_ID)[0])
        expected += [t[o : o + chunk] for o in range(start, len(t) - chunk + 1, chunk)]
    n = len(expected)
    for i in range(n + 2):  # and around again
        x, y = loader.next_batch()
        want = expected[i % n].reshape(ranks, local + 1)
        assert np.array_equal(x[0], want[:, :-1].reshape(-1, SEQ))
        assert np.array_equal(y[0], want[:, 1:].reshape(-1, SEQ))
    assert expected[0][0] == BOS_ID  # the first shard's leading partial document is skipped
    with pytest.raises(LoaderError, match="packed"):
        TokenLoader(files, 2 * 64 * SEQ, SEQ, ranks=2, grad_accum_steps=1, order="packed")


def test_packed_finds_a_late_first_bos(tmp_path):
    t = np.full(150_000, 7, np.uint16)
    t[70_001] = BOS_ID  # past the first read block
    t[100_000] = BOS_ID
    write_shard(tmp_path / "fineweb_train_000000.bin", t)
    loader = TokenLoader(list_shards(tmp_path, "fineweb_train_*.bin"), SEQ, SEQ, ranks=1, grad_accum_steps=1,
                         order="packed")
    x, _ = loader.next_batch()
    assert loader.packed.starts == [70_001] and x[0, 0, 0] == BOS_ID
