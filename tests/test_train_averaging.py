"""EMA and SWA: closed forms on a toy sequence, applied to what is evaluated and exported, and resumed exactly."""

from __future__ import annotations

import io
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golfjax import checkpoint
from golfjax.config import TrainConfig
from golfjax.train.averaging import averaged_params, init_averages, update_averages
from golfjax.train.loop import run
from tests.test_train_loop import tiny_config


def toy_run(t: TrainConfig, ws, lr_muls):
    avg = init_averages(t, {"w": jnp.asarray(ws[0])})
    step = jax.jit(lambda a, w, m: update_averages(t, a, {"w": w}, m))
    for w, m in zip(ws[1:], lr_muls):
        avg = step(avg, jnp.asarray(w), jnp.float32(m))
    return avg


def test_ema_closed_form():
    rng = np.random.default_rng(0)
    ws = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(8)]
    d = 0.9
    avg = toy_run(TrainConfig(ema_decay=d), ws, [1.0] * 7)
    n = len(ws) - 1
    closed = d**n * ws[0].astype(np.float64) + sum((1 - d) * d ** (n - k) * ws[k] for k in range(1, n + 1))
    np.testing.assert_allclose(np.asarray(avg["ema"]["w"]), closed, rtol=1e-5, atol=1e-6)
    params, what = averaged_params(avg, {"w": jnp.asarray(ws[-1])})
    assert what == "ema"
    np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(avg["ema"]["w"]))


def test_swa_closed_form_every_and_start():
    rng = np.random.default_rng(1)
    ws = [rng.normal(size=(5,)).astype(np.float32) for _ in range(13)]
    lr_muls = [1.0, 1.0, 1.0, 0.9, 0.6, 0.45, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0]  # after steps 1..12
    avg = toy_run(TrainConfig(swa_every=2, swa_start_frac=0.5), ws, lr_muls)
    taken = [k for k in range(1, 13) if k % 2 == 0 and lr_muls[k - 1] < 0.5]
    assert taken == [6, 8, 10, 12]
    assert int(avg["swa_count"]) == 4
    params, what = averaged_params(avg, {"w": jnp.asarray(ws[-1])})
    assert what == "swa(4 snapshots)"
    np.testing.assert_allclose(np.asarray(params["w"]), np.mean([ws[k] for k in taken], axis=0), rtol=1e-6)


def test_swa_over_ema_and_empty_swa_falls_back():
    rng = np.random.default_rng(2)
    ws = [rng.normal(size=(4,)).astype(np.float32) for _ in range(5)]
    t = TrainConfig(ema_decay=0.5, swa_every=2, swa_start_frac=2.0)
    avg = toy_run(t, ws, [1.0] * 4)
    ema = [ws[0].astype(np.float64)]
    for w in ws[1:]:
        ema.append(0.5 * ema[-1] + 0.5 * w)
    params, what = averaged_params(avg, {"w": jnp.asarray(ws[-1])})
    assert what == "swa(2 snapshots of the ema)"
    np.testing.assert_allclose(np.asarray(params["w"]), (ema[2] + ema[4]) / 2, rtol=1e-6)
    never = toy_run(replace(t, swa_start_frac=0.0), ws, [1.0] * 4)
    params, what = averaged_params(never, {"w": jnp.asarray(ws[-1])})
    assert what == "swa(no snapshots), ema"
    np.testing.assert_allclose(np.asarray(params["w"]), ema[-1], rtol=1e-6)
    assert init_averages(TrainConfig(), {"w": jnp.zeros(3)}) == {}


AVG = dict(ema_decay=0.8, swa_every=2, swa_start_frac=2.0, warmdown_iters=0, max_wallclock_seconds=0.0,
           checkpoint_every=3, seed=7)


@pytest.fixture(scope="module")
def averaged_run(golden_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("avg")
    result = run(tiny_config(golden_shards, out, iterations=6, **AVG), console=io.StringIO())
    return out, result


def test_final_eval_and_export_use_the_averaged_params(averaged_run):
    out, result = averaged_run
    run_dir = out / "loop"
    checkpoints, step = checkpoint.latest_for_resume(run_dir)
    assert step == 6
    _, cfg = checkpoints.read_meta(step)
    state = checkpoints.restore_state(step, checkpoint.abstract_train_state(cfg))
    expected, what = averaged_params(state.avg, state.params)
    assert what == "swa(3 snapshots of the ema)"
    final = checkpoint.load_params(run_dir / "checkpoint")
    for a, b, raw in zip(jax.tree.leaves(final), jax.tree.leaves(expected), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(r))
               for a, r in zip(jax.tree.leaves(final), jax.tree.leaves(state.params)))
    # the export quantized the averaged weights, not the raw ones
    from golfjax.export.pipeline import load_artifact_params

    _, q = load_artifact_params(result.artifact_path)
    err = lambda ref: sum(float(np.abs(np.asarray(x) - np.asarray(y)).sum())
                          for x, y in zip(jax.tree.leaves(q), jax.tree.leaves(ref)))
    assert err(final) < err(state.params)
    assert "weight_averaging: final params are swa(3 snapshots of the ema)" in (run_dir / "train.log").read_text()
    # the final validation evaluated them too: scripts' loader of a training checkpoint gives the same
    _, loaded = checkpoint.load_model(run_dir / "checkpoints")
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(final)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_averages_resume_exactly(averaged_run, golden_shards, tmp_path):
    out, full = averaged_run
    first = run(tiny_config(golden_shards, tmp_path, iterations=3, **AVG), console=io.StringIO())
    assert first.steps == 3
    resumed = run(replace(tiny_config(golden_shards, tmp_path, iterations=6, **AVG),
                          train=replace(tiny_config(golden_shards, tmp_path, iterations=6, **AVG).train, resume=True)),
                  console=io.StringIO())
    assert resumed.steps == 6
    a = checkpoint.load_params(out / "loop" / "checkpoint")
    b = checkpoint.load_params(tmp_path / "loop" / "checkpoint")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert resumed.final.val_bpb == full.final.val_bpb
