"""The jitted, data-parallel train step with gradient accumulation.

A step receives the whole global batch `(grad_accum, sequences, seq_len)`,
split over the mesh's data axis along its sequence dimension. It scans the
micro-batches, summing the gradients of `loss / grad_accum` exactly as the
reference's `(loss * grad_scale).backward()` does (XLA inserts the all-reduce
that DDP performs), clips, runs the optimizer and scales every update by the
traced LR multiplier (the optimizer's updates already carry the base LRs),
then updates the weight averages (golfjax.train.averaging).

Two model switches reach the loss: late QAT (`qat = lr_mul < qat_lr_threshold`,
traced, so the fake-quantized forward is really in the graph) when
`model.qat_bits > 0`, and depth recurrence (`recurrent`, static: the loop
compiles one step per value before the clock starts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from golfjax.config import Config
from golfjax.model import gpt
from golfjax.optim.build import clip_grads_by_global_norm, global_grad_norm
from golfjax.parallel import replicated, sharded_along
from golfjax.train.averaging import init_averages, update_averages


@dataclass
class TrainState:
    params: Any
    opt_state: Any
    avg: Any = field(default_factory=dict)  # golfjax.train.averaging (empty when averaging is off)


jax.tree_util.register_dataclass(TrainState, data_fields=["params", "opt_state", "avg"], meta_fields=[])


def qat_enabled(cfg: Config) -> bool:
    """Whether the model has a late-QAT switch (model.qat_bits > 0)."""
    return getattr(cfg.model, "qat_bits", 0) > 0


def loss_switches(cfg: Config, lr_mul: jax.Array | None, recurrent: bool = True) -> dict:
    """Keyword switches for gpt.loss: only those that differ from the model's defaults, so the
    baseline traces exactly the reference graph."""
    kwargs: dict = {}
    if qat_enabled(cfg) and lr_mul is not None:
        kwargs["qat"] = lr_mul < cfg.model.qat_lr_threshold
    if not recurrent:
        kwargs["recurrent"] = False
    return kwargs


def accumulate_grads(params, cfg: Config, x: jax.Array, y: jax.Array, lr_mul: jax.Array | None = None,
                     recurrent: bool = True):
    """Sum over micro-batches of grad(loss / A); returns (grads, per-micro-batch losses)."""
    accum = x.shape[0]
    switches = loss_switches(cfg, lr_mul, recurrent)
    value_and_grad = jax.value_and_grad(lambda p, xb, yb: gpt.loss(p, cfg.model, xb, yb, **switches))

    def micro(grads, batch):
        loss, g = value_and_grad(params, *batch)
        grads = jax.tree.map(lambda acc, gi: acc + gi / accum, grads, g)
        return grads, loss

    zeros = jax.tree.map(jnp.zeros_like, params)
    return jax.lax.scan(micro, zeros, (x, y))


def train_step(state: TrainState, x: jax.Array, y: jax.Array, lr_mul: jax.Array,
               cfg: Config, tx: optax.GradientTransformation, recurrent: bool = True) -> tuple[TrainState, dict]:
    grads, micro_losses = accumulate_grads(state.params, cfg, x, y, lr_mul, recurrent)
    grad_norm = global_grad_norm(grads)
    grads = clip_grads_by_global_norm(grads, cfg.optim.grad_clip_norm, grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + lr_mul.astype(p.dtype) * u, state.params, updates)
    avg = update_averages(cfg.train, state.avg, params, lr_mul)
    metrics = {"train_loss": jnp.mean(micro_losses), "micro_losses": micro_losses, "grad_norm": grad_norm}
    return TrainState(params, opt_state, avg), metrics


def init_state(cfg: Config, params, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(params, tx.init(params), init_averages(cfg.train, params))


def make_train_step(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation, recurrent: bool = True) -> Callable:
    """Jit the step for `mesh`: state replicated (and donated), batch split over 'data'.

    `recurrent=False` builds the step of a depth-recurrent model before its recurrence is switched on."""
    rep = replicated(mesh)
    batch = sharded_along(mesh, 1, 3)
    step = jax.jit(
        lambda state, x, y, lr_mul: train_step(state, x, y, lr_mul, cfg, tx, recurrent),
        in_shardings=(rep, batch, batch, rep),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )
    return step
