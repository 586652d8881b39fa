"""A train step on random tokens, compiled: what benchmarks and profiles time.

No data needed: a fresh state from the config's init, the jitted step of
`golfjax.train.step`, and a random global batch of the config's shape placed
on the mesh.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from golfjax.config import Config
from golfjax.data.loader import default_grad_accum_steps
from golfjax.model import gpt
from golfjax.optim.build import build_optimizer
from golfjax.parallel import num_ranks, put_replicated, put_sharded
from golfjax.train.step import init_state, make_train_step


@dataclass
class SyntheticStep:
    compiled: object  # (state, x, y, lr_mul) -> (state, metrics)
    state: object
    x: jax.Array
    y: jax.Array
    tokens_per_step: int

    def run(self) -> dict:
        """One step at lr_mul 1; waits for it and returns its metrics."""
        self.state, metrics = self.compiled(self.state, self.x, self.y, jnp.float32(1.0))
        return jax.block_until_ready(metrics)


def batch_shape(cfg: Config, ranks: int) -> tuple[int, int, int]:
    t = cfg.train
    accum = t.grad_accum_steps or default_grad_accum_steps(ranks)
    return accum, ranks * (t.train_batch_tokens // (ranks * accum)) // t.train_seq_len, t.train_seq_len


def synthetic_step(cfg: Config, mesh: Mesh, seed: int = 0) -> SyntheticStep:
    """Compile the config's train step (not timed here) with a random batch ready to feed it."""
    shape = batch_shape(cfg, num_ranks(mesh))
    rng = np.random.default_rng(seed)
    x, y = (put_sharded(rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32), mesh, 1) for _ in range(2))
    params = gpt.init_params(cfg.model, jax.random.PRNGKey(cfg.train.seed))
    tx = build_optimizer(params, cfg.optim, cfg.model.tie_embeddings, mesh)  # mesh: muon_sharded_ns
    state = put_replicated(init_state(cfg, params, tx), mesh)
    step_fn = make_train_step(cfg, mesh, tx)
    compiled = step_fn.lower(state, x, y, jnp.float32(1.0)).compile()
    return SyntheticStep(compiled, state, x, y, int(np.prod(shape)))
