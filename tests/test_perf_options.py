"""The CPU fast paths equal the plain ones: blocked causal attention vs
jax.nn.dot_product_attention, and the unrolled layer scan vs the rolled one."""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golfjax.config import Config
from golfjax.model import gpt
from golfjax.model.layers import blocked_causal_attention


@pytest.mark.parametrize("seq,heads,kv,block", [(64, 4, 2, 16), (50, 4, 4, 16), (32, 2, 1, 64)])
def test_blocked_attention_equals_xla(seq, heads, kv, block):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (2, seq, heads, 8))
    k = jax.random.normal(ks[1], (2, seq, kv, 8))
    v = jax.random.normal(ks[2], (2, seq, kv, 8))
    g = jax.random.normal(ks[3], (2, seq, heads, 8))
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    ours = lambda q, k, v: blocked_causal_attention(q, k, v, block)
    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), rtol=0, atol=1e-6)
    grad = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * g), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(grad(ours), grad(ref)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_blocked_attention_bfloat16_close_to_xla():
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    q, k, v = (jax.random.normal(kk, (1, 48, 2, 16)).astype(jnp.bfloat16) for kk in ks)
    ours = blocked_causal_attention(q, k, v, 16)
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(ours), np.float32(ref), rtol=0, atol=2e-2)


def test_unrolled_stack_equals_rolled(monkeypatch):
    cfg = replace(Config().model, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2, vocab_size=64,
                  compute_dtype="float32")
    params = gpt.init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.PRNGKey(2), a.shape), params)
    x = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, 64)
    f = lambda p: jax.value_and_grad(lambda p: gpt.loss(p, cfg, x, x))(p)
    unrolled = jax.jit(f)(params)
    monkeypatch.setattr(gpt, "MAX_UNROLLED_LAYERS", 0)
    rolled = jax.jit(f)(params)
    for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(rolled)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_auto_attention_is_blocked_on_cpu():
    if jax.default_backend() == "cpu":
        assert gpt.resolve_attention_impl("auto", jnp.float32) == "blocked"
    assert gpt.resolve_attention_impl("xla", jnp.float32) == "xla"
