"""golfjax.plots and scripts/plot.py: valid, non-blank PNGs from metrics.jsonl."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from golfjax.plots import PLOT_NAME, read_metrics, write_run_plots
from tests.conftest import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write(run_dir, records, tail: str = ""):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write(tail)


def _train(step, loss, ms):
    return {"event": "train", "step": step, "train_loss": loss, "lr_mul": 1.0, "grad_norm": 0.5,
            "step_ms": 100.0, "tokens_per_s": 8e4, "train_time_ms": ms}


def _val(step, bpb, ms):
    return {"event": "val", "step": step, "train_time_ms": ms, "val_loss": bpb * 1.3, "val_bpb": bpb,
            "tokens": 100, "bytes": 130}


def assert_valid_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 400 and img.shape[1] > 600
    assert float(np.var(img[..., :3])) > 1e-3  # not blank
    return img


def test_full_run_plot(tmp_path):
    recs = [_val(0, 4.1, 0.0)]
    for s in range(1, 201):
        recs.append(_train(s, 6.9 * math.exp(-s / 60) + 2.5 + 0.05 * math.sin(s), 110.0 * s))
        if s % 50 == 0:
            recs.append(_val(s, 4.1 - 1.5 * (1 - math.exp(-s / 80)), 110.0 * s))
    recs.append({"event": "final", "steps": 200, "train_time_ms": 22000.0, "roundtrip_val_bpb": 2.84})
    _write(tmp_path, recs)
    written = write_run_plots(tmp_path)
    assert written == [tmp_path / PLOT_NAME]
    assert_valid_png(written[0])


@pytest.mark.parametrize("case", ["train_only", "single_point", "val_only"])
def test_sparse_runs(tmp_path, case):
    recs = {"train_only": [_train(s, 5.0 - 0.01 * s, 50.0 * s) for s in range(1, 30)],
            "single_point": [_train(1, 6.9, 80.0)],
            "val_only": [_val(0, 4.2, 0.0)]}[case]
    _write(tmp_path, recs)
    (path,) = write_run_plots(tmp_path)
    assert_valid_png(path)


def test_resumed_and_truncated_metrics(tmp_path):
    """A resumed run re-logs steps after its checkpoint (the last record wins); a line cut
    short by a killed process is skipped."""
    recs = [_train(s, 5.0, 10.0 * s) for s in range(1, 6)] + [_train(s, 4.0, 10.0 * s) for s in range(4, 8)]
    recs += [_val(5, 3.0, 50.0), {"event": "other", "x": 1}]
    _write(tmp_path, recs, tail='{"event": "train", "step": 8, "train_lo')
    m = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in m.train] == list(range(1, 8))
    assert [r["train_loss"] for r in m.train] == [5.0, 5.0, 5.0, 4.0, 4.0, 4.0, 4.0]
    assert len(m.val) == 1 and m.final is None and m.skipped_lines == 1
    assert_valid_png(write_run_plots(tmp_path)[0])


def test_nothing_to_plot(tmp_path):
    assert write_run_plots(tmp_path) == []  # no metrics.jsonl
    _write(tmp_path, [{"event": "final", "steps": 0}])
    assert write_run_plots(tmp_path) == []


def test_plot_script(tmp_path):
    _write(tmp_path / "run", [_train(s, 5.0 / s, 20.0 * s) for s in range(1, 10)] + [_val(9, 3.3, 180.0)])
    script = str(REPO / "scripts" / "plot.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "run" / PLOT_NAME)
    assert_valid_png(tmp_path / "run" / PLOT_NAME)
    proc = subprocess.run([sys.executable, script, str(tmp_path / "missing")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no metrics.jsonl")
