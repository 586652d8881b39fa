"""Per-document LoRA test-time training (R0413 / TOP, research/record-stack.md 1.13).

Documents are `[BOS_i, BOS_i+1]` (the next BOS is the last target). They are
sorted by length and processed longest-first in batches of `ttt_lora_docs`,
each document with its own LoRA. A document's targets are cut into chunks of
`ttt_lora_chunk` predictions; for chunk k the model runs on the window of the
same document that ends at the chunk's last target (at most seq_len inputs,
never crossing the document start). In one forward/backward the chunk's NLLs
are recorded (the score) and the gradient of their mean is taken; the Adam
step comes after, so a chunk is always scored with weights that have seen
only earlier chunks of its own document. The last chunk of a document is never
trained on.

LoRA sits on q, k, v (the attention's input projections), on the attention
output (a parallel path from the attention input), in parallel to the MLP
(from the MLP's normed input) and on the head (from the final hidden state).
The block adapters are per *virtual* layer, as in the records: with depth
recurrence every visit of a shared block has its own q, k, v, out and MLP
adapters (17 sets for TOP's schedule); without recurrence virtual = physical.
A is uniform +-1/sqrt(in), B is zero, so a fresh LoRA is the base model
exactly. The adapters enter the unchanged model code as `gpt.VIRTUAL_BLOCKS`
params (merged into the block's params at each visit) and are added by a
`flax.linen.intercept_methods` hook: the base forward is `golfjax.model.gpt`'s own.

Phased TTT (`ttt_variant=phased`): after each of `ttt_phase_docs` fully scored
documents (counted in queue order at batch ends), full-model SGD runs on those
documents, packed in queue order with attention masked at every BOS
(`phase_model`, `phase_training_tokens`): a training window never sees another
document, as the records' varlen global TTT. Then the queue resumes on the
updated base model.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from golfjax.config import EvalConfig, ModelConfig
from golfjax.eval.mix import PositionMix, ScoringOrder
from golfjax.eval.sliding import Totals, device_mix, document_segments
from golfjax.model import gpt
from golfjax.model.layers import MLP, CausalSelfAttention
from golfjax.parallel import put_replicated, replicated, to_host


def lora_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every adapted projection of one block, and of the head."""
    d = cfg.model_dim
    kv = cfg.num_kv_heads * (d // cfg.num_heads)
    return {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "mlp": (d, d), "head": (d, cfg.vocab_size)}


def num_virtual_layers(cfg: ModelConfig) -> int:
    """Length of the (recurrent) layer schedule the evaluation runs: one adapter set per entry."""
    return len(gpt.layer_schedule(cfg, recurrent=True).layers)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))  # one compiled program instead of eager ops per batch
def init_lora(cfg: ModelConfig, rank: int, docs: int, key: jax.Array) -> dict:
    """{name: {"a": (docs, [virtual layers,] in, r), "b": zeros (docs, [virtual layers,] r, out)}};
    the head has no layer axis."""
    out = {}
    layers = num_virtual_layers(cfg)
    for i, (name, (fan_in, fan_out)) in enumerate(lora_shapes(cfg).items()):
        lead = (docs,) if name == "head" else (docs, layers)
        bound = 1.0 / np.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), lead + (fan_in, rank), jnp.float32, -bound, bound)
        out[name] = {"a": a, "b": jnp.zeros(lead + (rank, fan_out), jnp.float32)}
    return out


def _lora_apply(x, ab, scale):
    """x (docs, T, in) through a per-document adapter (docs, in, r), (docs, r, out)."""
    a, b = ab["a"], ab["b"]
    h = jnp.einsum("bti,bir->btr", x.astype(jnp.float32), a)
    return (scale * jnp.einsum("btr,bro->bto", h, b)).astype(x.dtype)


def _interceptor(scale: float):
    """Adds the adapters found in a module's params (put there by `lora_forward`)."""
    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        mod = context.module
        params = mod.variables.get("params", {})
        if isinstance(mod, nn.Dense) and "lora" in params:
            return out + _lora_apply(args[0], params["lora"], scale)
        if isinstance(mod, (CausalSelfAttention, MLP)) and "lora" in params:
            return out + _lora_apply(args[0], params["lora"], scale)
        return out
    return intercept


