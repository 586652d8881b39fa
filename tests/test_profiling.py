"""golfjax.profiling (--profile START:STOP) and scripts/profile_summary.py."""

import gzip
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from golfjax.profiling import ProfileSpecError, ProfileWindow, find_trace_files, parse_profile_spec
from tests.conftest import REPO


def _summary_module():
    spec = importlib.util.spec_from_file_location("profile_summary", REPO / "scripts" / "profile_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_profile_spec():
    assert parse_profile_spec(None) is None
    assert parse_profile_spec("") is None
    assert parse_profile_spec("5:8") == (5, 8)
    assert parse_profile_spec(" 1:2 ") == (1, 2)
    for bad in ["5", "5:", ":8", "a:b", "8:5", "5:5", "0:3", "-1:3", "1:2:3", "1.5:3"]:
        with pytest.raises(ProfileSpecError, match="--profile must be START:STOP"):
            parse_profile_spec(bad)
    with pytest.raises(ValueError):  # a ValueError, so the scripts print one error line
        ProfileWindow("unused", "3:1")


def _trace_events(log_dir):
    files = find_trace_files(log_dir)
    with gzip.open(files["trace_json"][0], "rt") as f:
        return json.load(f)["traceEvents"]


def _run_steps(window, steps, f, x):
    stopped = []
    for step in steps:
        window.before_step(step)
        y = f(x)
        stopped.append(window.after_step(step, y))
    return stopped


def test_window_traces_annotated_steps(tmp_path):
    f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
    x = jnp.ones((128, 128))
    f(x).block_until_ready()
    window = ProfileWindow(tmp_path, "2:4")
    assert window.enabled and not window.tracing
    stopped = _run_steps(window, range(1, 7), f, x)
    assert stopped == [None, None, tmp_path / "profile", None, None, None]
    assert not window.tracing and window.close() is None
    assert window.overhead_s > 0
    files = find_trace_files(tmp_path / "profile")
    for kind in ("xplane", "trace_json", "perfetto"):
        assert len(files[kind]) == 1 and files[kind][0].stat().st_size > 0, kind
    assert files["xplane"][0].name.endswith(".xplane.pb")
    assert files["trace_json"][0].parent.parent.name == "profile"  # profile/plugins/profile/<timestamp>/
    events = _trace_events(tmp_path / "profile")
    steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and "args" in e)
    assert steps == [2, 3]
    assert any("hlo_op" in e.get("args", {}) for e in events)  # the XLA ops of the jitted function


def test_window_closed_early_and_disabled(tmp_path):
    f = jax.jit(lambda a: a * 2.0)
    x = jnp.ones((8,))
    window = ProfileWindow(tmp_path / "early", "2:100")  # the run ends (e.g. wall-clock cap) at step 4
    _run_steps(window, range(1, 5), f, x)
    assert window.tracing
    assert window.close() == tmp_path / "early" / "profile"
    assert find_trace_files(tmp_path / "early" / "profile")["xplane"]
    assert window.close() is None  # idempotent

    off = ProfileWindow(tmp_path / "off", None)
    assert not off.enabled
    assert _run_steps(off, range(1, 4), f, x) == [None] * 3
    assert off.close() is None and not (tmp_path / "off").exists()

    never = ProfileWindow(tmp_path / "never", "10:12")  # the run stops before START
    _run_steps(never, range(1, 4), f, x)
    assert never.close() is None and not (tmp_path / "never").exists()


def test_profile_summary_script(tmp_path):
    """The summary reads the trace back: step annotations, ops grouped by JAX name, and
    (with hlo.txt beside the trace) what each op computes."""
    f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum())
    a = jnp.ones((256, 256))
    compiled = f.lower(a, a).compile()
    (tmp_path / "hlo.txt").write_text(compiled.as_text())
    compiled(a, a).block_until_ready()
    window = ProfileWindow(tmp_path, "1:3")
    for step in (1, 2):
        window.before_step(step)
        window.after_step(step, compiled(a, a))
    mod = _summary_module()
    s = mod.summarize(tmp_path / "profile", top=5)
    assert s["steps"] == [1, 2] and len(s["step_ms"]) == 2
    assert s["op_ms_per_step"] > 0 and s["top"]
    assert s["hlo_metadata"]
    assert any("matmul" in k for k, _ in s["by_kind"])
    assert abs(sum(v for _, v in s["by_phase"]) - 1.0) < 1e-6

    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "profile_summary.py"), str(tmp_path / "profile")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    assert "traced steps: [1, 2]" in proc.stdout and "time split by kind" in proc.stdout
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "profile_summary.py"), str(tmp_path / "nothing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error:")
