"""The ablation runner's orchestration, with fake trainers (nothing is trained here)."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from golfjax import ablate
from golfjax.ablate import AblationError, RunOutcome

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "cpu_track" / "baseline.py")


def test_parse_toggle_and_seeds():
    assert ablate.parse_toggle("train.warmdown_iters=1200, 3000") == ablate.Toggle("train.warmdown_iters", ("1200", "3000"))
    for bad in ("warmdown=1,2", "train.warmdown_iters=1200", "train.x=1,,2", "train.x", "a.b=1,1"):
        with pytest.raises(AblationError):
            ablate.parse_toggle(bad)
    assert ablate.parse_toggle("model.smear='',v1") == ablate.Toggle("model.smear", ("", "v1"))
    assert ablate.parse_toggle('model.smear=v1,""').values == ("v1", "")
    assert ablate.make_variants([ablate.parse_toggle("model.smear='',v1")])[1].overrides == ("model.smear=v1",)
    assert ablate.make_variants([ablate.parse_toggle("model.smear='',v1")])[0].overrides == ("model.smear=",)
    assert ablate.parse_seeds("3") == (1, 2, 3)
    assert ablate.parse_seeds("7,42") == (7, 42)
    assert ablate.parse_seeds("2,") == (2,)
    for bad in ("0", "x", "1,1", ",", "1,,2"):
        with pytest.raises(AblationError):
            ablate.parse_seeds(bad)


def test_variants_each_and_grid():
    a = ablate.Toggle("model.num_layers", ("2", "3", "4"))
    b = ablate.Toggle("optim.matrix_lr", ("0.04", "0.06"))
    each = ablate.make_variants([a, b], "each")
    assert [v.name for v in each] == ["control", "model.num_layers=3", "model.num_layers=4", "optim.matrix_lr=0.06"]
    assert each[0].overrides == ("model.num_layers=2", "optim.matrix_lr=0.04")
    assert each[3].overrides == ("model.num_layers=2", "optim.matrix_lr=0.06")
    grid = ablate.make_variants([a, b], "grid")
    assert len(grid) == 6 and grid[0].name == "control"
    assert grid[-1].name == "model.num_layers=4 optim.matrix_lr=0.06"
    with pytest.raises(AblationError, match="toggled twice"):
        ablate.make_variants([a, a])
    with pytest.raises(AblationError, match="at least one"):
        ablate.make_variants([])


class FakeTrainer:
    """Writes a final event like a real run; BPB = 2.66, minus 0.05 with warmdown 3000, plus seed noise."""

    def __init__(self, fail=()):
        self.calls = []
        self.fail = set(fail)

    def __call__(self, config, overrides, run_dir):
        self.calls.append((config, list(overrides), Path(run_dir)))
        items = dict(o.split("=", 1) for o in overrides)
        seed = int(items["train.seed"])
        if (items.get("train.warmdown_iters"), seed) in self.fail:
            return RunOutcome(False, {}, "exit 2: error: boom")
        bpb = 2.66 - (0.05 if items.get("train.warmdown_iters") == "3000" else 0.0) + 0.003 * ((seed * 7) % 5 - 2)
        final = {"event": "final", "steps": 100 + seed, "artifact_bytes": 900_000, "roundtrip_val_bpb": bpb,
                 "final_val_bpb": bpb - 0.01}
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(run_dir) / "metrics.jsonl", "w") as f:
            f.write(json.dumps({"event": "train", "step": 1}) + "\n" + json.dumps(final) + "\n")
        return RunOutcome(True, final)


def test_run_ablation_trains_every_variant_and_seed_and_compares(tmp_path):
    fake = FakeTrainer()
    toggles = [ablate.parse_toggle("train.warmdown_iters=1200,3000")]
    logs = []
    ab = ablate.run_ablation(CONFIG, toggles, (1, 2, 3), tmp_path, base_overrides=["train.max_wallclock_seconds=60"],
                             train_fn=fake, log=logs.append, n_boot=2000)
    assert len(fake.calls) == 6
    assert {c[0] for c in fake.calls} == {CONFIG}
    first = fake.calls[0][1]
    assert first == ["train.max_wallclock_seconds=60", "train.warmdown_iters=1200", "train.seed=1"]
    assert len({c[2] for c in fake.calls}) == 6  # one run directory per (variant, seed)
    control, variant = ab.results
    assert control.seeds == variant.seeds == [1, 2, 3]
    assert control.comparison is None
    c = variant.comparison
    assert c.delta == pytest.approx(-0.05) and c.ci_low <= -0.05 <= c.ci_high
    assert c.p_welch < 0.01 and c.p_permutation == pytest.approx(0.1)
    table = ablate.markdown_table(ab)
    assert "| control (`train.warmdown_iters=1200`) | 3 |" in table
    assert "`train.warmdown_iters=3000`" in table and "-0.0500" in table and "(floor)" in table
    assert "900,000" in table
    json.dumps(ab.as_dict())  # the JSON report is serialisable

    # a second call reuses the finished runs and trains nothing
    def must_not_train(*_):
        raise AssertionError("trained a finished run")

    again = ablate.run_ablation(CONFIG, toggles, (1, 2, 3), tmp_path, train_fn=must_not_train, log=logs.append,
                                n_boot=2000)
    assert again.results[1].values == variant.values
    assert sum("(reused)" in line for line in logs) == 6
    # metric choice: final_val_bpb is read from the same events
    other = ablate.run_ablation(CONFIG, toggles, (1, 2, 3), tmp_path, train_fn=must_not_train, log=logs.append,
                                metric="final_val_bpb", n_boot=2000)
    assert other.results[0].values == pytest.approx([v - 0.01 for v in control.values])


def test_failed_runs_are_reported_and_left_out(tmp_path):
    fake = FakeTrainer(fail={("3000", 2)})
    ab = ablate.run_ablation(CONFIG, [ablate.parse_toggle("train.warmdown_iters=1200,3000")], (1, 2, 3), tmp_path,
                             train_fn=fake, log=lambda _: None, n_boot=500)
    variant = ab.results[1]
    assert variant.seeds == [1, 3] and variant.failures == ["seed 2: exit 2: error: boom"]
    assert variant.comparison.n_variant == 2
    table = ablate.markdown_table(ab)
    assert "1 failed" in table and "Failed runs:" in table and "boom" in table


def test_bad_variants_fail_before_training(tmp_path):
    fake = FakeTrainer()
    with pytest.raises(AblationError, match="divisible"):
        ablate.run_ablation(CONFIG, [ablate.parse_toggle("model.num_heads=4,5")], (1,), tmp_path, train_fn=fake)
    with pytest.raises(AblationError, match="metric"):
        ablate.run_ablation(CONFIG, [ablate.parse_toggle("model.num_heads=4,2")], (1,), tmp_path, train_fn=fake,
                            metric="accuracy")
    assert fake.calls == []


FAKE_PYTHON = """#!{python}
import json, os, sys
args = sys.argv[1:]
sets = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")
run_dir = os.path.join(sets["train.out_dir"], sets["train.run_id"])
mode = os.environ["FAKE_MODE"]
if mode == "fail":
    print("error: data/cpu_track: no shards", file=sys.stderr)
    sys.exit(2)
