"""Weight averaging (EMA and SWA) in float32, carried in the training state.

The records keep an fp32 EMA shadow updated after every optimizer step from
step 0 (`ema <- d * ema + (1 - d) * w`) and load it before evaluation and
export. Their SWA takes snapshots every N steps while the LR multiplier is
below a threshold; three records computed a "tight SWA" and never used it.
Here both live in `TrainState.avg` (so checkpoints carry them and a resumed
run continues them exactly) and `averaged_params` is what the loop evaluates
at the end and exports. With EMA and SWA both on, the SWA snapshots are of the
EMA weights, so both are applied.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from golfjax.config import TrainConfig

Averages = dict


def _f32(tree: Any) -> Any:
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def _f32_copy(tree: Any) -> Any:
    # A copy, never an alias: the train step donates params and averages separately.
    return jax.tree.map(lambda a: jnp.array(a, jnp.float32, copy=True), tree)


def init_averages(t: TrainConfig, params: Any) -> Averages:
    """The averaging state at step 0: the EMA starts at the initial weights; SWA is empty."""
    avg: Averages = {}
    if t.ema_decay > 0:
        avg["ema"] = _f32_copy(params)
    if t.swa_every > 0:
        avg["swa_sum"] = jax.tree.map(lambda a: jnp.zeros(jnp.shape(a), jnp.float32), params)
        avg["swa_count"] = jnp.zeros((), jnp.int32)
        avg["step"] = jnp.zeros((), jnp.int32)
    return avg


def update_averages(t: TrainConfig, avg: Averages, params: Any, lr_mul: jax.Array) -> Averages:
    """The averages after one optimizer step that produced `params` at multiplier `lr_mul` (traced)."""
    if not avg:
        return avg
    out = dict(avg)
    if "ema" in avg:
        d = t.ema_decay
        out["ema"] = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p.astype(jnp.float32), avg["ema"], params)
    if "swa_sum" in avg:
        step = avg["step"] + 1
        take = (step % t.swa_every == 0) & (lr_mul < t.swa_start_frac)
        source = out["ema"] if "ema" in out else _f32(params)
        out["swa_sum"] = jax.tree.map(lambda s, p: jnp.where(take, s + p, s), avg["swa_sum"], source)
        out["swa_count"] = avg["swa_count"] + take.astype(jnp.int32)
        out["step"] = step
    return out


def averaged_params(avg: Averages, params: Any) -> tuple[Any, str]:
    """(the params to evaluate and export, which average they are).

    SWA when it has snapshots, else the EMA, else `params`. Host-side (reads
    the snapshot count); the result has the dtypes of `params`.
    """
    chosen, what = None, "none"
    if "swa_sum" in avg:
        count = int(np.asarray(jax.device_get(avg["swa_count"])))
        if count > 0:
            # times the float32 reciprocal: one IEEE product, the same on host numpy and any XLA backend
            inv = np.float32(1.0 / count)
            chosen = jax.tree.map(lambda s: s * inv, avg["swa_sum"])
            what = f"swa({count} snapshots{' of the ema' if 'ema' in avg else ''})"
        else:
            what = "swa(no snapshots)"
    if chosen is None and "ema" in avg:
        chosen, what = avg["ema"], ("ema" if what == "none" else what + ", ema")
    if chosen is None:
        return params, what
    return jax.tree.map(lambda a, p: a.astype(p.dtype), chosen, params), what
