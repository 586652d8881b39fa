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
    if top == "tok_emb":
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


def _adam(cfg: OptimConfig, lr: float) -> optax.GradientTransformation:
    # optax: (m/bc1) / (sqrt(v/bc2) + eps); torch.optim.Adam: (lr/bc1) m / (sqrt(v)/sqrt(bc2) + eps).
    # Equal formulas (sqrt(v/bc2) = sqrt(v)/sqrt(bc2)); they differ only in rounding.
    return optax.chain(optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=cfg.adam_eps), optax.scale(-lr))


def build_optimizer(params: Any, cfg: OptimConfig, tie_embeddings: bool) -> optax.GradientTransformation:
    """The reference optimizer split as one optax transformation.

    Update contract: the returned updates already include each group's BASE
    learning rate and sign (update = -base_lr * direction). The train step must
    multiply ALL updates by the traced schedule multiplier `lr_mul`
    (`lr_multiplier`) before `optax.apply_updates`. Every group's update is
    proportional to its lr, so this equals the reference's lr = base_lr * lr_mul.
    Muon's momentum warmup lives in the Muon state's own step count.
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
    )
    transforms = {
        "muon": optax.chain(muon, optax.scale(-cfg.matrix_lr)),
        "scalar": _adam(cfg, cfg.scalar_lr),
        "embed": _adam(cfg, cfg.tied_embed_lr if tie_embeddings else cfg.embed_lr),
        "head": _adam(cfg, cfg.head_lr),
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
    step: int, elapsed_ms: float, iterations: int, warmdown_iters: int, max_wallclock_seconds: float
) -> float:
    """The reference's `lr_mul`: linear warmdown to 0 over the last warmdown_iters.

    Without a wall-clock cap the warmdown is counted in iterations; with one, it
    covers the time the last warmdown_iters steps are predicted to take at the
    average step time so far. Host-side: the wall clock is not traceable.
    """
    if warmdown_iters <= 0:
        return 1.0
    if max_wallclock_seconds <= 0:
        warmdown_start = max(iterations - warmdown_iters, 0)
        if warmdown_start <= step < iterations:
            return max((iterations - step) / max(warmdown_iters, 1), 0.0)
        return 1.0
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = warmdown_iters * step_ms
    remaining_ms = max(1000.0 * max_wallclock_seconds - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