os.makedirs(run_dir, exist_ok=True)
if mode == "metrics":
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({{"event": "final", "roundtrip_val_bpb": 2.5, "steps": 9, "artifact_bytes": 5}}) + "\\n")
print("final_int8_zlib_roundtrip_exact val_loss:4.00000000 val_bpb:2.60000000")
print("argv " + " ".join(args))
"""


@pytest.mark.parametrize("mode", ["metrics", "line", "fail"])
def test_subprocess_train_reads_the_final_event_or_the_log_line(tmp_path, monkeypatch, mode):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("FAKE_MODE", mode)
    run_dir = tmp_path / "runs" / "v" / "seed1"
    outcome = ablate.subprocess_train(CONFIG, ["train.seed=1"], run_dir, python=str(fake), echo=False)
    log = (run_dir / "stdout.log").read_text()
    if mode == "fail":
        assert not outcome.ok and outcome.error == "exit 2: error: data/cpu_track: no shards"
        return
    assert outcome.ok
    assert f"--set train.seed=1 --set train.out_dir={run_dir.parent} --set train.run_id=seed1" in log
    if mode == "metrics":
        assert outcome.metrics["roundtrip_val_bpb"] == 2.5 and outcome.metrics["steps"] == 9
    else:
        assert outcome.metrics == {"roundtrip_val_loss": 4.0, "roundtrip_val_bpb": 2.6}


def test_cli_dry_run_lists_runs_and_rejects_bad_toggles():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "scripts" / "ablate.py"), "--config", CONFIG,
           "--toggle", "train.warmdown_iters=1200,3000", "--seeds", "2", "--dry-run"]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "2 variant(s) x 2 seed(s) = 4 run(s)" in ok.stdout
    bad_cmd = cmd[:4] + ["--toggle", "model.num_heads=4,5", "--dry-run"]
    bad = subprocess.run(bad_cmd, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: variant 'model.num_heads=5'")
    assert "Traceback" not in bad.stderr
