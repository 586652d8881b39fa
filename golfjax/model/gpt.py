"""The GPT of the reference: embedding, U-Net block stack, tied head, softcap.

Blocks are stacked `(L, ...)` params run by `lax.scan` over a *layer schedule*:
a tuple of physical layer indices, one per virtual layer. The first half of the
virtual layers is the encoder (each pushes its output as a skip), the second
half the decoder (its i-th layer first adds `skip_weights[i] * skips.pop()`).
The baseline schedule is `range(num_layers)`; depth recurrence later repeats
indices in the same schedule, so there is one code path for every stack.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from golfjax.config import ModelConfig
from golfjax.model.layers import Block, rms_norm

Array = jax.Array
Params = dict


@dataclass(frozen=True)
class Schedule:
    """Which physical block runs at each virtual layer, split for the U-Net skips."""

    layers: tuple[int, ...]

    @property
    def num_encoder(self) -> int:
        return len(self.layers) // 2

    @property
    def num_skips(self) -> int:
        return min(self.num_encoder, len(self.layers) - self.num_encoder)

    @property
    def encoder(self) -> tuple[int, ...]:
        return self.layers[: self.num_encoder]

    @property
    def decoder_with_skip(self) -> tuple[int, ...]:
        return self.layers[self.num_encoder : self.num_encoder + self.num_skips]

    @property
    def decoder_tail(self) -> tuple[int, ...]:
        return self.layers[self.num_encoder + self.num_skips :]


def layer_schedule(cfg: ModelConfig) -> Schedule:
    return Schedule(tuple(range(cfg.num_layers)))


def resolve_compute_dtype(name: str) -> jnp.dtype:
    """'auto' means bfloat16 on accelerators and float32 on CPU."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def resolve_attention_impl(name: str, dtype) -> str | None:
    """cuDNN fused attention needs a GPU and 16-bit inputs; golfjax's causal-blocked
    attention on CPU (about 2x faster there than XLA's masked full square); XLA
    everywhere else."""
    if name == "auto":
        backend = jax.default_backend()
        if backend == "cpu":
            return "blocked"
        use_cudnn = backend == "gpu" and jnp.dtype(dtype).itemsize == 2
        return "cudnn" if use_cudnn else "xla"
    return name


def mlp_hidden(cfg: ModelConfig) -> int:
    return int(cfg.mlp_mult * cfg.model_dim)


def make_block(cfg: ModelConfig) -> Block:
    dtype = resolve_compute_dtype(cfg.compute_dtype)
    return Block(
        dim=cfg.model_dim,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        mlp_hidden=mlp_hidden(cfg),
        rope_base=cfg.rope_base,
        qk_gain_init=cfg.qk_gain_init,
        dtype=dtype,
        attention_impl=resolve_attention_impl(cfg.attention_impl, dtype),
    )


def init_params(cfg: ModelConfig, key: Array) -> Params:
    """Fresh float32 params with the reference's initialisation."""
    k_emb, k_blocks, k_head = jax.random.split(key, 3)
    block = make_block(cfg)
    dummy = jnp.zeros((1, 2, cfg.model_dim), jnp.float32)
    init_one = lambda k: block.init(k, dummy, dummy)["params"]
    blocks = jax.vmap(init_one)(jax.random.split(k_blocks, cfg.num_layers))
    emb_std = cfg.tied_embed_init_std if cfg.tie_embeddings else 1.0
    params = {
        "tok_emb": {"embedding": emb_std * jax.random.normal(k_emb, (cfg.vocab_size, cfg.model_dim), jnp.float32)},
        "blocks": blocks,
        "skip_weights": jnp.ones((layer_schedule(cfg).num_skips, cfg.model_dim), jnp.float32),
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": jnp.zeros((cfg.model_dim, cfg.vocab_size), jnp.float32)}
    return params


# Stacks up to this many virtual layers are unrolled (faster on CPU; compile time
# grows with the unrolled length, so long recurrent schedules stay rolled).
MAX_UNROLLED_LAYERS = 16


def _run_stack(block: Block, blocks: Params, layers: tuple[int, ...], x: Array, x0: Array,
               skips: Array | None = None, skip_weights: Array | None = None) -> tuple[Array, Array]:
    """Scan `layers` (physical indices) over x; optionally add weighted skips first.

    Returns the final x and the stacked per-layer outputs (the encoder's skips).
    """
    if not layers:
        return x, x[None][:0]
    idx = jnp.asarray(np.asarray(layers, dtype=np.int32))

    def body(h, inputs):
        i = inputs[0]
        if skips is not None:
            h = h + inputs[2].astype(h.dtype) * inputs[1]
        p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), blocks)
        h = block.apply({"params": p}, h, x0)
        return h, h

    xs = (idx,) if skips is None else (idx, skips, skip_weights)
    # Unrolled, the layer index of each step is a constant: XLA slices the
    # stacked params statically and keeps each layer's residuals in its own
    # buffer instead of dynamic-update-slicing them into scan-stacked arrays.
    unroll = len(layers) <= MAX_UNROLLED_LAYERS
    return jax.lax.scan(body, x, xs, unroll=unroll)


def hidden_states(params: Params, cfg: ModelConfig, tokens: Array) -> Array:
    """Final-normed hidden states (B, T, D) of the U-Net block stack."""
    dtype = resolve_compute_dtype(cfg.compute_dtype)
    block = make_block(cfg)
    sched = layer_schedule(cfg)
    x = rms_norm(jnp.take(params["tok_emb"]["embedding"], tokens, axis=0)).astype(dtype)
    x0 = x
    x, enc_out = _run_stack(block, params["blocks"], sched.encoder, x, x0)
    n = sched.num_skips
    skips = enc_out[::-1][:n]
    x, _ = _run_stack(block, params["blocks"], sched.decoder_with_skip, x, x0,
                      skips=skips, skip_weights=params["skip_weights"][:n])
    x, _ = _run_stack(block, params["blocks"], sched.decoder_tail, x, x0)
    return rms_norm(x)


def logits_from_hidden(params: Params, cfg: ModelConfig, h: Array) -> Array:
    """Head projection (tied or untied) and softcap, returned in float32."""
    if cfg.tie_embeddings:
        w = params["tok_emb"]["embedding"].astype(h.dtype).T
    else:
        w = params["lm_head"]["kernel"].astype(h.dtype)
    z = (h @ w).astype(jnp.float32)
    return cfg.logit_softcap * jnp.tanh(z / cfg.logit_softcap)


def forward(params: Params, cfg: ModelConfig, tokens: Array) -> Array:
    """Soft-capped float32 logits (B, T, V) for int tokens (B, T)."""
    return logits_from_hidden(params, cfg, hidden_states(params, cfg, tokens))


def token_nll(params: Params, cfg: ModelConfig, x: Array, y: Array) -> Array:
    """Per-token negative log-likelihood in nats, float32, shape (B, T)."""
    logits = forward(params, cfg, x)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, y[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return logz - picked


def loss(params: Params, cfg: ModelConfig, x: Array, y: Array) -> Array:
    """Mean cross-entropy over all tokens, as the reference's training loss."""
    return jnp.mean(token_nll(params, cfg, x, y))


def count_params(params: Params) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))
