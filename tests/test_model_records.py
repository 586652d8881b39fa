"""The record configs: full-size parameter counts of the leaderboard entries (abstract
shapes, nothing allocated), the planner's JSON line, and a few CPU-scale training steps
of each record's own technique mix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from golfjax.config import ConfigError, resolve
from golfjax.model import gpt

REPO = Path(__file__).resolve().parents[1]
RECORDS = {"r1248": 26_829_913, "r1147": 27_067_484, "r1081": 35_944_536, "top1061": 35_945_671}


def record_path(name: str) -> Path:
    return REPO / "configs" / "records" / f"{name}.py"


@pytest.mark.parametrize("name", RECORDS)
def test_record_builds_full_size_with_its_param_count(name):
    cfg, _ = resolve(record_path(name))
    params = jax.eval_shape(lambda: gpt.init_params(cfg.model, jax.random.PRNGKey(0)))
    count = gpt.count_params(params)
    assert abs(count - RECORDS[name]) <= 0.01 * RECORDS[name], (name, count)
    assert count == RECORDS[name]  # the technique mix reproduces the record's count exactly
    doc = record_path(name).read_text().split('"""')[1]
    assert "Leaderboard record" in doc and str(RECORDS[name])[:2] in doc.replace(",", "")


def test_a_missing_option_is_not_implemented_yet():
    from golfjax.config import Config, with_fields

    with pytest.raises(ConfigError, match="not implemented yet: optim.no_such_option=1 .needed by r0"):
        with_fields(Config(), {"model.num_layers": 11, "optim.no_such_option": 1}, needed_by="r0")
    assert with_fields(Config(), {"model.num_layers": 11}).model.num_layers == 11


@pytest.mark.parametrize("name", ["r1248", "top1061"])
def test_planner_reports_the_record_param_count(name):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "plan.py"), "--config", str(record_path(name))],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(last["params"] - RECORDS[name]) <= 0.01 * RECORDS[name]
    assert last["artifact"]["gptq_costed_as_round_to_nearest"] == (name == "top1061")


# CPU scale: each record's own technique mix, narrower, shallower and shorter.
SHRINK = ["model.model_dim=64", "model.num_heads=4", "model.num_kv_heads=2", "model.vocab_size=128",
          "train.train_seq_len=32", "train.train_batch_tokens=256", "train.grad_accum_steps=1",
          "model.compute_dtype=float32", "model.rope_dims=8"]
SHRINK_LAYERS = {"r1248": ["model.num_layers=4", "model.xsa_last_n=2", "model.bigram_buckets=64",
                           "model.bigram_dim=16", "model.rope_train_seq_len=16"],
                 "r1147": ["model.num_layers=4", "model.bigram_buckets=64", "model.bigram_dim=16",
                           "model.ve_dim=16", "model.ve_layers=2,3", "model.rope_train_seq_len=16"],
                 "r1081": ["model.num_layers=4", "model.recur_first=1", "model.recur_last=2", "model.recur_loops=1",
                           "model.parallel_start=3"],
                 "top1061": ["model.num_layers=4", "model.recur_first=1", "model.recur_last=2", "model.recur_loops=1",
                             "model.two_lane_start=3", "model.smear_window=8",
                             "model.attn_gate_window=8", "caseops.caseops_enabled=false"]}


def shrunk(name: str):
    cfg, _ = resolve(record_path(name), SHRINK + SHRINK_LAYERS[name])
    return cfg


@pytest.mark.parametrize("name", RECORDS)
def test_record_technique_mix_trains_at_cpu_scale(name):
    """The real train step (optimizer, averaging, QAT/recurrence switches) of each record's
    shrunk model: finite losses that fall on a repeated batch (the looped graph of a
    recurrent record; the loop-off graph is the train loop's and its tests' business)."""
    import jax.numpy as jnp

    from golfjax.optim.build import build_optimizer
    from golfjax.parallel import make_mesh, put_replicated, put_sharded
    from golfjax.train.step import init_state, make_train_step

    cfg = shrunk(name)
    mesh = make_mesh(jax.devices()[:1])
    params = gpt.init_params(cfg.model, jax.random.PRNGKey(0))
    tx = build_optimizer(params, cfg.optim, cfg.model.tie_embeddings, mesh)
    state = put_replicated(init_state(cfg, params, tx), mesh)
    rng = np.random.default_rng(0)
    t = cfg.train.train_seq_len
    x = rng.integers(0, cfg.model.vocab_size, (1, cfg.train.train_batch_tokens // t, t + 1), dtype=np.int32)
    x, y = put_sharded(x[..., :-1], mesh, 1), put_sharded(x[..., 1:], mesh, 1)
    step = make_train_step(cfg, mesh, tx, recurrent=True)
    losses = []
    for _ in range(3):
        state, metrics = step(state, x, y, jnp.float32(1.0))
        losses.append(float(metrics["train_loss"]))
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses
