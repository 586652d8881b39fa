"""Parameter groups, the optimizer, gradient clipping and the LR schedule.

Mirrors the optimizer split of the reference `main()` (openai/parameter-golf
`train_gpt.py`): Muon for the 2-D matrices of the blocks, Adam at scalar_lr for
the blocks' vectors and control tensors and for skip_weights, Adam at
tied_embed_lr / embed_lr for the token embedding and Adam at head_lr for an
untied head.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from golfjax.config import OptimConfig
from golfjax.model.naming import is_control_tensor
from golfjax.optim.muon import scale_by_muon


GROUPS: tuple[str, ...] = ("muon", "scalar", "embed", "head")

_NS_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def _path_name(path: jax.tree_util.KeyPath) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _label(name: str, ndim: int) -> str:
    top = name.split(".", 1)[0]
    if top == "blocks":
        per_layer_ndim = ndim - 1  # leading axis = layers
        is_control = is_control_tensor(name)
        if per_layer_ndim == 2 and not is_control:
            return "muon"
        if per_layer_ndim < 2 or is_control:
            return "scalar"
        raise ValueError(f"{name}: the reference has no optimizer group for a {per_layer_ndim}-D block parameter")
    if top == "tok_emb" or name.endswith(".embed.embedding"):
        # The records train the BigramHash and value-embedding tables with the token
        # embedding's Adam group (its LR); their projections and scales stay "scalar".
        return "embed"
    if top == "lm_head":
        return "head"
    return "scalar"  # skip_weights and any other model-level vector/scalar


def param_labels(params: Any, tie_embeddings: bool) -> Any:
    """The optimizer group of every leaf ("muon", "scalar", "embed" or "head").

    Derived by rule from paths and shapes (leaves under "blocks" carry a leading
    layer axis), so new parameters are grouped as the reference would group them.
    """
    if ("lm_head" in params) == tie_embeddings:
        raise ValueError(f"tie_embeddings={tie_embeddings} but lm_head is {'present' if tie_embeddings else 'missing'}")
    return jax.tree_util.tree_map_with_path(lambda path, leaf: _label(_path_name(path), jnp.ndim(leaf)), params)


def label_groups(labels: Any) -> dict[str, list[str]]:
    """{group: [dotted parameter paths]}, for the run log."""
    groups: dict[str, list[str]] = {}
    for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]:
        groups.setdefault(label, []).append(_path_name(path))
    return groups


def _decayed(direction: optax.GradientTransformation, lr: float, wd: float) -> optax.GradientTransformation:
    """-lr * (direction + wd * p): after the step's `lr_mul` scaling this is torch's decoupled
    decay p <- p * (1 - lr_mul*lr*wd) followed by the update. wd = 0 adds no op (bit-exact baseline)."""
    if wd == 0.0:
        return optax.chain(direction, optax.scale(-lr))
    return optax.chain(direction, optax.add_decayed_weights(wd), optax.scale(-lr))


def _adam(cfg: OptimConfig, lr: float, wd: float = 0.0) -> optax.GradientTransformation:
    # optax: (m/bc1) / (sqrt(v/bc2) + eps); torch.optim.Adam: (lr/bc1) m / (sqrt(v)/sqrt(bc2) + eps).
    # Equal formulas (sqrt(v/bc2) = sqrt(v)/sqrt(bc2)); they differ only in rounding.
    return _decayed(optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=cfg.adam_eps), lr, wd)


def build_optimizer(params: Any, cfg: OptimConfig, tie_embeddings: bool,
                    mesh: Mesh | None = None) -> optax.GradientTransformation:
    """The reference optimizer split as one optax transformation.

    Update contract: the returned updates already include each group's BASE
    learning rate and sign (update = -base_lr * direction). The train step must
    multiply ALL updates by the traced schedule multiplier `lr_mul`
    (`lr_multiplier`) before `optax.apply_updates`. Every group's update is
    proportional to its lr, so this equals the reference's lr = base_lr * lr_mul.
    Muon's momentum warmup lives in the Muon state's own step count.
    Weight decay (muon_wd, embed_wd, adam_wd, head_wd) is decoupled, scaled by
    the same lr. `mesh` is used by `muon_sharded_ns` (ignored without it).
    """
    if cfg.muon_ns_dtype not in _NS_DTYPES:
        raise ValueError(f"muon_ns_dtype must be one of {sorted(_NS_DTYPES)}, got {cfg.muon_ns_dtype!r}")
    labels = param_labels(params, tie_embeddings)
    muon = scale_by_muon(
        momentum=cfg.muon_momentum,
        warmup_start=cfg.muon_momentum_warmup_start,
        warmup_steps=cfg.muon_momentum_warmup_steps,
        ns_steps=cfg.muon_backend_steps,
        ns_coeffs=cfg.muon_ns_coeffs,
        ns_dtype=_NS_DTYPES[cfg.muon_ns_dtype],
        row_norm=cfg.muon_row_normalize,
        ns_safety=cfg.muon_ns_safety,
        shard_mesh=mesh if cfg.muon_sharded_ns else None,
        ns_rounding=cfg.muon_ns_rounding,
    )
    transforms = {
        "muon": _decayed(muon, cfg.matrix_lr, cfg.muon_wd),
        "scalar": _adam(cfg, cfg.scalar_lr, cfg.adam_wd),
        "embed": _adam(cfg, cfg.tied_embed_lr if tie_embeddings else cfg.embed_lr, cfg.embed_wd),
        "head": _adam(cfg, cfg.head_lr, cfg.head_wd),
    }
    used = set(jax.tree.leaves(labels))
    return optax.partition({g: tx for g, tx in transforms.items() if g in used}, labels)


def global_grad_norm(grads: Any) -> jax.Array:
    """torch's total norm: the norm of the per-tensor float32 norms."""
    leaves = jax.tree.leaves(grads)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.linalg.norm(jnp.stack([jnp.linalg.norm(g.ravel().astype(jnp.float32)) for g in leaves]))


