"""Optimizer groups, Adam, LR schedule and grad clipping against the reference's rules."""

from __future__ import annotations

import dataclasses
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golfjax.config import OptimConfig
from golfjax.optim.build import (
    build_optimizer,
    clip_grads_by_global_norm,
    label_groups,
    lr_multiplier,
    param_labels,
)
from golfjax.optim.muon import scale_by_muon

GOLDEN_GROUPS = {"adam_tok_emb": "embed", "muon": "muon", "adam_scalar": "scalar", "adam_head": "head"}


def make_params(V=1024, D=64, H=4, KVD=32, F=128, L=2, S=1, tied=True, seed=0):
    """The parameter tree the model produces (random values, given shapes)."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    params = {
        "tok_emb": {"embedding": r(V, D)},
        "blocks": {
            "attn": {
                "c_q": {"kernel": r(L, D, D)},
                "c_k": {"kernel": r(L, D, KVD)},
                "c_v": {"kernel": r(L, D, KVD)},
                "proj": {"kernel": r(L, D, D)},
                "q_gain": r(L, H),
            },
            "mlp": {"fc": {"kernel": r(L, D, F)}, "proj": {"kernel": r(L, F, D)}},
            "attn_scale": r(L, D),
            "mlp_scale": r(L, D),
            "resid_mix": r(L, 2, D),
        },
        "skip_weights": r(S, D),
    }
    if not tied:
        params["lm_head"] = {"kernel": r(D, V)}
    return params


def reference_names(path: str, num_layers: int) -> list[str]:
    """Our dotted path -> the reference state-dict names it holds."""
    name = path.removesuffix(".kernel").removesuffix(".embedding")
    name = name + ".weight" if name != path else name
    if name.startswith("blocks."):
        return [f"blocks.{layer}.{name[len('blocks.'):]}" for layer in range(num_layers)]
    return [name]


def reference_split(params, tied: bool, num_layers: int) -> dict[str, set[str]]:
    groups = label_groups(param_labels(params, tied))
    return {g: {n for p in paths for n in reference_names(p, num_layers)} for g, paths in groups.items()}


def test_labels_match_golden_optimizer_split(golden_dir):
    golden = json.loads((golden_dir / "golden.json").read_text())
    split = golden["derived"]["optimizer_split"]
    expected = {GOLDEN_GROUPS[k]: set(v) for k, v in split.items() if v}
    assert reference_split(make_params(), tied=True, num_layers=2) == expected


def test_untied_labels_add_head():
    split = reference_split(make_params(tied=False, L=3), tied=False, num_layers=3)
    assert split["head"] == {"lm_head.weight"}
    assert split["embed"] == {"tok_emb.weight"}
    assert "blocks.2.resid_mix" in split["scalar"] and "blocks.2.mlp.fc.weight" in split["muon"]


def test_labels_follow_rules_for_new_params():
    params = make_params(V=8, D=4, H=2, KVD=4, F=8)
    params["blocks"]["mlp"]["gate"] = {"kernel": jnp.zeros((2, 4, 8))}  # per-layer matrix
    params["blocks"]["smear_gate"] = jnp.zeros((2, 4))  # per-layer vector
    params["blocks"]["attn"]["k_gain"] = jnp.zeros((2, 2))
    params["blocks"]["resid_mixes"] = jnp.zeros((2, 3, 4))  # control-named matrix
    params["bigram_scale"] = jnp.zeros(())
    labels = param_labels(params, tie_embeddings=True)
    assert labels["blocks"]["mlp"]["gate"]["kernel"] == "muon"
    assert labels["blocks"]["smear_gate"] == "scalar"
    assert labels["blocks"]["attn"]["k_gain"] == "scalar"
    assert labels["blocks"]["resid_mixes"] == "scalar"
    assert labels["bigram_scale"] == "scalar"
    # eval_shape'd trees work too
    shapes = jax.eval_shape(lambda: params)
    assert param_labels(shapes, True) == labels


def test_record_embedding_tables_train_with_the_token_embedding():
    """BigramHash and value-embedding tables join the token embedding's Adam group (the
    records' split); their projections and scales are scalar-Adam parameters."""
    from golfjax.config import ModelConfig
    from golfjax.model import gpt

    cfg = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1,
                      bigram_buckets=16, bigram_dim=8, ve_dim=8, ve_layers="1")
    params = jax.eval_shape(lambda: gpt.init_params(cfg, jax.random.PRNGKey(0)))
    labels = param_labels(params, tie_embeddings=True)
    assert labels["bigram"]["embed"]["embedding"] == "embed" and labels["ve_shared"]["embed"]["embedding"] == "embed"
    assert labels["bigram"]["proj"]["kernel"] == "scalar" and labels["bigram"]["scale"] == "scalar"
    assert labels["ve_shared"]["proj"]["kernel"] == "scalar" and labels["tok_emb"]["embedding"] == "embed"


