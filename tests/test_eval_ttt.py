"""Score-first TTT: every target scored once, scored before any adaptation that uses it,
and with the weights adapted only on earlier chunks."""

from __future__ import annotations

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


# ---------------------------------------------------------------- per-document LoRA TTT

LORA = dict(eval_mode="ttt", ttt_variant="lora", ttt_lora_rank=4, ttt_lora_docs=2, ttt_lora_chunk=16,
            ttt_lora_steps_per_call=4, ttt_lora_lr=0.01)


def lora_stream(setup):  # noqa: F811
    """Three short documents (about 120 tokens each), each starting with BOS."""
    sp = setup[0]
    tokens = setup[2]
    bos = np.flatnonzero(tokens == sp.bos_id())[:3]
    return np.concatenate([tokens[b : b + 120] for b in bos])


# The golden 2-layer model with block 1 visited twice: virtual layers [0, 1, 1].
RECURRENT = replace(MODEL, recur_first=1, recur_last=1, recur_loops=1)


@pytest.mark.parametrize("model", [MODEL, RECURRENT], ids=["plain", "recurrent"])
def test_fresh_lora_is_the_base_model_and_every_adapter_is_wired(setup, model):  # noqa: F811
    """One adapter set per virtual layer (= physical without recurrence); a fresh LoRA is the
    base model (to float32 rounding of the fused program); bumping B of any single visit's adapter changes the output, and
    the two visits of the recurrent block are distinct adapters (different outputs)."""
    import jax
    import jax.numpy as jnp

    from golfjax.eval.ttt_lora import init_lora, lora_forward
    from golfjax.model import gpt

    params = setup[3]
    x = jnp.asarray(setup[2][:128].astype(np.int32).reshape(2, 64))
    virtual = gpt.layer_schedule(model).layers
    assert virtual == ((0, 1) if model is MODEL else (0, 1, 1))
    lora = init_lora(model, 4, 2, jax.random.PRNGKey(0))
    for name, ab in lora.items():
        lead = (2,) if name == "head" else (2, len(virtual))
        assert ab["a"].shape[: len(lead)] == lead and ab["b"].shape[: len(lead)] == lead, name
    fwd = jax.jit(lambda lo: lora_forward(params, lo, model, x, 1.0))
    base = np.asarray(jax.jit(lambda p: gpt.forward(p, model, x))(params))
    np.testing.assert_allclose(np.asarray(fwd(lora)), base, rtol=1e-6, atol=1e-5)  # B = 0: the base (to XLA's fusion)
    for name in lora:
        slots = [None] if name == "head" else range(len(virtual))
        outs = []
        for v in slots:
            b = lora[name]["b"]
            b = b + 0.1 if v is None else b.at[:, v].add(0.1)
            out = np.asarray(fwd({**lora, name: {"a": lora[name]["a"], "b": b}}))
            assert np.abs(out - base).max() > 1e-3, (name, v)
            outs.append(out)
        if model is RECURRENT and name != "head":  # visits 1 and 2 share block 1 but not their adapters
            assert np.abs(outs[1] - outs[2]).max() > 1e-4, name


def test_recurrent_block_visits_adapt_apart(setup):  # noqa: F811
    """After a few score-then-update chunk steps on one document, the adapters of the two
    visits of the shared block hold different values (each trained through its own visit)."""
    import jax
    import jax.numpy as jnp

    from golfjax.config import EvalConfig
    from golfjax.eval.ttt_lora import init_lora, make_lora_steps
    from golfjax.parallel import make_mesh

    sp, _, tokens, params = setup
    mesh = make_mesh(jax.devices()[:1])
    ecfg = EvalConfig(ttt_lora_rank=4, ttt_lora_docs=1, ttt_lora_chunk=16, ttt_lora_lr=0.01)
    run_steps = make_lora_steps(RECURRENT, ecfg, mesh, SEQ, 4)
    lora = init_lora(RECURRENT, 4, 1, jax.random.PRNGKey(0))
    zeros = lambda: jax.tree.map(jnp.zeros_like, lora)
    stream = np.concatenate([tokens[:200].astype(np.int32), np.zeros(SEQ + 2, np.int32)])
    (adapted, _, _, t), _ = run_steps(lora, zeros(), zeros(), jnp.zeros(1, jnp.int32), params, stream,
                                      np.zeros(1, np.int32), np.array([150], np.int32), np.int32(0))
    assert int(t[0]) == 4  # four chunks trained (the document has ten)
    for name in ("q", "k", "v", "o", "mlp"):
        b = np.asarray(adapted[name]["b"])
        assert np.abs(b).max() > 0, name
        assert np.abs(b[:, 1] - b[:, 2]).max() > 1e-6, name


@pytest.fixture(scope="module")
def lora_runs(setup):  # noqa: F811
    tokens = lora_stream(setup)
    q = 120 + 70  # inside document 2, in its chunk 4
    changed = tokens.copy()
    changed[q:240] = (changed[q:240].astype(np.int64) * 7 + 3) % 1000 + 8  # only document 2 changes
    base = run(setup, tokens, devices=1, **LORA)
    other = run(setup, changed, devices=1, **LORA)
    docs = run(setup, tokens, devices=1, eval_mode="sliding", eval_stride=16, eval_doc_isolated=True)
    return tokens, q, base, other, docs


