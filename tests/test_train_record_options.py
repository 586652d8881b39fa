"""The records' optimizer, schedule, averaging and data-order options together in a real (tiny) run."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest

from golfjax.train.loop import run
from tests.test_train_loop import tiny_config


@pytest.mark.parametrize("order", ["packed", "shuffled"])
def test_top_record_optimizer_stack_trains_end_to_end(golden_shards, tmp_path, order):
    cfg = tiny_config(golden_shards, tmp_path, iterations=6, warmdown_iters=0, max_wallclock_seconds=0.0,
                      warmdown_frac=0.5, min_lr=0.4, ema_decay=0.9, swa_every=1, swa_start_frac=0.6)
    cfg = replace(cfg, optim=replace(cfg.optim, muon_ns_coeffs="polar_express", muon_row_normalize=True,
                                     muon_wd=0.095, embed_wd=0.085, adam_wd=0.02, beta2=0.99, grad_clip_norm=0.3,
                                     muon_sharded_ns=True, muon_momentum=0.97, muon_momentum_warmup_start=0.92),
                  data=replace(cfg.data, data_order=order))
    console = io.StringIO()
    result = run(cfg, console=console)
    assert result.steps == 6
    events = [json.loads(l) for l in (tmp_path / "loop" / "metrics.jsonl").read_text().splitlines()]
    lr = [e["lr_mul"] for e in events if e["event"] == "train"]
    # fraction = step/6 before each step; warmdown from 0.5: (1 - f)/0.5 floored at 0.4
    assert lr == pytest.approx([1.0, 1.0, 1.0, 1.0, 2 / 3, 0.4])
    # SWA snapshots after the steps whose multiplier was below 0.6: only the last one (of the EMA)
    assert "weight_averaging: final params are swa(1 snapshots of the ema)" in console.getvalue()
    assert all(e["train_loss"] == e["train_loss"] for e in events if e["event"] == "train")
    assert result.final.val_bpb < 12 and result.roundtrip.val_bpb < 12