def lora_forward(params, lora: dict, cfg: ModelConfig, x, scale: float):
    """Soft-capped logits (docs, T, V) of the base model plus every document's adapters."""
    def layer_first(ab):  # (docs, virtual layers, ...) -> (virtual layers, docs, ...), sliced per visit
        return {k: jnp.swapaxes(t, 0, 1) for k, t in ab.items()}

    attn = {key: {"lora": layer_first(lora[name])} for name, key in (("q", "c_q"), ("k", "c_k"), ("v", "c_v"))}
    attn["lora"] = layer_first(lora["o"])
    per_visit = {"attn": attn, "mlp": {"lora": layer_first(lora["mlp"])}}
    merged = {**params, gpt.VIRTUAL_BLOCKS: per_visit}
    with nn.intercept_methods(_interceptor(scale)):
        h = gpt.hidden_states(merged, cfg, x)
    if cfg.tie_embeddings:
        w = params["tok_emb"]["embedding"].astype(h.dtype).T
    else:
        w = params["lm_head"]["kernel"].astype(h.dtype)
    z = (h @ w).astype(jnp.float32) + _lora_apply(h, lora["head"], scale).astype(jnp.float32)
    return cfg.logit_softcap * jnp.tanh(z / cfg.logit_softcap)


def _nll(logits, y):
    logz = jax.nn.logsumexp(logits, axis=-1)
    return logz - jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]


def make_lora_steps(cfg: ModelConfig, ecfg: EvalConfig, mesh: Mesh, seq_len: int, steps: int,
                    combine: Callable | None = None):
    """Jitted scan of `steps` chunk steps for one batch of documents:
    (lora, adam, t, params, stream, doc_start, doc_targets, k0[, mix arrays])
    -> (lora, adam, t, score NLL (S, D, L), pos (S, D, L)).

    With a PositionMix `combine` the score is the mixed NLL (the mix arrays gathered at the
    scored positions); the LoRA still trains on the network's own NLL."""
    scale = ecfg.ttt_lora_alpha / ecfg.ttt_lora_rank if ecfg.ttt_lora_alpha else 1.0
    adamw = (ecfg.ttt_lora_beta1, ecfg.ttt_lora_beta2, ecfg.ttt_lora_wd, ecfg.ttt_lora_lr)
    return _lora_steps(cfg, mesh, seq_len, steps, ecfg.ttt_lora_chunk, scale, adamw, combine)


def _mixed(logits, nll, y, pos, scored, arrays, combine: Callable):
    """The PositionMix blend of the network's NLL (mix arrays gathered at pos; row 0 where unscored)."""
    query_ids, side = arrays
    at = jnp.where(scored, pos, 0)
    qlogp = jnp.take_along_axis(logits, query_ids[at], axis=-1) - jax.nn.logsumexp(logits, axis=-1)[..., None]
    return combine(nll, qlogp, {k: v[at] for k, v in side.items()}, y)


