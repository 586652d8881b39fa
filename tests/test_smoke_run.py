"""The README's first command, shortened: offline smoke training end to end.

Runs from a temporary working directory with absolute paths, so nothing is
read from ../shared or from the checkout's data folders.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.conftest import REPO


def test_smoke_config_trains_exports_and_scores_offline(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["GOLFJAX_SHARED"] = str(tmp_path / "no-shared-here")
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(REPO / "configs" / "smoke.py"),
         "--set", "train.iterations=6", "--set", "train.warmdown_iters=3", "--set", "train.val_loss_every=1000",
         "--set", f"train.out_dir={out}", "--set", "train.run_id=smoke-test"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    log = proc.stdout
    assert "standard library" in log  # it says where the offline corpus came from
    assert "step:1/6 train_loss:" in log and "step:6/6 train_loss:" in log and "step:6/6 val_loss:" in log
    final = [line for line in log.splitlines() if line.startswith("final_int8_zlib_roundtrip_exact")]
    assert len(final) == 1
    roundtrip_bpb = float(final[0].split("val_bpb:")[1])

    events = [json.loads(line) for line in (out / "smoke-test" / "metrics.jsonl").read_text().splitlines()]
    untrained = next(e for e in events if e["event"] == "val" and e["step"] == 0)
    summary = next(e for e in events if e["event"] == "final")
    assert math.isfinite(roundtrip_bpb) and roundtrip_bpb < untrained["val_bpb"]
    assert abs(summary["roundtrip_val_bpb"] - roundtrip_bpb) < 1e-7
    assert summary["artifact_bytes"] < 16_000_000
    assert (out / "smoke-test" / "final_model.golf").is_file()
    assert (out / "smoke-test" / "checkpoint" / "config.json").is_file()
    assert sum(1 for e in events if e["event"] == "train") == 6
