"""Exact resume through the real command line: killed runs continue as if they had never stopped.

Every run is `python scripts/train.py` in a subprocess (one CPU device, a
1-layer 32-wide model, 10 steps by iterations, so the LR schedule does not
depend on the wall clock). The processes share a persistent XLA compilation
cache, so only the first one compiles. `GOLFJAX_TEST_KILL` (golfjax.checkpoint)
makes a run SIGKILL itself at a chosen point, deterministically; faults that
need a patched function run the script under `runpy` after patching.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from golfjax.config import SECTIONS, Config, env_name
from tests.conftest import REPO, TOKENIZER_1024, require

ITERATIONS = 10
TINY_ENV = {
    "NUM_LAYERS": "1", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "COMPUTE_DTYPE": "float32",
    "TRAIN_SEQ_LEN": "32", "TRAIN_BATCH_TOKENS": "256", "VAL_BATCH_SIZE": "1024",
    "ITERATIONS": str(ITERATIONS), "WARMDOWN_ITERS": "4", "MAX_WALLCLOCK_SECONDS": "0",
    "VAL_LOSS_EVERY": "4", "TRAIN_LOG_EVERY": "1",
}
CONFIG_ENV_NAMES = {env_name(f.name) for s in SECTIONS for f in fields(getattr(Config(), s))}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Random-token shards (20k train, 2k val): enough for the tiny runs, quick to read."""
    from golfjax.data.shards import write_shard

    d = tmp_path_factory.getbasetemp() / "resume_shards"
    if not (d / "fineweb_val_000000.bin").is_file():
        d.mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        write_shard(d / "fineweb_train_000000.bin", rng.integers(0, 1024, 20_000))
        write_shard(d / "fineweb_val_000000.bin", rng.integers(0, 1024, 2_000))
    return d


@pytest.fixture(scope="session")
def train_env(tiny_data, tmp_path_factory) -> dict[str, str]:
    """The environment of every tiny run: one device, the tiny config, a shared compilation cache."""
    env = {k: v for k, v in os.environ.items()
           if k not in CONFIG_ENV_NAMES and k not in ("GOLFJAX_DEBUG", "XLA_FLAGS", "GOLFJAX_TEST_KILL")}
    env.update(TINY_ENV, JAX_PLATFORMS="cpu", DATA_PATH=str(tiny_data), TOKENIZER_PATH=str(require(TOKENIZER_1024)),
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return env


def train(env: dict, *args: str, kill: str | None = None, patch: str | None = None, **extra_env: str):
    """Run scripts/train.py (under `patch`, Python run before it in the same process, if given)."""
    env = {**env, **extra_env}
    if kill:
        env["GOLFJAX_TEST_KILL"] = kill
    script = str(REPO / "scripts" / "train.py")
    if patch:
        code = f"{patch}\nimport runpy, sys\nsys.argv = {[script, *args]!r}\nrunpy.run_path({script!r}, run_name='__main__')"
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, script, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if kind is None or r["event"] == kind]


def trajectory(run_dir: Path) -> tuple[list, list]:
    """(step, train_loss, lr_mul) of every step and (step, val_loss) of every validation."""
    train_ = [(e["step"], e["train_loss"], e["lr_mul"]) for e in events(run_dir, "train")]
    val = [(e["step"], e["val_loss"], e["val_bpb"]) for e in events(run_dir, "val")]
    return train_, val


def final_params(run_dir: Path) -> dict:
    from golfjax.checkpoint import load_model

    return load_model(run_dir / "checkpoint")[1]