def test_lora_ttt_scores_every_target_once_before_adapting(lora_runs):
    """Each target once (count check), the same bytes as doc-isolated sliding, the first chunk
    of every document scored by the base model, later chunks by adapted weights; changing
    document 2 from q on leaves every score before q and all of documents 1 and 3 unchanged."""
    tokens, q, base, other, docs = lora_runs
    n = len(tokens)
    a, b, d = nll_by_position(base, n), nll_by_position(other, n), nll_by_position(docs, n)
    pos, _ = base.info["per_position"]
    np.testing.assert_array_equal(np.sort(pos), np.arange(1, n))
    assert base.tokens_scored == n - 1 and base.bytes == docs.bytes
    for start in (0, 120, 240):  # chunk 0 of each document: the base model, same context as doc-isolated
        np.testing.assert_allclose(a[start + 1 : start + 17], d[start + 1 : start + 17], rtol=1e-5, atol=1e-5)
    assert np.mean(np.abs(a[40:120] - d[40:120])) > 1e-3  # adapted after a few chunks
    np.testing.assert_array_equal(a[1:q], b[1:q])
    np.testing.assert_array_equal(a[241:], b[241:])  # document 3 has its own adapters
    assert np.all(a[q:240] != b[q:240])


def test_phased_global_sgd_trains_only_on_scored_documents(setup):  # noqa: F811
    """Four documents, two per batch (longest first), one global SGD phase after 2 documents.
    The first batch is scored as by LoRA TTT alone; the second by the updated base model
    (its scores change); and changing a document of the second batch changes nothing of the
    other documents: the phase never trained on a document it had not scored."""
    sp = setup[0]
    tokens = setup[2]
    bos = np.flatnonzero(tokens == sp.bos_id())[:4]
    lengths = (130, 125, 120, 115)
    stream = np.concatenate([tokens[b : b + n] for b, n in zip(bos, lengths)])
    starts = np.cumsum((0,) + lengths)  # documents at [starts[i], starts[i+1]]
    phased = dict(LORA, ttt_variant="phased", ttt_phase_docs="2", ttt_phase_lr=0.05, ttt_phase_epochs=2,
                  ttt_chunk_tokens=128, ttt_batch_seqs=2)
    n = len(stream)
    lora = nll_by_position(run(setup, stream, devices=1, **LORA), n)
    base = nll_by_position(run(setup, stream, devices=1, **phased), n)
    changed = stream.copy()
    q = starts[3] + 40  # inside the last (shortest) document, scored after the phase
    changed[q : starts[4]] = (changed[q : starts[4]].astype(np.int64) * 7 + 3) % 1000 + 8
    other = nll_by_position(run(setup, changed, devices=1, **phased), n)
    first = slice(1, starts[2] + 1)  # documents 1 and 2 (the first batch), through their last target
    np.testing.assert_array_equal(base[first], lora[first])
    assert np.mean(np.abs(base[starts[2] + 1 :] - lora[starts[2] + 1 :])) > 1e-4
    np.testing.assert_array_equal(other[:q], base[:q])
    assert np.all(other[q : starts[4]] != base[q : starts[4]])


def test_phase_training_windows_never_cross_a_document(setup):  # noqa: F811
    """The global SGD phase packs scored documents into training sequences, each document's
    inputs from its own BOS and each target its own document's; attention is masked at BOS.
    Probe: changing a token of document d changes neither the losses nor the gradient of the
    positions of document d+1 in the same training sequence (without the mask both change)."""
    import jax
    import jax.numpy as jnp

    from golfjax.eval.sliding import document_segments
    from golfjax.eval.ttt_lora import phase_model, phase_training_tokens
    from golfjax.model import gpt

    sp, _, tokens, params = setup
    bos = sp.bos_id()
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
    changed[10] = (changed[10] + 5) % 1000 + 8  # a token inside queue document 1 (not its BOS)
    cfg = phase_model(MODEL, bos)

    def doc_loss(p, c, inp):  # the loss of the second document's rows, and every row's NLL
        nll = gpt.token_nll(p, c, inp[None], jnp.asarray(y[None, seq]))[0]
        return jnp.sum(nll[second]), nll

    for c, isolated in ((cfg, True), (MODEL, False)):
        f = jax.jit(jax.value_and_grad(lambda p, inp, c=c: doc_loss(p, c, inp), has_aux=True))
        (_, nll0), g0 = f(params, jnp.asarray(x[seq]))
        (_, nll1), g1 = f(params, jnp.asarray(changed[seq]))
        nll0, nll1 = np.asarray(nll0), np.asarray(nll1)
        diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
        if isolated:
            np.testing.assert_array_equal(nll0[second], nll1[second])
            assert diff == 0.0
            assert np.abs(nll0[first] - nll1[first]).max() > 0  # the changed document itself does change
        else:
            assert np.abs(nll0[second] - nll1[second]).max() > 1e-4 and diff > 0