def test_labels_reject_inconsistent_trees():
    with pytest.raises(ValueError):
        param_labels(make_params(V=8, D=4, H=2, KVD=4, F=8, tied=False), tie_embeddings=True)
    with pytest.raises(ValueError):
        param_labels(make_params(V=8, D=4, H=2, KVD=4, F=8, tied=True), tie_embeddings=False)
    params = make_params(V=8, D=4, H=2, KVD=4, F=8)
    params["blocks"]["conv"] = {"kernel": jnp.zeros((2, 3, 4, 4))}
    with pytest.raises(ValueError):
        param_labels(params, tie_embeddings=True)


def torch_adam_updates(grads: list[np.ndarray], lr: float, b1: float, b2: float, eps: float) -> list[np.ndarray]:
    """torch.optim.Adam's parameter change per step, in float64."""
    m = v = np.zeros_like(grads[0], np.float64)
    out = []
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step_size = lr / (1 - b1**t)
        denom = np.sqrt(v) / np.sqrt(1 - b2**t) + eps
        out.append(-step_size * m / denom)
    return out


def test_groups_apply_reference_updates_over_three_steps():
    cfg = dataclasses.replace(OptimConfig(), muon_ns_dtype="float32", muon_momentum_warmup_steps=4)
    params = make_params(V=16, D=8, H=2, KVD=4, F=16, tied=False)
    tx = build_optimizer(params, cfg, tie_embeddings=False)
    muon = scale_by_muon(momentum=0.95, warmup_start=0.85, warmup_steps=4, ns_dtype=jnp.float32)
    lr_muls = [0.5, 0.25, 1.0]
    rng = np.random.default_rng(1)

    def random_grad(p):  # magnitudes 1e-9 .. 1: tiny ones are where Adam's eps matters
        return jnp.asarray(rng.normal(size=p.shape) * 10.0 ** rng.integers(-9, 1, p.shape), jnp.float32)

    grads = [jax.tree.map(random_grad, params) for _ in range(3)]

    @jax.jit
    def step(grads, state, muon_state, lr_mul):
        updates, state = tx.update(grads, state, params)
        updates = jax.tree.map(lambda u: u * lr_mul, updates)  # the train step's contract
        muon_dirs, muon_state = muon.update(grads["blocks"]["mlp"]["fc"]["kernel"], muon_state)
        return updates, state, muon_dirs, muon_state

    state, muon_state = tx.init(params), muon.init(params["blocks"]["mlp"]["fc"]["kernel"])
    ours = []
    for g, mul in zip(grads, lr_muls):
        updates, state, muon_dir, muon_state = step(g, state, muon_state, jnp.float32(mul))
        ours.append((updates, muon_dir))

    adam_leaves = {
        ("tok_emb", "embedding"): cfg.embed_lr,
        ("lm_head", "kernel"): cfg.head_lr,
        ("blocks", "resid_mix"): cfg.scalar_lr,
        ("blocks", "attn", "q_gain"): cfg.scalar_lr,
        ("skip_weights",): cfg.scalar_lr,
    }

    def get(tree, keys):
        for k in keys:
            tree = tree[k]
        return tree

    for keys, lr in adam_leaves.items():
        hist = [np.asarray(get(g, keys)) for g in grads]
        for t, mul in enumerate(lr_muls):
            # torch's lr is base_lr * lr_mul of that step; its moments do not depend on lr.
            ref = torch_adam_updates(hist[: t + 1], lr * mul, cfg.beta1, cfg.beta2, cfg.adam_eps)[t]
            # atol at 1e-6 of the step size: float32 rounding where m nearly cancels.
            np.testing.assert_allclose(
                np.asarray(get(ours[t][0], keys)), ref, rtol=2e-6, atol=1e-6 * lr * mul, err_msg=str(keys)
            )
    for t, mul in enumerate(lr_muls):
        np.testing.assert_allclose(
            np.asarray(ours[t][0]["blocks"]["mlp"]["fc"]["kernel"]),
            -cfg.matrix_lr * mul * np.asarray(ours[t][1]),
            rtol=1e-6,
        )


