"""Score-first TTT: every target scored once, scored before any adaptation that uses it,
and with the weights adapted only on earlier chunks."""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest

from golfjax.config import EvalConfig
from golfjax.eval.sliding import flat_segments, make_windows
from golfjax.eval.ttt import check_ttt_shapes, plan_chunks
from tests.test_eval_sliding import MODEL, SEQ, run, setup  # noqa: F401  (session fixture)

CHUNK = 256
TTT = dict(eval_mode="ttt", eval_stride=16, ttt_chunk_tokens=CHUNK, ttt_batch_seqs=2, ttt_epochs=2, ttt_lr=0.05,
           ttt_chunks_per_call=2)
N = 5 * CHUNK + 70  # 6 chunks, the last one partial


def nll_by_position(report, n):
    pos, nll = report.info["per_position"]
    out = np.full(n, np.nan)
    out[pos] = nll
    return out


@pytest.fixture(scope="module")
def ttt_runs(setup):  # noqa: F811
    """TTT, TTT on a stream changed from q on, and plain sliding (no adaptation)."""
    tokens = setup[2][:N].copy()
    q = 2 * CHUNK + 100  # inside chunk 2
    changed = tokens.copy()
    changed[q:] = (changed[q:].astype(np.int64) * 7 + 3) % 1000 + 8
    ttt = run(setup, tokens, **TTT)
    ttt_changed = run(setup, changed, **TTT)
    sliding = run(setup, tokens, eval_mode="sliding", eval_stride=16)
    return tokens, q, ttt, ttt_changed, sliding


def test_ttt_scores_every_target_once_with_the_right_bytes(setup, ttt_runs):  # noqa: F811
    """(c) count check against the stream length; bytes as the plain sliding evaluator's."""
    tokens, _, ttt, _, sliding = ttt_runs
    pos, _ = ttt.info["per_position"]
    np.testing.assert_array_equal(pos, np.arange(1, len(tokens)))  # once each, in stream order
    assert ttt.tokens_scored == len(tokens) - 1
    assert ttt.bytes == sliding.bytes
    assert ttt.info["chunks"] == 6 and ttt.info["trained_chunks"] == 5


def test_first_chunk_is_scored_before_any_adaptation(ttt_runs):
    """Chunk 0 is scored with the untouched weights (it equals sliding); later chunks are
    scored with adapted weights (they differ), so adaptation did happen in between."""
    tokens, _, ttt, _, sliding = ttt_runs
    a, b = nll_by_position(ttt, len(tokens)), nll_by_position(sliding, len(tokens))
    np.testing.assert_allclose(a[1 : CHUNK + 1], b[1 : CHUNK + 1], rtol=1e-6, atol=1e-6)
    later = slice(CHUNK + 1, None)
    assert np.mean(np.abs(a[later] - b[later])) > 1e-3
    assert ttt.val_loss != sliding.val_loss


def test_no_token_reaches_the_weights_before_it_is_scored(ttt_runs):
    """(b) Tokens from q (inside chunk 2) on are changed. Every score before q, including
    chunk 2's own scores before q, is unchanged: chunk 2 was scored before training on it,
    and no weight used by chunks 0..2 saw a token at or after q. Chunk 3 on changes, since
    those weights were adapted on the changed chunk 2."""
    tokens, q, ttt, ttt_changed, _ = ttt_runs
    a, b = nll_by_position(ttt, len(tokens)), nll_by_position(ttt_changed, len(tokens))
    np.testing.assert_array_equal(a[1:q], b[1:q])
    assert np.all(a[3 * CHUNK + 1 :] != b[3 * CHUNK + 1 :])


