"""Each record-stack model technique asserts its defining property on tiny shapes
(../shared/research/record-stack.md 1.2-1.5)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golfjax.config import Config, ConfigError, validate
from golfjax.model import gpt
from golfjax.model.layers import (GPTJ, LANES, MLP, SERIAL, Block, CausalSelfAttention, apply_partial_rotary,
                                  apply_rotary, attention_core, exclusive_self_attention, mlp_activation,
                                  rms_norm, rope_base, rotary_tables)
from golfjax.model.naming import is_control_tensor

from test_model_interfaces import noisy_params, tiny, tokens


def dense_inputs(fn):
    """Run fn() and return {module path: input} of every nn.Dense call."""
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            seen["/".join(context.module.path)] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        out = fn()
    return out, seen


# ----------------------------------------------------------------------------- attention


def test_xsa_output_is_orthogonal_to_own_value_vector_per_kv_group():
    ks = jax.random.split(jax.random.PRNGKey(0), 2)
    y = jax.random.normal(ks[0], (2, 5, 6, 8))  # 6 heads over 2 KV heads (group 3)
    v = jax.random.normal(ks[1], (2, 5, 2, 8))
    out = exclusive_self_attention(y, v)
    for h in range(6):
        vn = v[:, :, h // 3] / jnp.linalg.norm(v[:, :, h // 3], axis=-1, keepdims=True)
        np.testing.assert_allclose(jnp.sum(out[:, :, h] * vn, -1), 0.0, atol=1e-5)
        # and only that component was removed
        np.testing.assert_allclose(out[:, :, h], y[:, :, h] - jnp.sum(y[:, :, h] * vn, -1, keepdims=True) * vn,
                                   atol=1e-5)


def test_xsa_layers_are_the_last_n():
    cfg = tiny(num_layers=3, xsa_last_n=2)
    assert [gpt.layer_xsa(cfg, i) for i in range(3)] == [False, True, True]
    assert all(gpt.layer_xsa(replace(cfg, xsa_last_n=3), i) for i in range(3))
    params, x = noisy_params(cfg), tokens(cfg)
    f = jax.jit(lambda p, c: gpt.loss(p, c, x, x), static_argnums=1)
    assert abs(float(f(params, cfg)) - float(f(params, replace(cfg, xsa_last_n=0)))) > 1e-5


def test_partial_rope_leaves_unrotated_dims_position_invariant():
    seq, rd, hd = 12, 4, 16
    x = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(1), (1, 1, 2, hd)), (1, seq, 2, hd))
    cos, sin = rotary_tables(seq, rd, 10000.0)
    out = apply_partial_rotary(x, cos, sin)
    np.testing.assert_array_equal(out[..., rd:], x[..., rd:])  # no position in dims rd..hd
    assert float(jnp.max(jnp.abs(out[:, 1:, :, :rd] - out[:, :1, :, :rd]))) > 1e-2  # rotated dims move
    np.testing.assert_allclose(out[..., :rd], apply_rotary(x[..., :rd], cos, sin))
    full = rotary_tables(seq, hd, 10000.0)
    np.testing.assert_array_equal(apply_partial_rotary(x, *full), apply_rotary(x, *full))


def test_rope_ntk_base_rescale():
    assert rope_base(1e4, 16, 2048, 1024) == pytest.approx(1e4 * 2 ** (16 / 14))  # ~22,080 (R0321)
    assert rope_base(1e4, 16, 2048, 2048) == 1e4 and rope_base(1e4, 16, 4096, 0) == 1e4


def test_attention_gates_at_init_and_mutual_exclusion():
    cfg = tiny(compute_dtype="float32")
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, cfg.model_dim))

    def attn_out(c):
        mod = CausalSelfAttention(c, jnp.float32, "xla")
        p = mod.init(jax.random.PRNGKey(1), x)["params"]
        p = dict(p, proj={"kernel": jax.random.normal(jax.random.PRNGKey(2), p["proj"]["kernel"].shape)})
        return mod.apply({"params": p}, x), p

    plain, _ = attn_out(cfg)
    out_gate, p = attn_out(replace(cfg, attn_out_gate=True, attn_gate_window=4))
    assert p["attn_gate"]["kernel"].shape == (4, cfg.num_heads)
    np.testing.assert_allclose(out_gate, plain, atol=1e-6)  # 2*sigmoid(0) = 1
    sparse, p = attn_out(replace(cfg, sparse_attn_gate=True, attn_gate_window=4, sparse_attn_gate_scale=0.5))
    np.testing.assert_allclose(sparse, 0.5 * plain, atol=1e-6)  # sigmoid(0) = 0.5
    gated, p = attn_out(replace(cfg, gated_attn=True, gated_attn_init_std=0.005))
    assert p["attn_gate"]["kernel"].shape == (cfg.model_dim, cfg.num_heads)
    assert 0.001 < float(jnp.std(p["attn_gate"]["kernel"])) < 0.01
    assert is_control_tensor("blocks.attn.attn_gate.kernel")
    with pytest.raises(ConfigError, match="mutually exclusive"):
        validate(replace(Config(), model=replace(Config().model, gated_attn=True, sparse_attn_gate=True)))


@pytest.mark.parametrize("impl", ["blocked", "xla"])
def test_document_masked_attention_equals_per_document_attention(impl):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (1, 20, 4, 8))
    k = jax.random.normal(ks[1], (1, 20, 2, 8))
    v = jax.random.normal(ks[2], (1, 20, 2, 8))
    seg = jnp.asarray([[0] * 7 + [1] * 9 + [2] * 4])
    if impl == "blocked":
        from golfjax.model.layers import blocked_causal_attention
        out = blocked_causal_attention(q, k, v, block=8, segments=seg)
    else:
        out = attention_core(q, k, v, impl, seg)
    for a, b in [(0, 7), (7, 16), (16, 20)]:
        alone = attention_core(q[:, a:b], k[:, a:b], v[:, a:b], "xla")
        np.testing.assert_allclose(out[:, a:b], alone, atol=1e-5)


# ----------------------------------------------------------------------------- documents


def _doc_probe(cfg, seed=0):
    """Max change of the logits of document 2 when document 1's tokens change."""
    bos = cfg.doc_bos_id
    t = np.array(tokens(cfg, batch=1, seq=16, seed=5))
    t[t == bos] = bos + 1
    t[0, 0], t[0, 8] = bos, bos  # document 1 = 0..7, document 2 = 8..15
    t2 = t.copy()
    changed = (t[0, 1:8] + 7) % cfg.vocab_size
    t2[0, 1:8] = np.where(changed == bos, bos + 2, changed)
    params = noisy_params(cfg, seed, scale=0.2)
    f = jax.jit(lambda p, x: gpt.forward(p, cfg, x))
    a, b = f(params, jnp.asarray(t)), f(params, jnp.asarray(t2))
    return float(jnp.max(jnp.abs(a[:, 8:] - b[:, 8:]))), float(jnp.max(jnp.abs(a[:, 1:8] - b[:, 1:8])))


@pytest.mark.parametrize("smear", ["v1", "v2"])
def test_no_token_sees_the_previous_document(smear):
    cfg = tiny(doc_mask=True, smear=smear, smear_bos_fix=True, smear_window=4)
    across, within = _doc_probe(cfg)
    assert across == 0.0 and within > 1e-3
    # the probe fails without either fix
    assert _doc_probe(replace(cfg, smear_bos_fix=False))[0] > 1e-4
    assert _doc_probe(replace(cfg, doc_mask=False))[0] > 1e-4


def test_smear_formulas():
    cfg = tiny(smear="v1")
    params = noisy_params(cfg)
    t = tokens(cfg, batch=1, seq=6)
    e = rms_norm(params["tok_emb"]["embedding"][t])
    s = jax.nn.sigmoid(params["smear"]["gate"])
    want = (1 - s) * e + s * jnp.concatenate([jnp.zeros_like(e[:, :1]), e[:, :-1]], axis=1)
    np.testing.assert_allclose(gpt.embed(params, cfg, t), want, atol=1e-6)
    cfg2 = tiny(smear="v2", smear_window=4)
    p2 = gpt.init_params(cfg2, jax.random.PRNGKey(0))
    assert p2["smear_gate"]["kernel"].shape == (4, 1) and float(p2["smear_lambda"][0]) == 0.0
    np.testing.assert_array_equal(gpt.embed(p2, cfg2, t), rms_norm(p2["tok_emb"]["embedding"][t]))  # identity at init


