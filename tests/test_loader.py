"""The loader reproduces the reference's token order exactly, for any ranks and accumulation."""

import json

import numpy as np
import pytest

from golfjax.data.loader import (
    LoaderError,
    TokenLoader,
    TokenStream,
    default_grad_accum_steps,
    load_validation_tokens,
)
from golfjax.data.shards import list_shards, write_shard

from tests.conftest import shared




# ------------------------------------------------------------ brute-force reference


def reference_batches(shards: list[np.ndarray], global_tokens, seq_len, ranks, accum, steps):
    """The reference's order, written out directly: the concatenated shards repeat forever;
    every micro-batch, each rank r reads the r-th (local+1)-token span of the next chunk."""
    stream = np.concatenate(shards)
    local = global_tokens // (ranks * accum)
    pos = 0
    out = []
    for _ in range(steps):
        xs, ys = [], []
        for _ in range(accum):
            chunk = stream[np.arange(pos, pos + ranks * (local + 1)) % len(stream)]
            pos += ranks * (local + 1)
            per_rank = [chunk[r * (local + 1) : (r + 1) * (local + 1)] for r in range(ranks)]
            xs.append(np.concatenate([s[:-1].reshape(-1, seq_len) for s in per_rank]))
            ys.append(np.concatenate([s[1:].reshape(-1, seq_len) for s in per_rank]))
        out.append((np.stack(xs), np.stack(ys)))
    return out


@pytest.fixture(scope="module")
def random_shards(tmp_path_factory):
    """Five shards of uneven sizes (one empty), written in shuffled order."""
    rng = np.random.default_rng(0)
    directory = tmp_path_factory.mktemp("random_shards")
    sizes = [301, 0, 157, 89, 450]
    tokens = [rng.integers(0, 65536, size=n).astype(np.uint16) for n in sizes]
    for i in [3, 0, 4, 1, 2]:
        write_shard(directory / f"fineweb_train_{i:06d}.bin", tokens[i])
    return list_shards(directory, "fineweb_train_*.bin"), tokens


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("accum", [None, 1, 3])
def test_matches_reference_order(random_shards, ranks, accum):
    files, tokens = random_shards
    seq_len = 8
    accum_steps = accum or default_grad_accum_steps(ranks)
    global_tokens = ranks * accum_steps * seq_len * 2 + (ranks * accum_steps - 1)  # floor division drops the rest
    loader = TokenLoader(files, global_tokens, seq_len, ranks, accum)
    steps = 12  # enough to wrap around the 997-token stream several times
    for step, (ex, ey) in enumerate(reference_batches(tokens, global_tokens, seq_len, ranks, accum_steps, steps)):
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == np.int32
        assert x.shape == (accum_steps, ranks * 2, seq_len)
        np.testing.assert_array_equal(x, ex, err_msg=f"x of step {step}")
        np.testing.assert_array_equal(y, ey, err_msg=f"y of step {step}")


def test_state_restore_continues_identically(random_shards):
    files, _ = random_shards
    loader = TokenLoader(files, 2 * 8 * 16, 16, 2, 8)
    for _ in range(3):
        loader.next_batch()
    state = loader.state()
    assert json.loads(json.dumps(state)) == state
    expected = [loader.next_batch() for _ in range(4)]
    resumed = TokenLoader(files, 2 * 8 * 16, 16, 2, 8)
    resumed.restore(state)
    for ex, got in zip(expected, (resumed.next_batch() for _ in range(4))):
        np.testing.assert_array_equal(ex[0], got[0])
        np.testing.assert_array_equal(ex[1], got[1])


def test_stream_state_at_a_shard_end(random_shards):
    files, tokens = random_shards
    stream = TokenStream(files)
    stream.take(len(tokens[0]))
    assert stream.state() == {"shard": 0, "offset": 301}
    rest = stream.take(50)
    again = TokenStream(files)
    again.restore({"shard": 0, "offset": 301})
    np.testing.assert_array_equal(again.take(50), rest)
    np.testing.assert_array_equal(rest, tokens[2][:50])  # the empty shard 1 is skipped


@pytest.mark.parametrize(
    "state", [{"shard": 5, "offset": 0}, {"shard": -1, "offset": 0}, {"shard": 0, "offset": 302}, {"shard": 0}, None]
)
def test_restore_refuses_bad_state(random_shards, state):
    stream = TokenStream(random_shards[0])
    with pytest.raises(LoaderError, match="bad stream state"):
        stream.restore(state)


def test_stream_sorts_files_and_refuses_nothing(random_shards, tmp_path):
    files, tokens = random_shards
    np.testing.assert_array_equal(TokenStream(files[::-1]).take(301), tokens[0])
    with pytest.raises(LoaderError):
        TokenStream([])
    write_shard(tmp_path / "empty.bin", np.zeros(0, dtype=np.uint16))
    with pytest.raises(LoaderError, match="empty"):
        TokenStream([tmp_path / "empty.bin"])


def test_geometry_errors(random_shards):
    files, _ = random_shards
    assert [default_grad_accum_steps(r) for r in (1, 2, 4, 8)] == [8, 4, 2, 1]
    for ranks in (0, 3, 16):
        with pytest.raises(LoaderError, match="divide 8"):
            default_grad_accum_steps(ranks)
    with pytest.raises(LoaderError, match="TRAIN_BATCH_TOKENS=500 .* multiple of TRAIN_SEQ_LEN=64"):
        TokenLoader(files, 500, 64, 1, 8)
    with pytest.raises(LoaderError, match="positive multiple"):
        TokenLoader(files, 7, 1, 1, 8)


def test_validation_tokens_truncated_to_whole_sequences(tmp_path):
    write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(100, 130))
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(0, 20))
    files = list_shards(tmp_path, "fineweb_val_*.bin")
    tokens = load_validation_tokens(files[::-1], 8)
    assert tokens.tolist() == (list(range(20)) + list(range(100, 130)))[: 6 * 8 + 1]
    with pytest.raises(LoaderError, match="shorter than one sequence of TRAIN_SEQ_LEN=64"):
        load_validation_tokens(files, 64)


def test_golden_batches(golden_shards):
    train = list_shards(golden_shards, "fineweb_train_*.bin")
    for name in ("golden/batches.npz", "golden/trained/batches.npz"):
        golden = np.load(shared(name))
        loader = TokenLoader(train, 512, 64, 1, 8)
        for step in range(golden["x"].shape[0]):
            x, y = loader.next_batch()
            np.testing.assert_array_equal(x, golden["x"][step], err_msg=f"{name} step {step}")
            np.testing.assert_array_equal(y, golden["y"][step], err_msg=f"{name} step {step}")


def test_golden_validation_length(golden_shards):
    evaluated = json.loads(shared("golden/golden.json").read_text())["data"]["val_tokens_evaluated"]
    val = load_validation_tokens(list_shards(golden_shards, "fineweb_val_*.bin"), 64)
    assert len(val) == evaluated + 1 == 74945