def test_plan_trains_each_chunk_after_scoring_it_and_never_the_last():
    """Instrumented plan: what chunk c trains on is a subset of what chunks <= c scored."""
    n = 5 * CHUNK + 70
    win = make_windows(flat_segments(n), SEQ, 16)
    plan = plan_chunks(win, n - 1, CHUNK, rows=4)
    scored = np.zeros(n, bool)
    for c in range(plan.n_chunks):
        ids = plan.window_ids[c][plan.window_ids[c] >= 0]
        lo, hi = plan.chunk_positions(c)
        touched = [(max(win.scored_lo[w], lo), min(win.scored_hi[w], hi)) for w in ids]
        for a, b in touched:
            scored[a : b + 1] = True
        assert scored[1 : hi + 1].all() and not scored[hi + 1 :].any()
        trained = plan.trained_positions(c)
        if trained is not None:
            assert scored[trained[0] : trained[1] + 1].all()
    assert plan.train.tolist() == [True] * 5 + [False]
    assert plan.lr_scale[0] == 1.0 and abs(plan.lr_scale[-1]) < 1e-7


def test_full_last_chunk_is_not_trained_and_shapes_are_checked():
    win = make_windows(flat_segments(2 * CHUNK + 1), SEQ, 16)
    assert plan_chunks(win, 2 * CHUNK, CHUNK, rows=4).train.tolist() == [True, False]
    with pytest.raises(ValueError, match="multiple"):
        check_ttt_shapes(EvalConfig(ttt_chunk_tokens=100), 64)
    with pytest.raises(ValueError, match="divide"):
        check_ttt_shapes(EvalConfig(ttt_chunk_tokens=5 * 64, ttt_batch_seqs=2), 64)


def test_phased_needs_its_boundaries():
    from golfjax.config import ConfigError, resolve

    with pytest.raises(ConfigError, match="ttt_phase_docs"):
        resolve(None, ["eval.ttt_variant=phased"])
    with pytest.raises(ConfigError, match="increasing"):
        resolve(None, ["eval.ttt_variant=phased", "eval.ttt_phase_docs=20,10"])


def test_frozen_blocks_do_not_move(setup):  # noqa: F811
    """ttt_freeze_blocks=k: the first k physical blocks keep their weights; others adapt."""
    import jax

    from golfjax.eval.evaluator import Evaluator
    from golfjax.eval.ttt import evaluate_ttt
    from golfjax.parallel import make_mesh, put_replicated
    from tests.test_eval_sliding import eval_config

    sp, tables, tokens, params = setup
    tokens = tokens[: 2 * CHUNK + 1]
    cfg = eval_config(**{**TTT, "ttt_freeze_blocks": 1})
    mesh = make_mesh(jax.devices()[:1])
    ev = Evaluator(cfg, mesh, tables, progress=False)
    from golfjax.eval.evaluator import position_bytes

    _, _, adapted = evaluate_ttt(put_replicated(params, mesh), cfg.model, cfg.eval, tokens,
                                 position_bytes(tokens, tables), ev.windows(tokens), mesh, progress=False)
    for before, after in zip(jax.tree.leaves(params["blocks"]), jax.tree.leaves(adapted["blocks"])):
        np.testing.assert_array_equal(np.asarray(after)[0], np.asarray(before)[0])
    moved = [np.abs(np.asarray(a)[1] - np.asarray(b)[1]).max() for b, a in
             zip(jax.tree.leaves(params["blocks"]), jax.tree.leaves(adapted["blocks"]))]
    assert max(moved) > 0
    assert np.abs(np.asarray(adapted["tok_emb"]["embedding"]) - params["tok_emb"]["embedding"]).max() > 0


# ---------------------------------------------------------------- a tiny model in every mode
#
# A tiny model (vocabulary 32, two 32-wide layers, perturbed so that attention and every LoRA
# adapter matter) over six short documents; bytes from tables where BOS counts 0 and some tokens
# carry a leading space. For each mode: every target is scored once with the independently counted
# bytes, and (a) the score of a target never changes when any non-BOS token after it *in the order
# of scoring* changes (document boundaries are structure known up front, as in the records).

