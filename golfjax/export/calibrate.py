"""GPTQ calibration: token batches, and per-matrix input Hessians from a forward pass (JAX).

GPTQ needs, for every matrix it quantizes, ``H = X^T X / n`` over the
matrix's inputs on calibration tokens. Two sources of tokens (research notes
1.10):

- ``train``: the front of the training stream (the records since R0405 read
  training batches inside the training time budget);
- ``selfgen``: sequences sampled from the trained model itself at a
  temperature, each from a uniformly random first token (R0325: no train or
  validation data touched after training).

The grams come from ``golfjax.model.gpt.matrix_input_grams`` (per-matrix
``x^T x`` summed over tokens, keyed by '/'-joined param paths; the tied
embedding's entry is the output-side gram over the final-norm outputs). They
are returned keyed by the *reference* tensor names the exporter quantizes,
one (in, in) matrix per physical layer.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from golfjax import interop
from golfjax.config import Config
from golfjax.model import gpt

CALIB_SOURCES: tuple[str, ...] = ("train", "selfgen")


def calibration_tokens_train(train_files: Sequence[str | Path], num_tokens: int, seq_len: int) -> np.ndarray:
    """The first ``num_tokens`` tokens of the training stream as (num_tokens // seq_len, seq_len) int32."""
    from golfjax.data.loader import TokenStream

    if seq_len < 1 or num_tokens < seq_len:
        raise ValueError(f"calibration needs at least one sequence: {num_tokens} tokens, seq_len {seq_len}")
    rows = num_tokens // seq_len
    return TokenStream(train_files).take(rows * seq_len).astype(np.int32).reshape(rows, seq_len)


@lru_cache(maxsize=4)
def _sampler(cfg: Config, temperature: float):
    """Jitted (params, buf (B, T) int32, key) -> buf with positions 1..T-1 filled autoregressively.

    Each step runs the model on the whole fixed-shape buffer (positions after
    the current one hold zeros, which causal attention never lets reach it), so
    the whole generation is one compiled loop. Cached per (config, temperature);
    the seed enters through the key, so reseeding does not recompile.
    """

    def step(pos, carry):
        params, buf, key = carry
        logits = gpt.forward(params, cfg.model, buf)  # (B, T, V)
        last = jax.lax.dynamic_index_in_dim(logits, pos, axis=1, keepdims=False)  # (B, V)
        if temperature == 0:
            nxt = jnp.argmax(last, axis=-1)
        else:
            nxt = jax.random.categorical(jax.random.fold_in(key, pos), last / temperature, axis=-1)
        buf = jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(buf.dtype), pos + 1, axis=1)
        return params, buf, key

    @jax.jit
    def run(params, buf, key):
        return jax.lax.fori_loop(0, buf.shape[1] - 1, step, (params, buf, key))[1]

    return run


def calibration_tokens_selfgen(params, cfg: Config, num_seqs: int, seq_len: int, temperature: float = 0.8,
                               seed: int = 0, batch: int = 8) -> np.ndarray:
    """``num_seqs`` sequences of ``seq_len`` tokens sampled from the model, (num_seqs, seq_len) int32.

    Each starts from a uniformly random token; batches of ``batch`` sequences
    share one compiled sampler; the seed fixes the result. Cost: ``seq_len``
    full forward passes per batch (no KV cache), fine on an accelerator, slow
    on a CPU for long sequences.
    """
    if num_seqs < 1 or seq_len < 2 or batch < 1:
        raise ValueError(f"self-generated calibration needs num_seqs >= 1, seq_len >= 2, batch >= 1 "
                         f"(got {num_seqs}, {seq_len}, {batch})")
    if temperature < 0:
        raise ValueError(f"sampling temperature must be >= 0, got {temperature}")
    run = _sampler(cfg, float(temperature))
    key = jax.random.PRNGKey(seed)
    out = []
    for start in range(0, num_seqs, batch):
        b = min(batch, num_seqs - start)
        k_first, k_rest = jax.random.split(jax.random.fold_in(key, start))
        first = jax.random.randint(k_first, (batch,), 0, cfg.model.vocab_size, dtype=jnp.int32)
        buf = jnp.zeros((batch, seq_len), jnp.int32).at[:, 0].set(first)
        out.append(np.asarray(run(params, buf, k_rest))[:b])
    return np.concatenate(out).astype(np.int32)