def clip_grads_by_global_norm(grads: Any, max_norm: float, total: jax.Array | None = None) -> Any:
    """torch.nn.utils.clip_grad_norm_: scale by max_norm/(norm + 1e-6) when that is < 1.

    `max_norm` is a Python float (a config value); <= 0 disables clipping, as the
    reference skips the call. `total` is `global_grad_norm(grads)` when the caller
    has it already (the train step logs it).
    """
    if max_norm <= 0 or not jax.tree.leaves(grads):
        return grads
    total = global_grad_norm(grads) if total is None else total
    coef = jnp.minimum(max_norm / (total + 1e-6), 1.0)
    return jax.tree.map(lambda g: (g * coef).astype(g.dtype), grads)


def lr_multiplier(
    step: int, elapsed_ms: float, iterations: int, warmdown_iters: int, max_wallclock_seconds: float,
    warmdown_frac: float = 0.0, min_lr: float = 0.0, reserve_seconds: float = 0.0,
) -> float:
    """The schedule's `lr_mul`, host-side (the wall clock is not traceable).

    warmdown_frac = 0 is the reference: a linear warmdown to 0 over the last
    warmdown_iters, counted in iterations without a wall-clock cap, and with one
    over the time those steps are predicted to take at the average step time so
    far. warmdown_frac > 0 is the records' later rule (R0405 on): with training
    fraction f = elapsed / (cap - reserve_seconds) (or step / iterations without
    a cap), lr_mul = (1 - f) / warmdown_frac once f >= 1 - warmdown_frac.
    Either way `min_lr` floors the result (the records' MIN_LR).
    """
    return max(_warmdown(step, elapsed_ms, iterations, warmdown_iters, max_wallclock_seconds,
                         warmdown_frac, reserve_seconds), min_lr)


def training_budget_ms(max_wallclock_seconds: float, reserve_seconds: float = 0.0) -> float:
    """The training loop's time budget: the cap minus the reserve (<= 0: no cap)."""
    if max_wallclock_seconds <= 0:
        return 0.0
    return 1000.0 * max(max_wallclock_seconds - reserve_seconds, 0.0)


def _warmdown(step: int, elapsed_ms: float, iterations: int, warmdown_iters: int,
              max_wallclock_seconds: float, warmdown_frac: float, reserve_seconds: float) -> float:
    budget_ms = training_budget_ms(max_wallclock_seconds, reserve_seconds)
    if warmdown_frac > 0:
        if max_wallclock_seconds > 0:
            frac = elapsed_ms / max(budget_ms, 1e-9)
        else:
            frac = step / max(iterations, 1)
        return max((1.0 - frac) / warmdown_frac, 0.0) if frac >= 1.0 - warmdown_frac else 1.0
    if warmdown_iters <= 0:
        return 1.0
    if max_wallclock_seconds <= 0:
        warmdown_start = max(iterations - warmdown_iters, 0)
        if warmdown_start <= step < iterations:
            return max((iterations - step) / max(warmdown_iters, 1), 0.0)
        return 1.0
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = warmdown_iters * step_ms
    remaining_ms = max(budget_ms - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