TINY_V = 32
TINY = replace(MODEL, vocab_size=TINY_V, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
TINY_RECURRENT = replace(TINY, recur_first=1, recur_last=1, recur_loops=1)
TINY_LORA = dict(eval_mode="ttt", ttt_variant="lora", ttt_lora_rank=2, ttt_lora_docs=2, ttt_lora_chunk=8,
                 ttt_lora_steps_per_call=4, ttt_lora_lr=0.02)
TINY_PHASED = dict(TINY_LORA, ttt_variant="phased", ttt_phase_docs="2,4", ttt_phase_lr=0.05, ttt_phase_epochs=1,
                   ttt_chunk_tokens=64, ttt_batch_seqs=2)
TINY_FULL = dict(eval_mode="ttt", eval_stride=8, ttt_chunk_tokens=64, ttt_batch_seqs=2, ttt_epochs=1, ttt_lr=0.05,
                 ttt_chunks_per_call=2)
MODES = {  # name: (model, eval fields, ngram fields)
    "plain": (TINY, dict(eval_mode="plain"), {}),
    "sliding": (TINY, dict(eval_mode="sliding", eval_stride=8), {}),
    "sliding-docs": (TINY, dict(eval_mode="sliding", eval_stride=8, eval_doc_isolated=True), {}),
    "sliding+ngram-interp": (TINY, dict(eval_mode="sliding+ngram", eval_stride=8), dict(ngram_mode="interp")),
    "sliding+ngram-tilt": (TINY, dict(eval_mode="sliding+ngram", eval_stride=8), dict(ngram_mode="tilt")),
    "ttt-full": (TINY, TINY_FULL, {}),
    "ttt+ngram-full": (TINY, dict(TINY_FULL, eval_mode="ttt+ngram"), dict(ngram_mode="interp")),
    "ttt-lora": (TINY, TINY_LORA, {}),
    "ttt-lora-recurrent": (TINY_RECURRENT, TINY_LORA, {}),
    "ttt+ngram-lora-interp": (TINY, dict(TINY_LORA, eval_mode="ttt+ngram"), dict(ngram_mode="interp")),
    "ttt+ngram-lora-tilt": (TINY_RECURRENT, dict(TINY_LORA, eval_mode="ttt+ngram"), dict(ngram_mode="tilt")),
    "ttt-phased": (TINY, TINY_PHASED, {}),
    "ttt+ngram-phased": (TINY, dict(TINY_PHASED, eval_mode="ttt+ngram"), dict(ngram_mode="interp")),
}
NGRAM_ORDERS = {"interp": "1,2,3", "tilt": "2:4:1"}


def tiny_stream() -> np.ndarray:
    """Six documents (BOS = 1) that repeat one phrase with changes: the n-gram has work to do."""
    rng = np.random.default_rng(11)
    phrase = rng.integers(2, TINY_V, 40)
    docs = []
    for n in (70, 45, 90, 30, 64, 54):  # 353 tokens: whole plain sequences of 32, plus one
        body = np.tile(phrase, 4)[rng.integers(0, 40) :][: n - 1].copy()
        flip = rng.random(n - 1) < 0.1
        body[flip] = rng.integers(2, TINY_V, int(flip.sum()))
        docs.append(np.concatenate([[1], body]))
    return np.concatenate(docs)


def tiny_tables():
    from golfjax.data.tokenizer import ByteTables

    rng = np.random.default_rng(12)
    base = rng.integers(1, 4, TINY_V).astype(np.int16)
    boundary = np.zeros(TINY_V, bool)
    base[:2], boundary[:2] = 0, True  # pad and BOS
    space = rng.random(TINY_V) < 0.4
    space[:2] = False
    return ByteTables(base, space, boundary)


@functools.lru_cache(maxsize=4)
def tiny_params(model):
    """Fresh params with noise on every leaf (the zero-initialised projections too, so attention
    and every adapter reach the output), as host arrays."""
    import jax

    from golfjax.model import gpt

    params = jax.jit(gpt.init_params, static_argnums=0)(model, jax.random.PRNGKey(3))
    rng = np.random.default_rng(4)
    return jax.tree.map(lambda a: np.asarray(a) + 0.05 * rng.standard_normal(a.shape).astype(np.float32), params)


def tiny_evaluate(name, tokens):
    import jax

    from golfjax.config import Config
    from golfjax.eval.evaluator import Evaluator
    from golfjax.parallel import make_mesh, put_replicated

    model, fields, ngram_fields = MODES[name]
    c = Config()
    ngram = replace(c.ngram, **ngram_fields, ngram_orders=NGRAM_ORDERS[ngram_fields.get("ngram_mode", "interp")])
    cfg = replace(c, model=model, train=replace(c.train, train_seq_len=32), ngram=ngram,
                  eval=replace(c.eval, eval_batch_windows=4, val_batch_size=32 * 8 * 4, **fields))
    mesh = make_mesh(jax.devices()[:1])
    sidecar = None
    if name == "plain":  # the reference path records no positions; the byte-sidecar path (CaseOps) does
        sidecar = np.concatenate([[0], tiny_target_bytes(tokens)]).astype(np.uint16)
    ev = Evaluator(cfg, mesh, tiny_tables(), bos_id=1, byte_sidecar=sidecar, progress=False)
    return ev, ev.evaluate(put_replicated(tiny_params(model), mesh), tokens, record=True)


def tiny_target_bytes(tokens):
    """Bytes of every target tokens[1:], counted here from the tables (not through bpb.py)."""
    t = tiny_tables()
    prev, tgt = tokens[:-1], tokens[1:]
    return t.base_bytes[tgt].astype(np.int64) + (t.has_leading_space[tgt] & ~t.is_boundary[prev])


def later_tokens_changed(tokens, order, cut):
    """tokens with every non-BOS target after entry `cut` of the scoring order replaced."""
    out = tokens.copy()
    later = order[cut:]
    later = later[tokens[later] != 1]
    out[later] = (tokens[later].astype(np.int64) * 5 + 7) % (TINY_V - 2) + 2
    assert np.all(out[later] != tokens[later])
    return out


@pytest.fixture(scope="module")
def tiny_runs():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tiny_evaluate(name, tiny_stream())
        return cache[name]
    return get



# ---------------------------------------------------------------- per-document LoRA TTT


def test_fresh_lora_is_the_base_model_and_every_adapter_is_wired():
    """A recurrent model (virtual layers 0, 1, 1) has one adapter set per virtual layer (without
    recurrence: per physical layer); a fresh LoRA is the base model (to float32 rounding of the
    fused program); bumping B of any single visit's adapter changes the output, and the two
    visits of the shared block are distinct adapters (different outputs)."""
    import jax
    import jax.numpy as jnp

    from golfjax.eval.ttt_lora import init_lora, lora_forward
    from golfjax.model import gpt

    assert gpt.layer_schedule(TINY).layers == (0, 1)
    assert jax.eval_shape(lambda: init_lora(TINY, 4, 2, jax.random.PRNGKey(0)))["q"]["a"].shape == (2, 2, 32, 4)
    model = TINY_RECURRENT
    params = tiny_params(model)
    x = jnp.asarray(tiny_stream()[:128].astype(np.int32).reshape(2, 64))
    virtual = gpt.layer_schedule(model).layers
    assert virtual == (0, 1, 1)
    lora = jax.tree.map(np.asarray, init_lora(model, 4, 2, jax.random.PRNGKey(0)))
    for name, ab in lora.items():
        lead = (2,) if name == "head" else (2, len(virtual))
        assert ab["a"].shape[: len(lead)] == lead and ab["b"].shape[: len(lead)] == lead, name
    fwd = jax.jit(lambda lo: lora_forward(params, lo, model, x, 1.0))
    base = np.asarray(jax.jit(lambda p: gpt.forward(p, model, x))(params))
    np.testing.assert_allclose(np.asarray(fwd(lora)), base, rtol=1e-6, atol=1e-5)  # B = 0: the base model
    for name in lora:
        slots = [None] if name == "head" else range(len(virtual))
        outs = []
        for v in slots:
            b = lora[name]["b"].copy()
            if v is None:
                b += 0.1
            else:
                b[:, v] += 0.1
            out = np.asarray(fwd({**lora, name: {"a": lora[name]["a"], "b": b}}))
            assert np.abs(out - base).max() > 1e-3, (name, v)
            outs.append(out)
        if name != "head":  # visits 1 and 2 share block 1 but not their adapters
            assert np.abs(outs[1] - outs[2]).max() > 1e-4, name


def test_recurrent_block_visits_adapt_apart():
    """After a few score-then-update chunk steps on one document, the adapters of the two
    visits of the shared block hold different values (each trained through its own visit)."""
    import jax
    import jax.numpy as jnp

    from golfjax.eval.ttt_lora import init_lora, make_lora_steps
    from golfjax.parallel import make_mesh, put_replicated

    mesh = make_mesh(jax.devices()[:1])
    fields = {k: v for k, v in TINY_LORA.items() if k.startswith("ttt_lora")}
    run_steps = make_lora_steps(TINY_RECURRENT, EvalConfig(**fields), mesh, 32, 4)  # the evaluator's program
    lora = init_lora(TINY_RECURRENT, 2, 2, jax.random.PRNGKey(0))
    zeros = jax.tree.map(jnp.zeros_like, lora)
    stream = np.concatenate([tiny_stream().astype(np.int32), np.zeros(32 + 2, np.int32)])  # as the evaluator pads
    args = put_replicated((lora, zeros, zeros, jnp.zeros(2, jnp.int32), tiny_params(TINY_RECURRENT), stream), mesh)
    (adapted, _, _, t), _ = run_steps(*args, np.zeros(2, np.int32), np.array([70, 0], np.int32), np.int32(0), None)
    assert int(t[0]) == 4  # four chunks trained (the first document has nine; the second row is padding)
    for name in ("q", "k", "v", "o", "mlp"):
        b = np.asarray(adapted[name]["b"])[0]
        assert np.abs(b).max() > 0, name
        assert np.abs(b[1] - b[2]).max() > 1e-6, name


def test_lora_ttt_scores_each_document_apart_and_first_with_the_base_model(tiny_runs):
    """LoRA TTT: the first chunk of every document is scored by the base model with the context of
    doc-isolated sliding (same numbers), later chunks by adapted weights (they differ), and
    changing one whole document (BOS kept) changes no score of any other document, those of its
    own batch included: each document has its own adapters."""
    from golfjax.eval.sliding import document_segments

    tokens = tiny_stream()
    n = len(tokens)
    _, lora = tiny_runs("ttt-lora")
    _, docs = tiny_runs("sliding-docs")
    a, d = nll_by_position(lora, n), nll_by_position(docs, n)
    assert lora.bytes == docs.bytes and lora.tokens_scored == n - 1
    seg = document_segments(tokens, 1)
    for start, _ in seg:  # chunk 0 (8 targets): the base model, context from the document's BOS
        np.testing.assert_allclose(a[start + 1 : start + 9], d[start + 1 : start + 9], rtol=1e-5, atol=1e-5)
    later = np.concatenate([np.arange(s0 + 9, s1 + 1) for s0, s1 in seg])
    assert np.mean(np.abs(a[later] - d[later])) > 1e-3
    start, stop = seg[2]  # the longest document: the first batch, next to the first document
    changed = tokens.copy()
    changed[start + 1 : stop] = (tokens[start + 1 : stop].astype(np.int64) * 5 + 7) % (TINY_V - 2) + 2
    _, other = tiny_evaluate("ttt-lora", changed)
    b = nll_by_position(other, n)
    own = np.zeros(n, bool)
    own[start + 1 : stop + 1] = True
    own[0] = True  # never a target
    np.testing.assert_array_equal(a[~own], b[~own])
    assert np.all(a[start + 2 : stop] != b[start + 2 : stop])


def test_phased_global_sgd_changes_only_later_batches(tiny_runs):
    """Phased TTT (phases after 2 and 4 documents, two per batch, longest first): the first batch
    is scored as by LoRA TTT alone; the later batches by the base model the global SGD phases
    updated (their scores change). That the phases train only on documents already scored is
    property (a) of test_every_mode_... and the evaluator's own check."""
    from golfjax.eval.ttt_lora import doc_batches

    tokens = tiny_stream()
    n = len(tokens)
    lora = nll_by_position(tiny_runs("ttt-lora")[1], n)
    phased = nll_by_position(tiny_runs("ttt-phased")[1], n)
    batches = doc_batches(tokens, 1, 2)
    first = np.concatenate([np.arange(a + 1, b + 1) for a, b in batches[0]])
    np.testing.assert_array_equal(phased[first], lora[first])
    for batch in batches[1:]:
        rest = np.concatenate([np.arange(a + 1, b + 1) for a, b in batch])
        assert np.mean(np.abs(phased[rest] - lora[rest])) > 1e-4


def test_phase_training_windows_never_cross_a_document():
    """The global SGD phase packs scored documents into training sequences, each document's
    inputs from its own BOS and each target its own document's; attention is masked at BOS.
    Probe: changing a token of document d changes neither the losses nor the gradient of the
    positions of document d+1 in the same training sequence (without the mask the losses change)."""
    import jax
    import jax.numpy as jnp

    from golfjax.eval.sliding import document_segments
    from golfjax.eval.ttt_lora import phase_model, phase_training_tokens
    from golfjax.model import gpt

    tokens, params, bos = tiny_stream(), tiny_params(TINY), 1
    starts = np.flatnonzero(tokens == bos)[:3]
    stream = np.concatenate([tokens[b : b + n] for b, n in zip(starts, (40, 30, 50))])  # ends inside doc 3
    docs = document_segments(stream, bos)[[1, 0, 2]]  # queue order: any order of scored documents
    x, y, pos = phase_training_tokens(stream, docs)
    np.testing.assert_array_equal(np.sort(pos), np.arange(1, len(stream)))  # each target once, its own
    np.testing.assert_array_equal(y, stream[pos])
    np.testing.assert_array_equal(x, stream[pos - 1])
    assert x[0] == bos and x[30] == bos and x[70] == bos  # every document's inputs start at its BOS
    # the first training sequence (SEQ tokens) holds queue document 1 (rows 0-29) and the start of 2
    seq = slice(0, SEQ)
    first, second = np.arange(0, 30), np.arange(30, SEQ)
    changed = x.copy()
    changed[10] = (changed[10] + 5) % (TINY_V - 2) + 2  # a token inside queue document 1 (not its BOS)
    cfg = phase_model(TINY, bos)

    def doc_loss(p, c, inp):  # the loss of the second document's rows, and every row's NLL
        nll = gpt.token_nll(p, c, inp[None], jnp.asarray(y[None, seq]))[0]
        return jnp.sum(nll[second]), nll

    f = jax.jit(jax.value_and_grad(lambda p, inp: doc_loss(p, cfg, inp), has_aux=True))
    (_, nll0), g0 = f(params, jnp.asarray(x[seq]))
    (_, nll1), g1 = f(params, jnp.asarray(changed[seq]))
    nll0, nll1 = np.asarray(nll0), np.asarray(nll1)
    np.testing.assert_array_equal(nll0[second], nll1[second])
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(nll0[first] - nll1[first]).max() > 0  # the changed document itself does change
    # the control: without the mask the second document's rows do see the first document
    unmasked = jax.jit(lambda inp: gpt.token_nll(params, TINY, inp[None], jnp.asarray(y[None, seq]))[0])
    assert np.abs(np.asarray(unmasked(x[seq]) - unmasked(changed[seq]))[second]).max() > 1e-4


# ---------------------------------------------------------------- every mode


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_scores_each_target_once_and_never_sees_later_tokens(name, tiny_runs):
    """(c) each target once with the bytes counted here from the tables; (a) changing every
    non-BOS token after entry i of the mode's scoring order leaves entries 0..i-1 bit-identical
    (the TTT weights, the LoRA adapters and the n-gram learnt nothing from them yet) and
    changes later ones; the LoRA modes score in `lora_scoring_order`."""
    from golfjax.eval.ttt_lora import lora_scoring_order

    tokens = tiny_stream()
    ev, report = tiny_runs(name)
    order, nll = report.info["per_position"]
    np.testing.assert_array_equal(np.sort(order), np.arange(1, len(tokens)))
    assert report.tokens_scored == len(tokens) - 1
    assert report.bytes == int(tiny_target_bytes(tokens).sum())
    if "lora" in name or "phased" in name:
        np.testing.assert_array_equal(order, lora_scoring_order(tokens, 1, 2, 8).positions)
        assert not np.array_equal(order, np.sort(order))
    else:
        np.testing.assert_array_equal(order, np.arange(1, len(tokens)))
    for cut in (len(order) // 3, (2 * len(order)) // 3):
        changed = later_tokens_changed(tokens, order, cut)
        _, other = tiny_evaluate(name, changed)
        o_order, o_nll = other.info["per_position"]
        np.testing.assert_array_equal(o_order, order)
        np.testing.assert_array_equal(o_nll[:cut], nll[:cut])
        assert np.any(o_nll[cut:] != nll[cut:])


@pytest.mark.parametrize("name", [n for n in MODES if "+ngram" in n])
def test_every_ngram_mode_mixes_in_its_scoring_order(name, tiny_runs):
    """The +ngram modes are their network mode mixed at every target with the n-gram learnt in
    the mode's own scoring order (interp: exactly the host mixer on the network mode's NLLs;
    tilt: unchanged where there is no hint), and (e) each mix's distribution sums to 1."""
    import jax.numpy as jnp

    from golfjax.eval import ngram as ng
    from golfjax.eval.evaluator import build_mix
    from golfjax.eval.mix import ScoringOrder

    tokens = tiny_stream()
    ev, mixed = tiny_runs(name)
    net_name = {"sliding+ngram-interp": "sliding", "sliding+ngram-tilt": "sliding", "ttt+ngram-full": "ttt-full",
                "ttt+ngram-lora-interp": "ttt-lora", "ttt+ngram-lora-tilt": "ttt-lora-recurrent",
                "ttt+ngram-phased": "ttt-phased"}[name]
    _, net = tiny_runs(net_name)
    pos, nll = net.info["per_position"]
    mpos, mnll = mixed.info["per_position"]
    np.testing.assert_array_equal(mpos, pos)
    own_order = ev.scoring_order(tokens)  # None: stream order
    order = ScoringOrder.stream(len(tokens)) if own_order is None else own_order
    np.testing.assert_array_equal(order.positions, pos)
    mixer = ng.build_mixer(ev.cfg.ngram, tokens, TINY_V, scoring=order)
    if mixer.spec.mode == "interp":
        np.testing.assert_allclose(mnll, mixer.score(pos, nll), rtol=2e-5, atol=2e-6)
    else:
        no_hint = mixer.hints.token[pos] < 0
        assert 10 < no_hint.sum() < len(pos) - 10
        np.testing.assert_allclose(mnll[no_hint], nll[no_hint], rtol=1e-5, atol=1e-6)
    assert mixed.val_loss < net.val_loss  # the repeats are predictable
    # (e): at non-BOS targets, every candidate token's mixed probability, summed
    rng = np.random.default_rng(13)
    for p in (int(pos[5]), int(pos[len(pos) // 2]), int(pos[-3])):
        if tokens[p] == 1:
            continue
        logp = rng.normal(size=TINY_V) * 2
        logp -= np.log(np.exp(logp - logp.max()).sum()) + logp.max()
        total = 0.0
        for y in range(TINY_V):
            u = tokens.copy()
            u[p] = y
            mix = build_mix(ev.cfg, u, own_order)  # the order of the real stream (BOS positions fixed)
            side = {k: jnp.asarray(v[p : p + 1]) for k, v in mix.side.items()}
            qlogp = jnp.asarray(logp[mix.query_ids[p]][None], jnp.float32)
            out = mix.combine(jnp.asarray([-logp[y]], jnp.float32), qlogp, side, jnp.asarray([y], jnp.int32))
            total += float(np.exp(-np.asarray(out)[0]))
        assert total == pytest.approx(1.0, abs=1e-5), (name, p)
