"""The planner: runs on every config (abstract shapes, fast), consistent counts, loop-aware FLOPs, the CLI's JSON line."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golfjax import plan
from golfjax.config import resolve
from golfjax.export.quant import quantize_state_int8
from golfjax.model import gpt

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.py"))
TIME_LIMIT_S = 90  # per config, on 2 shared CPU cores; the 9x512 baseline takes about 5 s unloaded


def test_every_config_is_found():
    assert "configs/baseline.py" in CONFIGS and "configs/smoke.py" in CONFIGS
    assert "configs/cpu_track/baseline.py" in CONFIGS and "configs/cpu_track/best.py" in CONFIGS


@pytest.mark.parametrize("config", CONFIGS)
def test_planner_runs_on_every_config_and_is_consistent(config):
    cfg, _ = resolve(REPO / config, environ={})
    t0 = time.perf_counter()
    p = plan.plan_config(cfg, name=config)
    assert time.perf_counter() - t0 < TIME_LIMIT_S

    # parameters: the abstract init's, split into the optimizer groups
    abstract = jax.eval_shape(lambda: gpt.init_params(cfg.model, jax.random.PRNGKey(0)))
    assert p.params == gpt.count_params(abstract)
    assert sum(g["params"] for g in p.params_by_group.values()) == p.params
    assert set(p.params_by_group) <= {"muon", "scalar", "embed", "head"} and "muon" in p.params_by_group

    # FLOPs: positive, XLA's count agrees with the jaxpr's matmuls, within a factor of 6 N tokens
    tokens = cfg.train.train_batch_tokens
    assert p.tokens_per_step == tokens
    assert p.flops_per_step >= p.xla_flops > 0 and p.xla_bytes_accessed > 0
    assert p.dot_flops_per_step <= p.flops_per_step <= 1.25 * p.dot_flops_per_step
    ratio = p.flops_per_step / (6 * p.params * tokens)
    assert 0.8 < ratio < 3.0, ratio
    assert 0.8 < p.flops_per_step / p.model_flops_per_step < 2.5

    # artifact: entropy-coded payload + header + code, under the config's own codec measure
    a = p.artifact
    assert a["scheme"] == cfg.export.scheme and a["limit_bytes"] == cfg.export.artifact_limit_bytes
    assert 0 < a["payload_entropy_bytes"] <= a["payload_raw_bytes"]
    assert p.est_artifact_bytes == a["est_model_bytes"] + a["code_bytes"]
    assert a["est_model_bytes"] == a["payload_entropy_bytes"] + a["container_overhead_bytes"]
    assert a["code_bytes_mode"] == cfg.export.code_bytes_mode

    # projection: time = FLOPs / (GPUs x peak x MFU); steps capped by iterations
    assert p.peak_flops_per_gpu == plan.H100_SXM["bf16_dense_flops"] and p.compute_dtype == "bfloat16"
    expected_ms = 1000 * p.flops_per_step / (8 * p.peak_flops_per_gpu * p.mfu)
    assert p.projected_step_ms_8xh100 == pytest.approx(expected_ms)
    assert p.projected_steps_600s == min(cfg.train.iterations, int(600_000 // expected_ms))
    assert p.projected_tokens_600s == p.projected_steps_600s * tokens
    json.loads(p.as_json())


def test_cpu_track_configs_fit_their_budget_by_the_estimate():
    for config in ("configs/cpu_track/baseline.py", "configs/cpu_track/best.py"):
        cfg, _ = resolve(REPO / config, environ={})
        state = plan.planning_weights(cfg)
        est = plan.estimate_artifact(cfg, state)
        assert est["limit_bytes"] == 1_000_000 and est["est_artifact_bytes"] < 1_000_000, (config, est)


def test_baseline_projection_is_documented_against_the_reference():
    cfg, _ = resolve(REPO / "configs" / "baseline.py", environ={})
    p = plan.plan_config(cfg, name="baseline")
    # the default MFU is the reference's measured one, rounded: the projection is within 5% of 43.54 ms
    assert abs(p.projected_step_ms_8xh100 / plan.REFERENCE_BASELINE_STEP_MS - 1) < 0.05
    assert any("43.54 ms/step" in n for n in p.notes)
    # the reference's trained int8+zlib model is 15,815,847 bytes with a 17,178,912-byte payload
    assert p.artifact["payload_raw_bytes"] == 17_178_912
    assert abs(p.artifact["est_model_bytes"] / 15_815_847 - 1) < 0.03


def test_dot_flops_counts_loops_as_run_and_as_xla_sees_them():
    def f(x, unroll):
        def body(h, _):
            return h @ x, None

        return jax.lax.scan(body, x, None, length=10, unroll=unroll)[0].sum()

    x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    body = 2 * 64**3
    for unroll, copies in ((False, 1), (True, 10), (4, 6), (3, 4)):
        traced = jax.jit(lambda v: f(v, unroll)).trace(x)
        assert plan.dot_flops(traced.jaxpr, multiply_loops=True) == 10 * body
        assert plan.dot_flops(traced.jaxpr, multiply_loops=False) == copies * body
        xla = traced.lower().cost_analysis()["flops"]
        assert xla == pytest.approx(copies * body, rel=0.02)


def test_byte_entropy():
    assert plan.byte_entropy_bits(np.zeros(100, np.int8)) == 0.0
    assert plan.byte_entropy_bits(np.arange(256, dtype=np.uint8)) == pytest.approx(256 * 8)
    assert plan.byte_entropy_bits(np.array([0, 1] * 50, np.int8)) == pytest.approx(100)


def test_gaussian_weights_cost_like_a_trained_int8_matrix():
    # a Gaussian row above the 1/127 scale floor uses ~7.3 bits per int8 code; below it, fewer
    rng = np.random.default_rng(0)
    big = quantize_state_int8({"w": rng.standard_normal((256, 512)).astype(np.float32)})[0].tensors["w"]
    small = quantize_state_int8({"w": 0.01 * rng.standard_normal((256, 512)).astype(np.float32)})[0].tensors["w"]
    bits = lambda qt: plan.byte_entropy_bits(qt.arrays["q"]) / qt.arrays["q"].size
    assert 7.0 < bits(big) < 7.6 and bits(small) < 4.0


def test_bad_requests():
    cfg, _ = resolve(REPO / "configs" / "smoke.py", environ={})
    with pytest.raises(plan.PlanError, match="mfu"):
        plan.plan_config(cfg, mfu=0)
    with pytest.raises(plan.PlanError, match="gpus"):
        plan.plan_config(cfg, gpus=0)


def test_cli_prints_a_table_then_one_json_line():
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(REPO / "scripts" / "plan.py"), "--config", str(REPO / "configs" / "smoke.py"),
           "--measure-codec", "--mfu", "0.4"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("config") and any(line.startswith("FLOPs per step") for line in lines)
    result = json.loads(lines[-1])
    for key in ("params", "est_artifact_bytes", "flops_per_step", "projected_step_ms_8xh100", "projected_steps_600s"):
        assert key in result and result[key] > 0
    assert result["mfu"] == 0.4 and result["artifact"]["measured_model_bytes"] > 0
    assert math.isfinite(result["projected_tokens_600s"])
    bad = subprocess.run(cmd[:4] + ["--mfu", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: mfu must be in (0, 1]")