def assert_same_params(a: dict, b: dict) -> None:
    import jax

    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b):
        assert x.dtype == y.dtype and np.array_equal(x, y)  # bit for bit


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def uninterrupted(train_env, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    ok(train(train_env, "--config", "configs/baseline.py", "--run-dir", str(run_dir)))
    train_, val = trajectory(run_dir)
    assert [s for s, *_ in train_] == list(range(1, ITERATIONS + 1)) and [s for s, *_ in val] == [0, 4, 8, 10]
    assert len({loss for _, loss, _ in train_}) > 5 and {lr for *_, lr in train_} != {1.0}
    return run_dir


def test_sigkill_after_a_checkpoint_then_resume_is_bitwise_identical(train_env, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--config", "configs/baseline.py", "--run-dir", str(run_dir), "--checkpoint-every", "3"]
    killed = train(train_env, *args, kill="after-step:5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [e["step"] for e in events(run_dir, "train")][-1] == 5  # steps 4 and 5 ran after checkpoint 3
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["3"]
    assert not (run_dir / "final_model.golf").exists()

    out = ok(train(train_env, *args, "--resume"))
    assert f"resumed_from:{run_dir / 'checkpoints' / '3'} step:3" in out
    assert trajectory(run_dir) == trajectory(uninterrupted)
    assert_same_params(final_params(run_dir), final_params(uninterrupted))
    [final], [reference] = events(run_dir, "final"), events(uninterrupted, "final")
    assert final["roundtrip_val_bpb"] == reference["roundtrip_val_bpb"]
    # the records of steps 4-5 written before the kill were moved aside, not lost
    moved = [json.loads(line) for line in (run_dir / "metrics.discarded.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in moved] == [("train", 4), ("val", 4), ("train", 5)]
    assert [e["step"] for e in events(run_dir, "resume")] == [3]


def test_sigkill_during_a_save_resumes_from_the_previous_complete_checkpoint(train_env, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--config", "configs/baseline.py", "--run-dir", str(run_dir), "--checkpoint-every", "3"]
    killed = train(train_env, *args, kill="during-save:6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["3", "6.orbax-checkpoint-tmp"], names  # step 6 was being written when the process died

    out = ok(train(train_env, *args, "--resume"))
    assert f"resumed_from:{run_dir / 'checkpoints' / '3'} step:3" in out
    assert trajectory(run_dir) == trajectory(uninterrupted)
    assert_same_params(final_params(run_dir), final_params(uninterrupted))
    # the half-written directory is gone; the last 3 complete checkpoints (incl. the final step) remain
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [6, 9, 10]


def test_sigterm_saves_and_exits_143_then_resume_without_config(train_env, tmp_path):
    run_dir = tmp_path / "run"
    env = {**train_env, "ITERATIONS": "100000"}
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), "--config", "configs/baseline.py",
                             "--run-dir", str(run_dir)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ((run_dir / "metrics.jsonl").is_file() and '"step": 2,' in (run_dir / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    step = events(run_dir, "train")[-1]["step"]
    assert stderr.splitlines()[0] == ("received SIGTERM: saving a checkpoint after this step, then stopping "
                                      "(send it again to abort without saving)")
    assert stderr.splitlines()[-1] == (
        f"stopped: stopped by SIGTERM after step {step}/100000; checkpoint {run_dir / 'checkpoints' / str(step)}; "
        f"continue with: python scripts/train.py --run-dir {run_dir} --resume")
    assert "Traceback" not in stderr
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [str(step)]
    assert not (run_dir / "final_model.golf").exists() and not (run_dir / "checkpoint").exists()

    # No --config: the checkpoint's config, with a new length (an allowed change).
    out = ok(train(train_env, "--run-dir", str(run_dir), "--resume", "--set", f"train.iterations={step + 2}"))
    assert f"resumed_from:{run_dir / 'checkpoints' / str(step)} step:{step}" in out
    assert [e["step"] for e in events(run_dir, "train")] == list(range(1, step + 3))
    assert (run_dir / "final_model.golf").is_file()


NAN_AFTER_STEP_4 = """
import math, golfjax.train.loop as loop
real = loop.lr_multiplier
loop.lr_multiplier = lambda step, *a: math.nan if step >= 4 else real(step, *a)
"""


def test_nan_loss_stops_names_the_step_and_the_last_good_checkpoint(train_env, tmp_path):
    run_dir = tmp_path / "run"
    proc = train(train_env, "--config", "configs/baseline.py", "--run-dir", str(run_dir), "--checkpoint-every", "2",
                 patch=NAN_AFTER_STEP_4)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    # step 5 ran with a NaN LR multiplier (broken weights, finite loss); step 6's loss is NaN
    assert proc.stderr.splitlines()[0] == (
        f"error: step 6: train_loss is nan; stopped without writing an artifact (the weights are broken); "
        f"last good checkpoint: {run_dir / 'checkpoints' / '4'} (step 4); lower the learning rates "
        "(e.g. --set optim.matrix_lr=...) and start a new run")
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "4"]
    assert not (run_dir / "final_model.golf").exists() and not (run_dir / "checkpoint").exists()


DISK_FULL_ON_EXPORT = """
import errno, golfjax.export.artifact as artifact
def full(path, blob):
    raise OSError(errno.ENOSPC, "No space left on device", str(path) + ".tmp")
artifact._atomic_write = full
"""


def test_disk_full_during_export_keeps_the_params_and_says_how_to_export(train_env, tmp_path):
    run_dir = tmp_path / "run"
    proc = train(train_env, "--config", "configs/baseline.py", "--run-dir", str(run_dir), "--checkpoint-every", "5",
                 patch=DISK_FULL_ON_EXPORT)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    artifact, params = run_dir / "final_model.golf", run_dir / "checkpoint"
    assert proc.stderr.splitlines()[0] == (
        f"error: could not write the artifact {artifact}: [Errno 28] No space left on device: '{artifact}.tmp'; "
        f"the trained params are safe in {params.resolve()}: free disk space, then export them with: "
        f"python scripts/export.py --checkpoint {params.resolve()} --out {artifact}")
    assert not artifact.exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["10", "5"]
    assert [e["step"] for e in events(run_dir, "train")][-1] == ITERATIONS
    assert not events(run_dir, "final")