# ----------------------------------------------------------------------------- embeddings


def test_bigram_hash_buckets_and_zero_output_at_init():
    t = jnp.asarray([[5, 9, 1000, 3]])
    b = np.asarray(gpt.bigram_buckets(t, 2048))
    want = [2047] + [((36313 * c) ^ (27191 * p)) % 2047 for p, c in [(5, 9), (9, 1000), (1000, 3)]]
    assert b.tolist() == [want]
    cfg = tiny(bigram_buckets=32, bigram_dim=8)
    p = gpt.init_params(cfg, jax.random.PRNGKey(0))
    assert float(p["bigram"]["scale"][0]) == pytest.approx(0.05) and not p["bigram"]["embed"]["embedding"].any()
    x = tokens(cfg)
    base = dict(p)
    del base["bigram"]
    embed = jax.jit(gpt.embed, static_argnums=1)
    np.testing.assert_array_equal(embed(p, cfg, x), embed(base, replace(cfg, bigram_buckets=0), x))
    g = jax.jit(jax.grad(lambda q: gpt.loss(q, cfg, x, x)))(p)
    assert float(jnp.abs(g["bigram"]["embed"]["embedding"]).sum()) > 0


def test_value_embeddings_enter_v_of_their_layers_only():
    cfg = tiny(ve_dim=8, ve_layers="2,3")
    p = noisy_params(cfg)
    assert p["ve_shared"]["proj"]["kernel"].shape == (8, 16) and p["ve_layer_scales"].shape == (2,)
    p["ve_shared"] = dict(p["ve_shared"], scale=jnp.asarray([5.0]))  # a value embedding that matters
    x = tokens(cfg)
    f = jax.jit(lambda q, c: gpt.loss(q, c, x, x), static_argnums=1)
    without = {k: v for k, v in p.items() if k not in ("ve_shared", "ve_layer_scales")}
    off = f(without, replace(cfg, ve_dim=0, ve_layers=""))
    assert abs(float(f(p, cfg)) - float(off)) > 1e-4
    np.testing.assert_allclose(f(dict(p, ve_layer_scales=jnp.zeros(2)), cfg), off, rtol=1e-6)
    # layer 2 alone (scale of layer 3 zero) differs from both
    only2 = float(f(dict(p, ve_layer_scales=jnp.asarray([1.0, 0.0])), cfg))
    assert abs(only2 - float(off)) > 1e-5 and abs(only2 - float(f(p, cfg))) > 1e-5
    g = jax.grad(lambda q: f(q, cfg))(p)
    assert float(jnp.abs(g["ve_layer_scales"]).min()) > 0


def test_orthogonal_init_of_large_matrices():
    cfg = tiny(model_dim=64, num_heads=4, num_kv_heads=4, ortho_init=True)
    p = gpt.init_params(cfg, jax.random.PRNGKey(0))
    w = p["blocks"]["attn"]["c_q"]["kernel"][0]
    np.testing.assert_allclose(w.T @ w, np.eye(64), atol=1e-5)
    assert not p["blocks"]["attn"]["proj"]["kernel"].any()  # zero-init projections stay zero


ORTHO_INIT_IN_A_TWO_THREAD_PROCESS = """
import os
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])  # XLA:CPU sizes its pool from this
from dataclasses import replace
import jax
from golfjax.config import Config
from golfjax.model import gpt
cfg = replace(Config().model, num_layers=9, model_dim=512, num_heads=8, num_kv_heads=4, vocab_size=64,
              ortho_init=True, compute_dtype="float32")
for seed in range(3):
    jax.block_until_ready(gpt.init_params(cfg, jax.random.PRNGKey(seed)))
print("initialised")
"""


