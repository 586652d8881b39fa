"""The training loop's clock: a wall-clock cap stops training, and the warmdown follows consumed time."""

from __future__ import annotations

import io
import json
from dataclasses import replace

from golfjax.config import Config
from golfjax.train.loop import run
from tests.conftest import TOKENIZER_1024


def tiny_config(data_dir, out_dir, **train) -> Config:
    c = Config()
    return replace(
        c,
        model=replace(c.model, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, compute_dtype="float32"),
        train=replace(c.train, train_batch_tokens=256, train_seq_len=32, val_loss_every=0, train_log_every=1,
                      out_dir=str(out_dir), run_id="loop", **train),
        eval=replace(c.eval, val_batch_size=8192),
        data=replace(c.data, data_path=str(data_dir), tokenizer_path=str(TOKENIZER_1024)),
    )


def test_wallclock_cap_stops_training_and_warmdown_follows_time(golden_shards, tmp_path):
    cfg = tiny_config(golden_shards, tmp_path, iterations=100_000, warmdown_iters=100_000, max_wallclock_seconds=3.0)
    console = io.StringIO()
    result = run(cfg, console=console)
    log = console.getvalue()
    assert "stopping_early: wallclock_cap" in log
    assert 0 < result.steps < 100_000
    assert 3000 <= result.train_time_ms < 3000 + 10_000
    events = [json.loads(line) for line in (tmp_path / "loop" / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    lr = [e["lr_mul"] for e in train]
    # The reference's rule: lr_mul = remaining / (warmdown_iters * mean step time), computed
    # before each step from the consumed training time (logged after the previous step).
    assert lr[0] == 1.0 and lr[-1] < 0.2
    for prev, event in zip(train[1:], train[2:]):
        elapsed, steps_done = prev["train_time_ms"], prev["step"]
        expected = max(3000.0 - elapsed, 0.0) / (100_000 * elapsed / steps_done)
        assert abs(event["lr_mul"] - expected) <= 0.05 * expected + 1e-3
    assert "final_int8_zlib_roundtrip_exact" in log
    assert [e["event"] for e in events][-1] == "final"
    # Plain mode: the run's score is the round trip's.
    assert events[-1]["score_mode"] == "plain" and events[-1]["score_val_bpb"] == events[-1]["roundtrip_val_bpb"]


def test_iteration_schedule_logs_reference_lines(golden_shards, tmp_path):
    """Also: --profile traces the chosen steps, and the run ends with its plots."""
    from golfjax.profiling import find_trace_files

    cfg = tiny_config(golden_shards, tmp_path, iterations=4, warmdown_iters=2, max_wallclock_seconds=0.0,
                      profile="2:4")
    console = io.StringIO()
    run(cfg, console=console)
    lines = console.getvalue().splitlines()
    assert any(l.startswith("step:4/4 train_loss:") and "train_time:" in l and "step_avg:" in l for l in lines)
    assert any(l.startswith("step:4/4 val_loss:") and "val_bpb:" in l for l in lines)
    events = [json.loads(line) for line in (tmp_path / "loop" / "metrics.jsonl").read_text().splitlines()]
    assert [e["lr_mul"] for e in events if e["event"] == "train"] == [1.0, 1.0, 1.0, 0.5]
    assert {"train_loss", "lr_mul", "grad_norm", "step_ms", "tokens_per_s"} <= set(events[0]) | set(events[1])
    traces = find_trace_files(tmp_path / "loop" / "profile")
    assert traces["xplane"] and traces["trace_json"] and all(p.stat().st_size > 0 for p in traces["xplane"])
    assert any(line.startswith("profile:") for line in lines)
    png = tmp_path / "loop" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
