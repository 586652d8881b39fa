"""The model interfaces other modules rely on: forward/token_nll/loss kwargs (qat,
recurrent), matrix_input_grams (GPTQ Hessians), late QAT as a traced switch, and
depth recurrence from the one layer schedule."""

from __future__ import annotations

from dataclasses import replace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golfjax.config import Config
from golfjax.model import gpt
from golfjax.model.layers import Block


def tiny(**kw):
    base = dict(num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, vocab_size=64, compute_dtype="float32")
    base.update(kw)
    return replace(Config().model, **base)


def noisy_params(cfg, seed=0, scale=0.05):
    """Init params plus noise, so zero-initialised projections and gates do something."""
    params = gpt.init_params(cfg, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    return jax.tree.unflatten(tree, [a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def tokens(cfg, batch=2, seq=16, seed=3):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, seq), 0, cfg.vocab_size)


# ----------------------------------------------------------------------------- grams


def brute_force_grams(params, cfg, x) -> dict[str, np.ndarray]:
    """Record every nn.Dense input eagerly (jit off, so scans run as Python loops) by
    intercepting the modules, and sum x^T x in float64 per (physical layer, path)."""
    out: dict[str, np.ndarray] = {}
    layer = [None]

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, Block) and context.method_name == "__call__":
            layer[0] = int(args[2])
        if isinstance(mod, nn.Dense) and context.method_name == "__call__":
            path = mod.path  # e.g. ('attn', 'c_q')
            key = "/".join(("blocks",) + tuple(path) + ("kernel",))
            a = np.asarray(args[0], np.float64).reshape(-1, args[0].shape[-1])
            g = out.setdefault(key, np.zeros((cfg.num_layers, a.shape[1], a.shape[1])))
            g[layer[0]] += a.T @ a
        return next_fun(*args, **kwargs)

    with jax.disable_jit(), nn.intercept_methods(interceptor):
        h = np.asarray(gpt.hidden_states(params, cfg, x), np.float64).reshape(-1, cfg.model_dim)
    out["tok_emb/embedding"] = h.T @ h
    return out


@pytest.mark.parametrize("kw", [
    {},
    dict(recur_first=1, recur_last=2, recur_loops=2, xsa_last_n=2, sparse_attn_gate=True, attn_gate_window=4,
         two_lane_start=3, mlp_act="leaky_relu2", ln_scale=True),
])
def test_matrix_input_grams_equal_brute_force(kw):
    cfg = tiny(**kw)
    params, x = noisy_params(cfg), tokens(cfg)
    grams = jax.jit(lambda p, t: gpt.matrix_input_grams(p, cfg, t))(params, x)
    ref = brute_force_grams(params, cfg, x)
    assert set(ref) <= set(grams)
    for key, want in ref.items():
        assert grams[key].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(grams[key]), want, rtol=2e-5, atol=2e-4, err_msg=key)
    # every 2-D block kernel has a (L, in, in) gram
    for path, leaf in jax.tree_util.tree_flatten_with_path(params["blocks"])[0]:
        if path[-1].key == "kernel":
            key = "blocks/" + "/".join(k.key for k in path)
            assert grams[key].shape == (cfg.num_layers, leaf.shape[1], leaf.shape[1]), key


def test_grams_of_a_looped_layer_sum_its_visits():
    cfg = tiny(recur_first=1, recur_last=1, recur_loops=2)
    params, x = noisy_params(cfg), tokens(cfg)
    looped = jax.jit(lambda p: gpt.matrix_input_grams(p, cfg, x))(params)
    plain = jax.jit(lambda p: gpt.matrix_input_grams(p, cfg, x, recurrent=False))(params)
    key = "blocks/attn/c_q/kernel"
    # layer 0 is visited once in both schedules with the same input
    np.testing.assert_allclose(looped[key][0], plain[key][0], rtol=1e-6)
    # layer 1 three times when looped: its gram grows
    assert float(jnp.trace(looped[key][1])) > 2.0 * float(jnp.trace(plain[key][1]))