@functools.lru_cache(maxsize=4)  # keyed by what the compiled steps depend on, not the whole EvalConfig
def _lora_steps(cfg: ModelConfig, mesh: Mesh, seq_len: int, steps: int, cs: int, scale: float, adamw: tuple,
                combine: Callable | None = None):
    (b1, b2, wd, lr), eps = adamw, 1e-10
    j = jnp.arange(seq_len)

    def step(carry, k):
        lora, m, v, t, params, stream, start, n_tgt, arrays = carry
        n_chunks = -(-n_tgt // cs)
        active = k < n_chunks  # (docs,)
        e = start + jnp.minimum((k + 1) * cs, n_tgt)  # last target position of chunk k
        ws = jnp.maximum(start, e - seq_len)  # window start (inputs), never before the document
        idx = ws[:, None] + j
        valid = idx < e[:, None]
        x = jnp.where(valid, stream[idx], 0)
        y = jnp.where(valid, stream[idx + 1], 0)
        pos = idx + 1
        scored = valid & (pos >= (start + 1 + k * cs)[:, None]) & active[:, None]

        def loss(lo):
            logits = lora_forward(params, lo, cfg, x, scale)
            nll = _nll(logits, y)
            per_doc = jnp.sum(jnp.where(scored, nll, 0.0), axis=1) / jnp.maximum(jnp.sum(scored, axis=1), 1)
            return jnp.sum(per_doc), (nll, logits)

        (_, (nll, logits)), g = jax.value_and_grad(loss, has_aux=True)(lora)  # the score: before the update
        if combine is not None:
            nll = _mixed(logits, nll, y, pos, scored, arrays, combine)
        train = active & (k < n_chunks - 1)  # never the document's last chunk
        t = t + train.astype(jnp.int32)

        def upd(p, m_, v_, g_):
            shape = (-1,) + (1,) * (p.ndim - 1)
            tr = train.reshape(shape)
            tt = jnp.maximum(t, 1).reshape(shape).astype(jnp.float32)
            m_new = b1 * m_ + (1 - b1) * g_
            v_new = b2 * v_ + (1 - b2) * g_ * g_
            mhat = m_new / (1 - b1**tt)
            vhat = v_new / (1 - b2**tt)
            p_new = p - lr * (mhat / (jnp.sqrt(vhat) + eps) + wd * p)
            return (jnp.where(tr, p_new, p), jnp.where(tr, m_new, m_), jnp.where(tr, v_new, v_))

        lora, m, v = (jax.tree.map(lambda *a, i=i: upd(*a)[i], lora, m, v, g) for i in range(3))
        return (lora, m, v, t, params, stream, start, n_tgt, arrays), (nll, jnp.where(scored, pos, 0))

    def run(lora, m, v, t, params, stream, start, n_tgt, k0, arrays=None):
        carry = (lora, m, v, t, params, stream, start, n_tgt, arrays)
        carry, outs = jax.lax.scan(step, carry, k0 + jnp.arange(steps))
        return carry[:4], outs

    rep = replicated(mesh)
    return jax.jit(run, in_shardings=rep, out_shardings=rep)


def doc_batches(tokens: np.ndarray, bos_id: int, docs_per_batch: int) -> list[np.ndarray]:
    """Document segments (start, last target) sorted longest-first, in batches."""
    seg = document_segments(tokens, bos_id)
    order = np.argsort(-(seg[:, 1] - seg[:, 0]), kind="stable")
    seg = seg[order]
    return [seg[i : i + docs_per_batch] for i in range(0, len(seg), docs_per_batch)]


def lora_scoring_order(tokens: np.ndarray, bos_id: int, docs_per_batch: int, chunk: int) -> ScoringOrder:
    """The order in which `evaluate_lora_ttt` scores the targets: batch by batch (queue order),
    within a batch chunk step by chunk step, within a step document by document (batch rows),
    within a document chunk position by position. Each target's context starts at its document's
    BOS. Nothing in a score depends on a token later in this order: a document's LoRA sees only its
    own earlier chunks, the base weights (phases, warm-started A) only earlier batches; so the n-gram
    may learn from the targets in exactly this order (`golfjax.eval.ngram`, `scoring=`)."""
    batches = doc_batches(tokens, bos_id, docs_per_batch)
    if not batches:
        return ScoringOrder(np.zeros(0, np.int64), np.zeros(0, np.int64))
    seg = np.concatenate(batches)
    batch_of = np.repeat(np.arange(len(batches), dtype=np.int64), [len(b) for b in batches])
    row_of = np.concatenate([np.arange(len(b), dtype=np.int64) for b in batches])
    n_tgt = seg[:, 1] - seg[:, 0]
    doc = np.repeat(np.arange(len(seg)), n_tgt)
    offset = np.arange(int(n_tgt.sum()), dtype=np.int64) - np.repeat(np.cumsum(n_tgt) - n_tgt, n_tgt)
    k = offset // chunk
    n_k = int(k.max()) + 1
    key = (batch_of[doc] * n_k + k) * docs_per_batch + row_of[doc]
    order = np.argsort(key, kind="stable")  # equal keys keep increasing positions
    return ScoringOrder((seg[doc, 0] + 1 + offset)[order], seg[doc, 0][order])


def phase_training_tokens(tokens: np.ndarray, docs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, targets and target positions of the scored documents `docs` ((start, last target)
    segments, in queue order), packed one after the other: document i gives inputs
    tokens[start:last] and targets tokens[start+1:last+1], so every target is its own document's
    (the last one is the next BOS, or the stream's last token) and every document's inputs
    start at its BOS."""
    tokens = np.asarray(tokens)
    parts = [(tokens[a:b], tokens[a + 1 : b + 1], np.arange(a + 1, b + 1)) for a, b in docs]
    if not parts:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64)
    x, y, pos = (np.concatenate(p) for p in zip(*parts))
    return x.astype(np.int32), y.astype(np.int32), pos


def phase_model(cfg: ModelConfig, bos_id: int) -> ModelConfig:
    """The model the global SGD phase trains: the evaluated model with attention masked at every
    BOS (`doc_mask`), so packed training sequences never attend across a document boundary
    (the records' varlen attention, GLOBAL_TTT_RESPECT_DOC_BOUNDARIES=1). Context read from the
    previous token outside attention (BigramHash at BOS, SmearGate without its BOS fix) is the
    model's own and not cut here."""
    return dataclasses.replace(cfg, doc_mask=True, doc_bos_id=bos_id)


def phase_sgd(params, cfg: ModelConfig, ecfg: EvalConfig, tokens: np.ndarray, docs, mesh: Mesh, seq_len: int,
              bos_id: int = 1):
    """Phased TTT's pause: full-model SGD on already scored documents, packed in queue order with
    document-masked attention (`phase_model`). Returns the new params."""
    from golfjax.eval.ttt import global_sgd

    x, y, _ = phase_training_tokens(tokens, docs)
    return global_sgd(params, phase_model(cfg, bos_id), ecfg, x, y, mesh, seq_len, ecfg.ttt_phase_lr,
                      ecfg.ttt_phase_epochs)


def evaluate_lora_ttt(params, cfg: ModelConfig, ecfg: EvalConfig, tokens: np.ndarray, position_bytes: np.ndarray,
                      mesh: Mesh, seq_len: int, bos_id: int = 1, record: bool = False, progress: bool = True,
                      timings: dict | None = None, seed: int = 0, mix: PositionMix | None = None,
                      order: ScoringOrder | None = None) -> Totals:
    """Score every target once with per-document LoRA TTT; totals in stream units.

    mix: a PositionMix built in `lora_scoring_order` (given as `order`; required with a mix):
    the scores are the mixed NLLs, and the targets are checked to be scored in that order."""
    t0 = time.perf_counter()
    D, S = ecfg.ttt_lora_docs, ecfg.ttt_lora_steps_per_call
    if mix is not None and order is None:
        raise ValueError("LoRA TTT with a PositionMix needs the ScoringOrder it was built in")
    batches = doc_batches(tokens, bos_id, D)
    pad = seq_len + 2
    stream = put_replicated(np.concatenate([np.asarray(tokens, np.int32), np.zeros(pad, np.int32)]), mesh)
    arrays, combine = device_mix(mix, mesh)
    run = make_lora_steps(cfg, ecfg, mesh, seq_len, S, combine)
    cursor = 0  # entries of `order` scored so far
    key = jax.random.PRNGKey(seed)
    lora = init_lora(cfg, ecfg.ttt_lora_rank, D, key)
    totals = Totals(positions=[] if record else None, nlls=[] if record else None)
    seen = np.zeros(len(tokens), np.int32)
    t_compile = 0.0
    phases = [int(x) for x in ecfg.ttt_phase_docs.split(",") if x.strip()] if ecfg.ttt_variant == "phased" else []
    scored_docs: list[np.ndarray] = []  # segments fully scored so far, in queue order
    t_phases = 0.0
    for bi, seg in enumerate(tqdm(batches, desc="lora-ttt", unit="docs", disable=None if progress else True,
                                  leave=False)):
        n = len(seg)
        start = np.zeros(D, np.int32)
        n_tgt = np.zeros(D, np.int32)  # padding documents have no targets
        start[:n], n_tgt[:n] = seg[:, 0], seg[:, 1] - seg[:, 0]
        if bi == 0 or not ecfg.ttt_lora_warm_a:  # fresh A and B (R0413)
            lora = init_lora(cfg, ecfg.ttt_lora_rank, D, jax.random.fold_in(key, bi))
        else:  # warm-start A (TOP): keep A, zero B
            lora = {name: {"a": ab["a"], "b": jnp.zeros_like(ab["b"])} for name, ab in lora.items()}
        zeros = jax.tree.map(jnp.zeros_like, lora)
        # on the mesh as the step's outputs are: the same input shardings, one compiled program
        state = put_replicated((lora, zeros, zeros, jnp.zeros(D, jnp.int32)), mesh)
        chunks = int(-(-n_tgt.max() // ecfg.ttt_lora_chunk))
        for k0 in range(0, chunks, S):
            tc = time.perf_counter()
            state, (nll, pos) = run(*state, params, stream, start, n_tgt, np.int32(k0), arrays)
            if bi == 0 and k0 == 0:
                jax.block_until_ready(nll)
                t_compile = time.perf_counter() - tc
            nll, pos = to_host(nll), to_host(pos)
            for s in range(nll.shape[0]):  # chunk steps in order; rows are documents
                scored = pos[s] > 0
                np.add.at(seen, pos[s][scored], 1)
                if order is not None:  # rows in order, positions increasing: the documented order
                    got = pos[s][scored]
                    if not np.array_equal(got, order.positions[cursor : cursor + got.size]):
                        raise AssertionError(f"LoRA TTT scored out of its ScoringOrder after {cursor} targets")
                    cursor += got.size
                totals.add(nll[s], pos[s], scored, position_bytes)
        lora = state[0]
        scored_docs.extend(seg)
        while phases and len(scored_docs) >= phases[0]:  # pause: global SGD on scored documents only
            tp = time.perf_counter()
            docs = scored_docs[: phases.pop(0)]
            if not np.all(seen[phase_training_tokens(tokens, docs)[2]] == 1):
                raise AssertionError("phased TTT: the global SGD would train on a target not scored yet")
            params = phase_sgd(params, cfg, ecfg, tokens, docs, mesh, seq_len, bos_id)
            t_phases += time.perf_counter() - tp
    if not (seen[0] == 0 and np.all(seen[1:] == 1)):
        raise AssertionError(f"LoRA TTT scored positions {int(seen.min())}..{int(seen.max())} times")
    if timings is not None:
        timings["first_call_with_compile"] = t_compile
        timings["global_sgd_phases"] = t_phases
        timings["ttt_loop"] = time.perf_counter() - t0
    return totals
