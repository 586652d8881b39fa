"""scripts/train.py end to end in two processes (2 CPU devices each, gloo) vs one process with 4.

The whole loop: process-local batches, the agreed clock, collective evaluation,
and only process 0 logging and writing the run's artifact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, TOKENIZER_1024, require
from tests.test_multihost import free_port

TINY = ["model.vocab_size=1024", "model.num_layers=2", "model.model_dim=64", "model.num_heads=4",
        "model.num_kv_heads=2", "model.compute_dtype=float32", "train.train_seq_len=64",
        "train.train_batch_tokens=512", "train.iterations=4", "train.warmdown_iters=2",
        "train.max_wallclock_seconds=0", "train.val_loss_every=2", "optim.muon_ns_dtype=float32",
        "eval.val_batch_size=65536"]


def command(data, run_dir, extra=()):
    sets = [a for item in TINY + [f"data.data_path={data}", f"data.tokenizer_path={TOKENIZER_1024}"]
            for a in ("--set", item)]
    return [sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(REPO / "configs" / "baseline.py"),
            *sets, "--run-dir", str(run_dir), *extra]


def events(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_process_training_run_matches_one_process(golden_shards, tmp_path):
    require(TOKENIZER_1024)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "XLA_FLAGS"}
    port = free_port()
    procs = []
    try:
        # The one-process reference runs beside the two processes (independent runs; mostly
        # single-threaded import and compile, so the three share the cores).
        one = subprocess.Popen(command(golden_shards, tmp_path / "one", ["--cpu-devices", "4"]), env=env,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(one)
        for i in range(2):
            penv = dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                        JAX_PROCESS_ID=str(i), XLA_FLAGS="--xla_force_host_platform_device_count=2")
            procs.append(subprocess.Popen(command(golden_shards, tmp_path / "two"), env=penv, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert one.returncode == 0, outs[0][1][-3000:]
    procs, outs = procs[1:], outs[1:]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "final_int8_zlib_roundtrip_exact" in outs[0][0]
    assert "final_int8_zlib_roundtrip_exact" not in outs[1][0]  # only process 0 logs

    a, b = events(tmp_path / "one"), events(tmp_path / "two")
    assert [e["event"] for e in a] == [e["event"] for e in b]
    for ea, eb in zip(a, b):
        for key in ("train_loss", "lr_mul", "val_loss", "val_bpb", "roundtrip_val_bpb"):
            if key in ea:
                assert eb[key] == pytest.approx(ea[key], abs=2e-6), (ea, eb)
        if "bytes" in ea:
            assert ea["bytes"] == eb["bytes"] and ea["tokens"] == eb["tokens"]
    assert (tmp_path / "two" / "final_model.golf").is_file()
    assert np.isfinite(b[-1]["roundtrip_val_bpb"])
