"""golfjax.checkpoint: the training state round trip, atomicity, faults, resume rules, model sources.

No training here (tests/test_resume.py runs the real thing): states are built
from the tiny config's shapes and filled with random values.
"""

from __future__ import annotations

import errno
import json
import runpy
import shutil
import signal
import sys
from dataclasses import replace

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from golfjax import checkpoint
from golfjax.checkpoint import CheckpointError, TrainCheckpoints
from golfjax.config import Config, ConfigError
from golfjax.train.loop import RunLog, StopSignals
from tests.conftest import REPO


def tiny_config(**train) -> Config:
    c = Config()
    return replace(c, model=replace(c.model, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1),
                   train=replace(c.train, **train))


def random_state(cfg: Config, seed: int = 0):
    """A TrainState of `cfg`'s shapes with random values (counts too), as host arrays."""
    rng = np.random.default_rng(seed)
    abstract = checkpoint.abstract_train_state(cfg)
    return jax.tree.map(lambda s: (rng.integers(0, 100, s.shape) if s.dtype == np.int32 else
                                   rng.standard_normal(s.shape)).astype(s.dtype), abstract)


def meta(step: int) -> dict:
    return {"step": step, "train_ms": 1234.5678901234, "stop_after": None, "loader": {"shard": 0, "offset": 77 * step}}


def assert_same_tree(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


@pytest.fixture(scope="module")
def cfg() -> Config:
    return tiny_config()


def test_state_round_trip_is_bitwise_with_zero_size_leaves_and_keeps_the_last_k(cfg, tmp_path):
    states = {step: random_state(cfg, step) for step in (2, 4, 6)}
    assert any(np.size(leaf) == 0 for leaf in jax.tree.leaves(states[2]))  # skip_weights of one layer
    saver = TrainCheckpoints(tmp_path / "checkpoints", keep=2)
    for step, state in states.items():
        assert saver.save(state, meta(step), cfg) == tmp_path / "checkpoints" / str(step)
    saver.close()

    reader = TrainCheckpoints(tmp_path / "checkpoints", keep=2)
    assert reader.steps() == [4, 6]
    got_meta, got_cfg = reader.read_meta(6)
    assert got_cfg == cfg
    assert got_meta == {"format_version": checkpoint.FORMAT_VERSION, **meta(6)}  # train_ms exact through JSON
    assert_same_tree(reader.restore_state(6, checkpoint.abstract_train_state(cfg)), states[6])
    assert_same_tree(reader.restore_state(4, checkpoint.abstract_train_state(cfg)), states[4])


def test_a_half_written_checkpoint_is_never_chosen_and_is_cleaned_up(cfg, tmp_path):
    saver = TrainCheckpoints(tmp_path / "checkpoints")
    saver.save(random_state(cfg, 2), meta(2), cfg)
    saver.close()
    # What a process killed during the save of step 5 leaves: orbax's tmp directory, never renamed.
    partial = tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "checkpoints" / "2", partial)
    (partial / "commit_success.txt").unlink()

    cfg_loaded, params = checkpoint.load_model(tmp_path)  # a run directory: its latest complete checkpoint
    assert cfg_loaded == cfg
    assert_same_tree(params, random_state(cfg, 2).params)
    with pytest.raises(CheckpointError, match="an incomplete checkpoint"):
        checkpoint.load_model(partial)
    assert partial.is_dir()  # reading changes nothing

    assert checkpoint.latest_for_resume(tmp_path)[1] == 2
    writer = TrainCheckpoints(tmp_path / "checkpoints")
    writer.save(random_state(cfg, 5), meta(5), cfg)  # opening for writing removes the leftover
    writer.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "5"]