def grams_to_reference(grams: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """'/'-joined param-path grams -> {reference name: (in, in)}, one per physical layer for blocks."""
    out: dict[str, np.ndarray] = {}
    for key, g in grams.items():
        path = tuple(key.split("/"))
        g = np.asarray(g)
        if path[0] == "blocks":
            if g.ndim != 3 or g.shape[1] != g.shape[2]:
                raise ValueError(f"block gram {key!r} must be (layers, in, in), got {g.shape}")
            for layer in range(g.shape[0]):
                out[interop._reference_name(path, layer)[0]] = g[layer]
        else:
            if g.ndim != 2 or g.shape[0] != g.shape[1]:
                raise ValueError(f"gram {key!r} must be (in, in), got {g.shape}")
            out[interop._reference_name(path, None)[0]] = g
    return out


def _grams_fn():
    fn = getattr(gpt, "matrix_input_grams", None)
    if fn is None:
        raise NotImplementedError("not implemented yet: GPTQ calibration needs golfjax.model.gpt.matrix_input_grams")
    return fn


def collect_hessians(params, cfg: Config, tokens: np.ndarray, batch: int = 8) -> dict[str, np.ndarray]:
    """{reference name: X^T X / n (float32, (in, in))} over calibration ``tokens`` (N, T).

    Grams are summed in float64 on the host over batches of ``batch`` sequences
    and divided by the number of tokens (GPTQ is invariant to the scale of H;
    the division keeps the numbers readable).
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[0] < 1:
        raise ValueError(f"calibration tokens must be (sequences, seq_len), got {tokens.shape}")
    fn = _grams_fn()
    grams = jax.jit(lambda p, t: fn(p, cfg.model, t))
    acc: dict[str, np.ndarray] = {}
    for start in range(0, tokens.shape[0], batch):
        g = jax.device_get(grams(params, jnp.asarray(tokens[start:start + batch])))
        for key, value in g.items():
            value = np.asarray(value, np.float64)
            acc[key] = acc[key] + value if key in acc else value
    n = float(tokens.size)
    return {name: (g / n).astype(np.float32) for name, g in grams_to_reference(acc).items()}


def calibration_tokens(params, cfg: Config, train_files: Sequence[str | Path] | None = None) -> np.ndarray:
    """Calibration tokens from ``cfg.export.quant_calib_*``: ``train`` reads batches x batch tokens,
    ``selfgen`` samples ``quant_calib_selfgen_seqs`` sequences; both cut into ``quant_calib_seq_len``."""
    e = cfg.export
    if e.quant_calib_source not in CALIB_SOURCES:
        raise ValueError(f"unknown calibration source {e.quant_calib_source!r}; known: {', '.join(CALIB_SOURCES)}")
    num_tokens = e.quant_calib_batches * e.quant_calib_batch_tokens
    seq_len = e.quant_calib_seq_len
    if e.quant_calib_source == "selfgen":
        return calibration_tokens_selfgen(params, cfg, e.quant_calib_selfgen_seqs, seq_len,
                                          e.quant_calib_temperature, seed=cfg.train.seed)
    if train_files is None:
        from golfjax.data.shards import ShardError, list_shards

        try:
            train_files = list_shards(cfg.data.data_path, cfg.data.train_pattern)
        except ShardError as exc:
            raise ValueError(f"GPTQ calibration from training data: {exc}; set data.data_path, "
                             "or calibrate on sampled text with export.quant_calib_source=selfgen") from None
    return calibration_tokens_train(train_files, num_tokens, seq_len)


def hessians_for_export(params, cfg: Config, train_files: Sequence[str | Path] | None = None,
                        batch: int = 8) -> dict[str, np.ndarray]:
    """The Hessians ``quant.quantize_state`` needs for GPTQ, from the config's calibration settings."""
    return collect_hessians(params, cfg, calibration_tokens(params, cfg, train_files), batch)