def test_orthogonal_init_of_a_layer_stack_finishes_on_two_threads():
    """Regression: the layers' orthogonal inits as one batched QR each (vmap) ran as
    LAPACK kernels that wait on XLA:CPU's thread pool for their batch items; two at
    once on a 2-thread pool waited on each other forever (3 of 3 runs hung)."""
    try:
        # one CPU device: with the suite's 8 virtual devices XLA's pool has room and never hung
        env = dict(os.environ, XLA_FLAGS="")
        out = subprocess.run([sys.executable, "-c", ORTHO_INIT_IN_A_TWO_THREAD_PROCESS], capture_output=True,
                             text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("init_params with ortho_init did not finish in 240 s (deadlock)")
    assert out.returncode == 0 and "initialised" in out.stdout, out.stderr[-2000:]


# ----------------------------------------------------------------------------- blocks


def test_leaky_relu_squared():
    h = jnp.asarray([-2.0, -1.0, 0.0, 3.0])
    np.testing.assert_allclose(mlp_activation("leaky_relu2", h), [1.0, 0.25, 0.0, 9.0])
    np.testing.assert_allclose(mlp_activation("relu2", h), [0.0, 0.0, 0.0, 9.0])


def _block_and_params(cfg, seed=0):
    blk = gpt.make_block(cfg)
    x = jax.random.normal(jax.random.PRNGKey(seed), (1, 6, cfg.model_dim))
    p = noisy_params(cfg, seed, scale=0.1)["blocks"]
    return blk, jax.tree.map(lambda a: a[0], p), x


@pytest.mark.parametrize("layer", [0, 3])
def test_ln_scale_is_one_over_sqrt_layer_plus_one(layer):
    cfg = tiny(ln_scale=True)
    blk, p, x = _block_and_params(cfg)
    x0 = jnp.zeros_like(x)
    _, seen = dense_inputs(lambda: blk.apply({"params": p}, x, x0, layer))
    mixed = p["resid_mix"][0] * x
    np.testing.assert_allclose(seen["attn/c_q"], rms_norm(mixed) / np.sqrt(layer + 1), rtol=1e-5, atol=1e-6)


def test_skip_gates_at_init_mix_half_and_half():
    cfg = tiny(num_layers=2, skip_gates=True)
    p = noisy_params(cfg)
    p = dict(p, skip_gates=jnp.zeros_like(p["skip_gates"]))  # the init value
    assert not gpt.init_params(cfg, jax.random.PRNGKey(0))["skip_gates"].any()
    x = tokens(cfg)
    blk = gpt.make_block(cfg)
    layer = lambda i: jax.tree.map(lambda a: a[i], p["blocks"])
    x0 = gpt.embed(p, cfg, x)
    e = blk.apply({"params": layer(0)}, x0, x0, 0)
    skip = p["skip_weights"][0] * e
    want = rms_norm(blk.apply({"params": layer(1)}, 0.5 * skip + 0.5 * e, x0, 1))  # lerp(w*skip, x, 1/2)
    np.testing.assert_allclose(gpt.hidden_states(p, cfg, x), want, atol=1e-5)


def test_gptj_parallel_block_reads_one_input():
    cfg = tiny()
    blk, p, x = _block_and_params(cfg)
    x0 = jax.random.normal(jax.random.PRNGKey(9), x.shape)
    out, seen = dense_inputs(lambda: blk.apply({"params": p}, x, x0, 0, mode=GPTJ))
    np.testing.assert_allclose(seen["mlp/fc"], seen["attn/c_q"], atol=1e-6)
    xin = p["resid_mix"][0] * x + p["resid_mix"][1] * x0
    attn = CausalSelfAttention(cfg, jnp.float32, blk.attention_impl).apply({"params": p["attn"]}, rms_norm(xin))
    mlp = MLP(cfg.model_dim, gpt.mlp_hidden(cfg)).apply({"params": p["mlp"]}, rms_norm(xin))
    np.testing.assert_allclose(out, xin + p["attn_scale"] * attn + p["mlp_scale"] * mlp, atol=1e-5)
    _, serial = dense_inputs(lambda: blk.apply({"params": p}, x, x0, 0, mode=SERIAL))
    assert float(jnp.max(jnp.abs(serial["mlp/fc"] - serial["attn/c_q"]))) > 1e-3


def test_two_lane_block_routing_formula():
    cfg = tiny(two_lane_start=0)
    blk, p, x = _block_and_params(cfg)
    lane1 = jax.random.normal(jax.random.PRNGKey(7), x.shape)
    x0 = jax.random.normal(jax.random.PRNGKey(9), x.shape)
    r = jnp.asarray([1.1, 0.9])
    P = jnp.asarray([[1.0, 0.5], [0.25, 2.0]])  # P[source (attn, mlp), lane]
    l0, l1 = blk.apply({"params": p}, (x, lane1), x0, 0, mode=LANES, lane_lambdas=(r, P))
    xin = p["resid_mix"][0] * x + p["resid_mix"][1] * x0
    a = p["attn_scale"] * CausalSelfAttention(cfg, jnp.float32, blk.attention_impl).apply(
        {"params": p["attn"]}, rms_norm(xin))
    m = p["mlp_scale"] * MLP(cfg.model_dim, gpt.mlp_hidden(cfg)).apply({"params": p["mlp"]}, rms_norm(lane1))
    np.testing.assert_allclose(l0, 1.1 * x + a + 0.25 * m, atol=1e-5)
    np.testing.assert_allclose(l1, 0.9 * lane1 + 0.5 * a + 2.0 * m, atol=1e-5)


def test_two_lane_params_and_final_mean():
    cfg = tiny(num_layers=4, two_lane_start=2)
    p = gpt.init_params(cfg, jax.random.PRNGKey(0))
    assert p["parallel_post_lambdas"].shape == (4, 2, 2) and float(p["parallel_resid_lambdas"][0, 0]) == \
        pytest.approx(1.1)
    assert is_control_tensor("parallel_post_lambdas") and is_control_tensor("parallel_resid_lambdas")
    assert [gpt.layer_mode(cfg, i) for i in range(4)] == [SERIAL, SERIAL, LANES, LANES]
    x = tokens(cfg)
    g = jax.jit(jax.grad(lambda q: gpt.loss(q, cfg, x, x)))(noisy_params(cfg))
    assert float(jnp.abs(g["parallel_post_lambdas"][2:]).min()) > 0  # used in layers 2, 3
    assert not g["parallel_post_lambdas"][:2].any()  # not in serial layers
    with pytest.raises(ConfigError, match="mutually exclusive"):
        validate(replace(Config(), model=replace(Config().model, parallel_start=7, two_lane_start=8)))


def test_every_small_option_tensor_is_a_control_tensor():
    cfg = tiny(skip_gates=True, bigram_buckets=16, bigram_dim=8, smear="v2", ve_dim=8, ve_layers="3",
               sparse_attn_gate=True, two_lane_start=2)
    p = gpt.init_params(cfg, jax.random.PRNGKey(0))
    names = [jax.tree_util.keystr(path, simple=True, separator=".")
             for path, _ in jax.tree_util.tree_flatten_with_path(p)[0]]
    small = [n for n in names if n.split(".")[0] in ("skip_gates", "smear_gate", "smear_lambda", "ve_layer_scales",
                                                     "parallel_post_lambdas", "parallel_resid_lambdas")
             or n in ("bigram.scale", "ve_shared.scale", "blocks.attn.attn_gate.kernel")]
    assert len(small) == 9
    assert all(is_control_tensor(n) for n in small)
    assert not is_control_tensor("bigram.proj.kernel") and not is_control_tensor("blocks.attn.c_q.kernel")