def test_tied_embedding_uses_tied_lr():
    params = {"tok_emb": {"embedding": jnp.zeros((16, 8))}, "skip_weights": jnp.zeros((1, 8))}
    tx = build_optimizer(params, OptimConfig(), tie_embeddings=True)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    # Adam's first step is lr * g/(|g| + eps) ~ lr.
    np.testing.assert_allclose(np.asarray(updates["tok_emb"]["embedding"]), -OptimConfig().tied_embed_lr, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["skip_weights"]), -OptimConfig().scalar_lr, rtol=1e-6)


def test_lr_multiplier_matches_golden_schedule(golden_dir):
    golden = json.loads((golden_dir / "golden.json").read_text())
    hp = golden["hyperparameters"]
    for s in golden["steps"]:
        mul = lr_multiplier(s["step"] - 1, 123.0, hp["iterations"], hp["warmdown_iters"], hp["max_wallclock_seconds"])
        assert mul == s["lr_mul"]


def test_lr_multiplier_by_iterations_and_wallclock():
    by_iters = partial(lr_multiplier, elapsed_ms=0.0, iterations=20000, warmdown_iters=1200, max_wallclock_seconds=0)
    assert by_iters(0) == 1.0
    assert by_iters(18799) == 1.0
    assert by_iters(18800) == 1.0
    assert by_iters(19400) == 0.5
    assert by_iters(19999) == 1 / 1200
    assert by_iters(20000) == 1.0  # outside the loop's range, as the reference
    assert lr_multiplier(5, 0.0, 20000, 0, 0) == 1.0
    assert lr_multiplier(5, 1e9, 20000, 0, 600.0) == 1.0

    by_clock = partial(lr_multiplier, iterations=20000, warmdown_iters=1200, max_wallclock_seconds=600.0)
    # 100 ms/step: warmdown lasts 120 s, starts at 480 s.
    assert by_clock(100, 10_000.0) == 1.0
    assert by_clock(4000, 400_000.0) == 1.0
    assert by_clock(5000, 500_000.0) == pytest.approx(100_000 / 120_000)
    # 400 ms/step: warmdown 480 s; 200 s left.
    assert by_clock(1000, 400_000.0) == pytest.approx(200_000 / 480_000)
    assert by_clock(1600, 640_000.0) == 0.0
    assert by_clock(0, 0.0) == 1.0


def test_clip_grads_by_global_norm_matches_torch_rule():
    grads = {"a": jnp.asarray([3.0, 0.0]), "b": {"c": jnp.asarray([[4.0]])}}  # norm 5
    clip = jax.jit(clip_grads_by_global_norm, static_argnums=1)
    clipped = clip(grads, 1.0)
    coef = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(np.asarray(clipped["a"]), [3.0 * coef, 0.0], rtol=1e-7)
    np.testing.assert_allclose(np.asarray(clipped["b"]["c"]), [[4.0 * coef]], rtol=1e-7)
    unclipped = clip(grads, 10.0)
    np.testing.assert_array_equal(np.asarray(unclipped["a"]), np.asarray(grads["a"]))
    assert clip_grads_by_global_norm(grads, 0.0) is grads
