"""Autoregressive text generation from a trained model (no KV cache).

Each new token comes from one forward pass over a fixed-shape window of the
context, so the model is compiled once per window length and never per token:

- while the context (BOS + prompt + generated so far) fits in the model's
  `train_seq_len`, it is padded on the right to the smallest *bucket* (powers
  of two from 64, and train_seq_len itself) that holds it, and the logits are
  read at the last real position; causal attention keeps the padding from
  influencing them. At most log2(train_seq_len / 64) + 2 compilations;
- past train_seq_len, the window rolls: the last train_seq_len tokens (the
  rotary positions are relative, so a shifted window is what training saw).

Sampling: temperature 0 is greedy argmax; otherwise softmax(logits / T),
optionally restricted to the top-k logits, with the key
`fold_in(PRNGKey(seed), i)` for the i-th new token, so a seed fixes the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from golfjax.config import Config
from golfjax.model import gpt

MIN_BUCKET = 64


def window_buckets(seq_len: int, min_bucket: int | None = None) -> tuple[int, ...]:
    """Window lengths a context is padded to: powers of two >= min_bucket below
    seq_len, then seq_len."""
    sizes, b = [], min_bucket or MIN_BUCKET
    while b < seq_len:
        sizes.append(b)
        b *= 2
    return tuple(sizes) + (seq_len,)


def context_window(tokens: Sequence[int], seq_len: int, buckets: Sequence[int]) -> tuple[np.ndarray, int]:
    """(window (1, W) int32, index of the last real token in it) for a context."""
    n = len(tokens)
    if n == 0:
        raise ValueError("the context must hold at least one token (BOS)")
    if n >= seq_len:
        return np.asarray(tokens[-seq_len:], np.int32)[None], seq_len - 1
    width = next(b for b in buckets if b >= n)
    window = np.zeros((1, width), np.int32)
    window[0, :n] = tokens
    return window, n - 1


@lru_cache(maxsize=8)
def make_token_picker(cfg: Config, temperature: float, top_k: int) -> Callable:
    """Jitted (params, window, pos, key) -> next token id (int32 scalar); cached, so
    repeated generations with the same settings reuse the compiled windows."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no top-k cut), got {top_k}")
    vocab = cfg.model.vocab_size
    k = min(top_k, vocab)

    @jax.jit
    def pick(params, window, pos, key):
        logits = gpt.forward(params, cfg.model, window)[0]  # (W, V)
        logits = jax.lax.dynamic_index_in_dim(logits, pos, axis=0, keepdims=False)
        if temperature == 0:
            return jnp.argmax(logits).astype(jnp.int32)
        logits = logits / temperature
        if k:
            kth = jax.lax.top_k(logits, k)[0][-1]
            logits = jnp.where(logits >= kth, logits, -jnp.inf)
        return jax.random.categorical(key, logits).astype(jnp.int32)

    return pick


def generate(params, cfg: Config, context: Sequence[int], num_tokens: int, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0) -> list[int]:
    """`num_tokens` new token ids continuing `context` (which should start with BOS)."""
    if num_tokens < 0:
        raise ValueError(f"the number of tokens must be >= 0, got {num_tokens}")
    tokens = [int(t) for t in context]
    vocab = cfg.model.vocab_size
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"context token ids {bad[:5]} are outside the model's vocabulary [0, {vocab})")
    seq_len = cfg.train.train_seq_len
    buckets = window_buckets(seq_len)
    pick = make_token_picker(cfg, float(temperature), int(top_k))
    base = jax.random.PRNGKey(seed)
    new: list[int] = []
    for i in range(num_tokens):
        window, pos = context_window(tokens, seq_len, buckets)
        tok = int(pick(params, jnp.asarray(window), jnp.int32(pos), jax.random.fold_in(base, i)))
        tokens.append(tok)
        new.append(tok)
    return new


@dataclass(frozen=True)
class Sample:
    prompt_ids: list[int]  # BOS + encoded prompt
    new_ids: list[int]
    text: str  # prompt + decoded continuation


def sample_text(params, cfg: Config, sp, prompt: str = "", num_tokens: int = 100, temperature: float = 1.0,
                top_k: int = 0, seed: int = 0) -> Sample:
    """Encode BOS + prompt with SentencePiece `sp`, generate, decode."""
    bos = sp.bos_id()
    if bos < 0:
        raise ValueError("the tokenizer has no BOS id; the challenge's shards start every document with BOS")
    prompt_ids = [bos] + list(sp.encode(prompt))
    new = generate(params, cfg, prompt_ids, num_tokens, temperature, top_k, seed)
    return Sample(prompt_ids, new, sp.decode(prompt_ids[1:] + new))