def test_grams_of_embedding_side_matrices():
    cfg = tiny(bigram_buckets=16, bigram_dim=8, ve_dim=8, ve_layers="3", smear="v2", smear_window=4)
    params, x = noisy_params(cfg), tokens(cfg)
    grams = jax.jit(lambda p: gpt.matrix_input_grams(p, cfg, x))(params)
    look = np.asarray(params["bigram"]["embed"]["embedding"])[np.asarray(gpt.bigram_buckets(x, 16))].reshape(-1, 8)
    np.testing.assert_allclose(grams["bigram/proj/kernel"], look.T @ look, rtol=1e-5, atol=1e-6)
    ve = np.asarray(params["ve_shared"]["embed"]["embedding"])[np.asarray(x)].reshape(-1, 8)
    np.testing.assert_allclose(grams["ve_shared/proj/kernel"], ve.T @ ve, rtol=1e-5, atol=1e-6)
    assert grams["smear_gate/kernel"].shape == (4, 4)


# ----------------------------------------------------------------------------- late QAT


def test_fake_quantize_is_on_the_int_grid_with_straight_through_gradient():
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 8))
    q = gpt.fake_quantize(w, 6)
    scale = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / 31
    ints = q / scale
    np.testing.assert_allclose(ints, jnp.round(ints), atol=1e-4)
    ints = jnp.round(ints)
    assert float(ints.min()) >= -32 and float(ints.max()) <= 31 and float(jnp.max(jnp.abs(ints))) == 31
    assert 0 < float(jnp.max(jnp.abs(q - w))) <= float(jnp.max(scale)) / 2 + 1e-6
    g = jax.grad(lambda w: jnp.sum(gpt.fake_quantize(w, 6) * 3.0))(w)
    np.testing.assert_array_equal(g, jnp.full_like(w, 3.0))


def test_qat_is_a_traced_switch_that_changes_the_jitted_forward():
    cfg = tiny(qat_bits=4, qat_lr_threshold=0.15)
    params, x = noisy_params(cfg), tokens(cfg)
    f = jax.jit(lambda p, q: gpt.loss(p, cfg, x, x, qat=q))
    off, on = f(params, jnp.asarray(False)), f(params, jnp.asarray(True))
    assert f._cache_size() == 1  # one compiled program serves both values of the switch
    assert abs(float(on) - float(off)) > 1e-4
    plain = jax.jit(lambda p: gpt.loss(p, cfg, x, x))
    np.testing.assert_allclose(off, plain(params), rtol=1e-6)
    # on == the plain forward of explicitly fake-quantized block matrices
    qparams = dict(params, blocks=gpt.qat_blocks(params["blocks"], cfg, True))
    np.testing.assert_allclose(on, plain(qparams), rtol=1e-6)
    assert not np.array_equal(qparams["blocks"]["attn"]["c_q"]["kernel"], params["blocks"]["attn"]["c_q"]["kernel"])
    np.testing.assert_array_equal(qparams["blocks"]["attn_scale"], params["blocks"]["attn_scale"])
    # a traced lr-threshold switch inside jit, as the train step uses it
    g = jax.jit(lambda p, lr_mul: gpt.loss(p, cfg, x, x, qat=lr_mul < cfg.qat_lr_threshold))
    np.testing.assert_allclose(g(params, 0.1), on, rtol=1e-6)
    np.testing.assert_allclose(g(params, 0.5), off, rtol=1e-6)


def test_qat_off_by_default():
    cfg = tiny()
    params, x = noisy_params(cfg), tokens(cfg)
    f = jax.jit(lambda p, q: gpt.loss(p, cfg, x, x, qat=q))
    np.testing.assert_array_equal(f(params, True), f(params, False))


# ----------------------------------------------------------------------------- recurrence


def test_layer_schedule_loops_the_range():
    cfg = tiny(num_layers=11, recur_first=3, recur_last=5, recur_loops=2)
    s = gpt.layer_schedule(cfg)
    assert s.layers == (0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10)
    assert s.encoder == (0, 1, 2, 3, 4, 5, 3, 4) and s.num_skips == 8
    assert s.decoder_with_skip + s.decoder_tail == (5, 3, 4, 5, 6, 7, 8, 9, 10)
    assert gpt.layer_schedule(cfg, recurrent=False).layers == tuple(range(11))
    assert gpt.layer_schedule(replace(cfg, recur_loops=0)).layers == tuple(range(11))