def test_disk_full_when_a_save_starts_keeps_the_previous_checkpoint(cfg, tmp_path, monkeypatch):
    saver = TrainCheckpoints(tmp_path / "checkpoints")
    saver.save(random_state(cfg, 2), meta(2), cfg)
    saver.wait()

    def disk_full(self, step, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoints" / f"{step}.orbax-checkpoint-tmp"))

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
    with pytest.raises(CheckpointError) as err:
        saver.save(random_state(cfg, 4), meta(4), cfg)
    ckpts = tmp_path / "checkpoints"
    assert str(err.value) == (
        f"could not write checkpoint {ckpts / '4'}: [Errno 28] No space left on device: "
        f"'{ckpts / '4.orbax-checkpoint-tmp'}'; the previous checkpoint is intact: {ckpts / '2'} (step 2); "
        "free disk space (or fix the directory's permissions), then continue with --resume")
    saver.close()
    assert_same_tree(checkpoint.load_model(ckpts / "2")[1], random_state(cfg, 2).params)


def test_disk_full_during_the_background_write_is_reported_by_wait(cfg, tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import async_path

    saver = TrainCheckpoints(tmp_path / "checkpoints")
    saver.save(random_state(cfg, 2), meta(2), cfg)
    saver.wait()

    async def disk_full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(async_path, "write_text", disk_full)  # the commit marker cannot be written
    saver.save(random_state(cfg, 4), meta(4), cfg)  # returns at once; the write fails in the background
    with pytest.raises(CheckpointError) as err:
        saver.wait()
    message = str(err.value)
    assert message.startswith(f"could not write checkpoint {tmp_path / 'checkpoints' / '4'}: ")
    assert "No space left on device" in message
    assert f"the previous checkpoint is intact: {tmp_path / 'checkpoints' / '2'} (step 2)" in message
    monkeypatch.undo()
    saver.close()
    assert checkpoint.latest_for_resume(tmp_path)[1] == 2


def test_a_state_with_nan_is_not_saved(cfg, tmp_path):
    state = random_state(cfg)
    state.params["tok_emb"]["embedding"][3, 4] = np.nan
    saver = TrainCheckpoints(tmp_path / "checkpoints")
    with pytest.raises(checkpoint.NonFiniteState, match="after step 7 has NaN/Inf values in params/tok_emb/embedding"):
        saver.save(state, meta(7), cfg)
    saver.close()
    assert saver.steps() == []


def test_resume_config_takes_allowed_changes_and_refuses_the_rest(cfg):
    saved = replace(cfg, data=replace(cfg.data, data_path="/data/smoke", tokenizer_path="/data/smoke/t.model"))
    asked = replace(saved, train=replace(saved.train, iterations=50, checkpoint_every=7, resume=True),
                    data=replace(saved.data, data_path="", tokenizer_path=""))  # "" = the smoke default
    got = checkpoint.resume_config(asked, saved)
    assert got.train.iterations == 50 and got.train.checkpoint_every == 7 and got.train.resume
    assert got.data == saved.data and got.model == saved.model

    bad = replace(asked, model=replace(asked.model, num_layers=2), optim=replace(asked.optim, matrix_lr=0.1))
    with pytest.raises(ConfigError) as err:
        checkpoint.resume_config(bad, saved)
    assert str(err.value).startswith(
        "cannot resume: the requested config differs from the checkpoint's in model.num_layers (checkpoint 1, "
        "requested 2); optim.matrix_lr (checkpoint 0.04, requested 0.1); a resumed run keeps")


def test_load_model_reads_every_kind_of_checkpoint_directory(cfg, tmp_path):
    state = random_state(cfg, 3)
    saver = TrainCheckpoints(tmp_path / "run" / "checkpoints")
    saver.save(state, meta(3), cfg)
    saver.close()
    checkpoint.save_params(tmp_path / "run" / "checkpoint", state.params, cfg)
    for source in ("run", "run/checkpoints", "run/checkpoints/3", "run/checkpoint"):
        got_cfg, params = checkpoint.load_model(tmp_path / source)
        assert got_cfg == cfg, source
        assert_same_tree(params, state.params)
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointError, match="not a golfjax checkpoint"):
        checkpoint.load_model(tmp_path / "other")
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        checkpoint.load_model(tmp_path / "missing")


def test_export_script_reports_a_full_disk_in_one_line(cfg, tmp_path, monkeypatch, capsys):
    import golfjax.export.artifact as artifact

    checkpoint.save_params(tmp_path / "ckpt", random_state(cfg).params, cfg)
    out = tmp_path / "model.golf"

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(artifact, "_atomic_write", disk_full)
    monkeypatch.setattr(sys, "argv", ["export.py", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "scripts" / "export.py"), run_name="__main__")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: could not write the artifact {out}: [Errno 28] No space left on device: '{out}'"]
    assert not out.exists()


def test_one_signal_asks_for_a_stop_and_a_second_aborts():
    # Python's own Ctrl-C handler, even where the test runner inherited SIGINT ignored
    # (a background job of a non-interactive shell).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopSignals() as signals:
            signal.raise_signal(signal.SIGTERM)
            assert signals.received == signal.SIGTERM
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)  # the second: handlers restored, Ctrl-C's default action
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_rewinding_metrics_moves_the_records_after_a_checkpoint_aside(tmp_path):
    records = [{"event": "train", "step": s} for s in range(1, 6)]
    lines = [json.dumps(r) + "\n" for r in records]
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    keep = sum(len(line) for line in lines[:3])
    assert RunLog.rewind_metrics(tmp_path, keep) == 2
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:3])
    assert (tmp_path / "metrics.discarded.jsonl").read_text() == "".join(lines[3:])
    assert RunLog.rewind_metrics(tmp_path, keep) == 0
