"""The train step's model switches: late QAT (traced, from the LR multiplier) and depth
recurrence (both graphs compiled, switched at a training fraction)."""

from __future__ import annotations

import functools
import io
import json
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golfjax.config import Config
from golfjax.model import gpt
from golfjax.optim.build import build_optimizer
from golfjax.parallel import make_mesh, put_replicated, put_sharded
from golfjax.train.loop import run
from golfjax.train.step import init_state, train_step
from tests.test_train_loop import tiny_config


def small_cfg(**model) -> Config:
    c = Config()
    return replace(c, model=replace(c.model, vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1,
                                    compute_dtype="float32", **model),
                   train=replace(c.train, train_batch_tokens=64, train_seq_len=16, grad_accum_steps=1))


@functools.partial(jax.jit, static_argnums=0)  # one compile, not one per eager op
def trained_looking_params(model):
    """Init plus noise: the zero-initialised output projections would hide the blocks."""
    params = gpt.init_params(model, jax.random.PRNGKey(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree.unflatten(tree, [l + 0.2 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def step_losses(cfg: Config, lr_muls, recurrent: bool = True, direct_qat=(False, True)):
    """train_loss of ONE compiled step (no donation) from the same state at each lr_mul, and
    the model's own loss of the same batch (one jitted forward) with each QAT switch in direct_qat."""
    mesh = make_mesh(jax.devices()[:1])
    params = trained_looking_params(cfg.model)
    tx = build_optimizer(params, cfg.optim, cfg.model.tie_embeddings)
    state = put_replicated(init_state(cfg, params, tx), mesh)
    rng = np.random.default_rng(0)
    x, y = (put_sharded(rng.integers(0, 64, (1, 4, 16), dtype=np.int32), mesh, 1) for _ in range(2))
    step = jax.jit(lambda s, x, y, m: train_step(s, x, y, m, cfg, tx, recurrent))
    compiled = step.lower(state, x, y, jnp.float32(1.0)).compile()
    losses = [float(compiled(state, x, y, jnp.float32(m))[1]["train_loss"]) for m in lr_muls]
    loss = jax.jit(lambda p, x, y, q: gpt.loss(p, cfg.model, x, y, qat=q, recurrent=recurrent), static_argnums=3)
    direct = {q: float(loss(params, x[0], y[0], q)) for q in direct_qat}
    return losses, direct


def test_late_qat_switch_reaches_the_loss_in_one_compiled_step():
    cfg = small_cfg(qat_bits=3, qat_lr_threshold=0.5)
    (above, below), direct = step_losses(cfg, [1.0, 0.25])
    assert above != below  # the traced switch flipped the forward
    assert above == pytest.approx(direct[False], rel=1e-6) and below == pytest.approx(direct[True], rel=1e-6)
    assert abs(above - below) > 1e-3
    (a, b), _ = step_losses(small_cfg(), [1.0, 0.25], direct_qat=())  # without QAT the loss ignores the LR
    assert a == b


def test_recurrent_and_plain_steps_differ():
    cfg = small_cfg(recur_first=0, recur_last=0, recur_loops=1, recur_start_frac=0.5)
    (plain,), direct_plain = step_losses(cfg, [1.0], recurrent=False, direct_qat=(False,))
    (looped,), direct_loop = step_losses(cfg, [1.0], recurrent=True, direct_qat=(False,))
    assert plain == pytest.approx(direct_plain[False], rel=1e-6)
    assert looped == pytest.approx(direct_loop[False], rel=1e-6)
    assert abs(plain - looped) > 1e-3


def test_loop_switches_recurrence_on_at_the_fraction(golden_shards, tmp_path):
    cfg = tiny_config(golden_shards, tmp_path, iterations=4, warmdown_iters=0, max_wallclock_seconds=0.0)
    cfg = replace(cfg, model=replace(cfg.model, num_layers=2, recur_first=1, recur_last=1, recur_loops=1,
                                     recur_start_frac=0.5))
    console = io.StringIO()
    run(cfg, console=console)
    events = [json.loads(l) for l in (tmp_path / "loop" / "metrics.jsonl").read_text().splitlines()]
    assert [e["recurrent"] for e in events if e["event"] == "train"] == [False, False, True, True]
    assert "depth_recurrence: off until training fraction 0.500 (both step graphs compiled)" in console.getvalue()