def test_recurrence_adds_compute_not_block_parameters():
    from golfjax.plan import dot_flops

    cfg = tiny(recur_first=1, recur_last=2, recur_loops=1)
    plain_cfg = replace(cfg, recur_loops=0)
    p, p0 = gpt.init_params(cfg, jax.random.PRNGKey(0)), gpt.init_params(plain_cfg, jax.random.PRNGKey(0))
    assert jax.tree.map(jnp.shape, p["blocks"]) == jax.tree.map(jnp.shape, p0["blocks"])
    # only the U-Net skip vectors are sized for the longer schedule (as the records count them)
    extra = gpt.layer_schedule(cfg).num_skips - gpt.layer_schedule(plain_cfg).num_skips
    assert gpt.count_params(p) - gpt.count_params(p0) == extra * cfg.model_dim
    x = tokens(cfg)
    flops = lambda rec: dot_flops(jax.make_jaxpr(lambda q: gpt.loss(q, cfg, x, x, recurrent=rec))(p))
    assert flops(True) > flops(False) * 1.3


def test_shared_block_gradient_is_the_sum_over_its_visits():
    cfg = tiny(recur_first=1, recur_last=2, recur_loops=1)  # schedule 0,1,2,1,2,3
    sched = gpt.layer_schedule(cfg).layers
    params, x = noisy_params(cfg), tokens(cfg)
    untied_cfg = replace(cfg, num_layers=len(sched), recur_loops=0)
    untied = dict(params, blocks=jax.tree.map(lambda a: a[np.asarray(sched)], params["blocks"]))
    l_tied, g_tied = jax.jit(jax.value_and_grad(lambda p: gpt.loss(p, cfg, x, x)))(params)
    l_untied, g_untied = jax.jit(jax.value_and_grad(lambda p: gpt.loss(p, untied_cfg, x, x)))(untied)
    np.testing.assert_allclose(l_tied, l_untied, rtol=1e-6)
    onehot = np.zeros((cfg.num_layers, len(sched)), np.float32)
    onehot[np.asarray(sched), np.arange(len(sched))] = 1
    summed = jax.tree.map(lambda g: jnp.tensordot(onehot, g, axes=1), g_untied["blocks"])
    for a, b in zip(jax.tree.leaves(g_tied["blocks"]), jax.tree.leaves(summed)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_qat_training_shrinks_the_export_roundtrip_gap():
    """Small CPU run: trained with int4 QAT, the model loses less when its block matrices
    go through the exporter's int4 row-max quantizer than the same model trained without."""
    import optax

    from golfjax.export.quant import QuantRule, dequantize_tensor, quantize_tensor

    cfg = tiny(num_layers=2, vocab_size=32, qat_bits=4)
    rng = np.random.default_rng(0)
    perm, walk = rng.permutation(32), [0]
    for _ in range(8 * 33 - 1):  # a mostly deterministic walk: learnable in a few steps
        walk.append(int(perm[walk[-1]]) if rng.random() < 0.9 else int(rng.integers(32)))
    data = jnp.asarray(np.asarray(walk).reshape(8, 33))
    x, y = data[:, :-1], data[:, 1:]
    tx = optax.adam(3e-2)

    @jax.jit
    def step(p, s, qat):
        g = jax.grad(lambda q: gpt.loss(q, cfg, x, y, qat=qat))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    def exported(p):
        rule = QuantRule(bits=4, clip="rowmax")

        def one(path, w):
            name = "blocks/" + "/".join(k.key for k in path)
            if not gpt.is_qat_matrix(name, w):
                return w
            return jnp.stack([dequantize_tensor(quantize_tensor(np.asarray(w[i]).T, rule)).T
                              for i in range(w.shape[0])])

        return dict(p, blocks=jax.tree_util.tree_map_with_path(one, p["blocks"]))

    loss = jax.jit(lambda p: gpt.loss(p, cfg, x, y))
    gaps = {}
    for qat in (False, True):
        p = gpt.init_params(cfg, jax.random.PRNGKey(0))
        s = tx.init(p)
        for _ in range(120):
            p, s = step(p, s, jnp.asarray(qat))
        gaps[qat] = float(loss(exported(p))) - float(loss(p))
    assert gaps[False] > 1e-4, gaps  # the probe can fail: int4 costs a model trained without QAT
    assert gaps[True] < 0.5 * gaps[False], gaps
