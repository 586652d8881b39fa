"""The causal n-gram mixer: normalised distributions, prefix-only counts, stream-order scoring."""

import numpy as np
import pytest

from golfjax.config import Config
from golfjax.eval import ngram as ng

V = 6


def _stream(n: int = 400, seed: int = 0) -> np.ndarray:
    """A small stream with repeats, so high orders see their contexts again."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, V, n)
    if n >= 200:
        t[120:200] = t[20:100]
    if n >= 340:
        t[300:340] = t[20:60]
    return t


def _tilt_spec(orders=(2, 3, 4)) -> ng.NgramSpec:
    return ng.NgramSpec(mode="tilt", orders=orders, base_beta=2.0, agree_bonus=0.1,
                        min_confidence=(0.5,) * len(orders), min_count=(2,) * len(orders))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _brute_counts(tokens, k, p):
    """(ctx, joint, types, best, best_count) of order k at p from tokens[:p], by hand."""
    if p < k:
        return 0, 0, 0, -1, 0
    ctx = tuple(tokens[p - k : p])
    seen: dict[int, int] = {}
    n = best_count = 0
    best = -1
    for q in range(k, p):
        if tuple(tokens[q - k : q]) == ctx:
            n += 1
            seen[tokens[q]] = seen.get(tokens[q], 0) + 1
            if seen[tokens[q]] > best_count:
                best, best_count = tokens[q], seen[tokens[q]]
    return n, seen.get(tokens[p], 0), len(seen), best, best_count


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_counts_are_those_of_the_prefix(k):
    t = [int(x) for x in _stream(250)]
    c = ng.order_counts(np.array(t), k, with_best=True)
    for p in range(len(t)):
        got = (c.ctx[p], c.joint[p], c.types[p], c.best[p], c.best_count[p])
        assert got == _brute_counts(t, k, p), (k, p)


@pytest.mark.parametrize("orders", [(1,), (1, 2), (1, 2, 3), (2, 4, 6)])
def test_witten_bell_is_normalised_and_matches_the_slow_model(orders):
    t = _stream()
    p_target = ng.witten_bell_target_prob(t, orders, V)
    # positions before any context exists, unseen contexts, and long repeats
    for p in [1, 2, 3, 7, 25, 130, 199, 320, 399]:
        dist = ng.witten_bell_distribution(t, p, orders, V)
        assert dist.min() > 0
        assert dist.sum() == pytest.approx(1.0, abs=1e-12)
        assert p_target[p] == pytest.approx(dist[t[p]], rel=1e-12)


def _vectorised_distribution(t: np.ndarray, p: int, orders) -> np.ndarray:
    """The fast path's probability of every token at p, by substituting each as the target."""
    out = np.empty(V)
    for y in range(V):
        u = t.copy()
        u[p] = y
        out[y] = ng.witten_bell_target_prob(u, orders, V)[p]
    return out


def test_hash_collisions_keep_the_distribution_normalised(monkeypatch):
    t = _stream(200)
    monkeypatch.setattr(ng, "context_hashes", lambda tokens, order: np.zeros(len(tokens) - order, np.uint64))
    for p in [5, 50, 150]:  # every context collides with every other one
        assert _vectorised_distribution(t, p, (1, 2, 3)).sum() == pytest.approx(1.0, abs=1e-12)


def test_interp_blend_sums_to_one_and_scores_its_target():
    t = _stream()
    rng = np.random.default_rng(1)
    logp = _log_softmax(rng.normal(size=(len(t), V)) * 2)
    spec = ng.NgramSpec(mode="interp", orders=(1, 2, 3), lam=0.7)
    mixer = ng.NgramMixer(spec, t, V)
    pos = np.arange(1, len(t))
    nll_nn = -logp[pos, t[pos]]
    mixed = mixer.score(pos, nll_nn)
    for p in [1, 4, 60, 150, 399]:
        full = 0.7 * np.exp(logp[p]) + 0.3 * ng.witten_bell_distribution(t, p, (1, 2, 3), V)
        assert full.sum() == pytest.approx(1.0, abs=1e-12)
        assert mixed[p - 1] == pytest.approx(-np.log(full[t[p]]), rel=1e-10)


def test_tilt_is_normalised_and_matches_its_nll_formula():
    t = _stream()
    rng = np.random.default_rng(2)
    logp = _log_softmax(rng.normal(size=(len(t), V)) * 2)
    mixer = ng.NgramMixer(_tilt_spec(), t, V)
    pos = np.arange(1, len(t))
    hint = mixer.hint_ids(pos)
    mixed = mixer.score(pos, -logp[pos, t[pos]], logp[pos, hint])
    hinted = mixer.hints.token[pos] >= 0
    assert hinted.any() and (~hinted).any()  # both kinds of positions are exercised
    assert (mixer.hints.token[pos][hinted] == t[pos][hinted]).any()  # some hints are right
    for i, p in enumerate(pos):
        tilted = np.exp(logp[p]).copy()
        if mixer.hints.token[p] >= 0:
            tilted[mixer.hints.token[p]] *= np.exp(mixer.hints.beta[p])
        tilted /= tilted.sum()
        assert mixed[i] == pytest.approx(-np.log(tilted[t[p]]), rel=1e-9, abs=1e-12)
    assert np.all(mixer.hints.beta[pos][~hinted] == 0)


def test_tilt_hint_is_the_best_token_of_the_highest_passing_order():
    t = _stream()
    spec = _tilt_spec()
    hints = ng.tilt_hints(t, spec)
    tl = [int(x) for x in t]
    for p in range(len(t)):
        want, conf = -1, 0.0
        for k, mc, mn in zip(spec.orders, spec.min_confidence, spec.min_count):
            n, _, _, best, bc = _brute_counts(tl, k, p)
            if n >= mn and n and bc / n >= mc:
                want, conf = best, bc / n
        assert hints.token[p] == want, p
        if want >= 0:
            assert hints.beta[p] >= spec.base_beta * conf - 1e-12


@pytest.mark.parametrize("spec", [ng.NgramSpec(mode="interp", orders=(1, 2, 3, 4), lam=0.5), _tilt_spec((1, 2, 3))],
                         ids=["interp", "tilt"])
def test_no_score_depends_on_a_later_token(spec):
    t = _stream()
    rng = np.random.default_rng(3)
    logp = _log_softmax(rng.normal(size=(len(t), V)))
    pos = np.arange(1, len(t))

    def scores(tokens):
        mixer = ng.NgramMixer(spec, tokens, V)
        return mixer.score(pos, -logp[pos, tokens[pos]], logp[pos, mixer.hint_ids(pos)])

    base = scores(t)
    for cut in [10, 150, 320]:
        u = t.copy()
        u[cut:] = rng.integers(0, V, len(t) - cut)
        assert not np.array_equal(u[cut:], t[cut:])
        other = scores(u)
        np.testing.assert_array_equal(other[: cut - 1], base[: cut - 1])  # targets before `cut`
        assert not np.array_equal(other[cut - 1 :], base[cut - 1 :])


def test_mixer_scores_each_target_once_in_stream_order():
    t = _stream()
    mixer = ng.NgramMixer(ng.NgramSpec(mode="interp", orders=(1, 2)), t, V)
    mixer.score(np.arange(1, 50), np.ones(49))
    with pytest.raises(ValueError, match="stream order"):
        mixer.score(np.arange(40, 60), np.ones(20))  # rescoring
    with pytest.raises(ValueError, match="stream order"):
        mixer.score(np.array([60, 55]), np.ones(2))  # out of order
    out = mixer.score(np.array([60, 90]), np.ones(2))  # gaps are fine (already-scored or skipped tokens)
    assert out.shape == (2,)
    tilt = ng.NgramMixer(_tilt_spec(), t, V)
    with pytest.raises(ValueError, match="logp_hint"):
        tilt.score(np.arange(1, 5), np.ones(4))


def test_lambda_one_is_the_network_alone():
    t = _stream()
    mixer = ng.NgramMixer(ng.NgramSpec(mode="interp", orders=(1, 2), lam=1.0), t, V)
    nll = np.linspace(0.1, 3, len(t) - 1)
    np.testing.assert_array_equal(mixer.score(np.arange(1, len(t)), nll), nll)


def test_config_section_builds_the_mixer():
    from dataclasses import replace

    cfg = Config()
    assert cfg.ngram.ngram_mode == "interp" and cfg.eval.eval_mode == "plain"  # the n-gram is off by default
    assert isinstance(ng.build_mixer(cfg.ngram, _stream(), V), ng.NgramMixer)
    spec = ng.spec_from_config(replace(cfg.ngram, ngram_mode="tilt", ngram_orders="8:16:2"))
    assert spec.orders == (8, 10, 12, 14, 16)
    assert spec.min_confidence == (0.7, 0.7, 0.6, 0.5, 0.5) and spec.min_count == (3, 3, 2, 2, 2)
    with pytest.raises(ValueError, match="unknown n-gram mode"):
        ng.spec_from_config(replace(cfg.ngram, ngram_mode="ppm"))
    with pytest.raises(ValueError, match="orders"):
        ng.spec_from_config(replace(cfg.ngram, ngram_mode="interp", ngram_orders="3,2"))


@pytest.mark.parametrize("spec", [ng.NgramSpec(mode="interp", orders=(1, 2, 3), lam=0.6), _tilt_spec()],
                         ids=["interp", "tilt"])
def test_position_mix_combine_equals_the_host_mixer(spec):
    """The Evaluator's device-side hook gives the host mixer's NLLs (float32 tolerance)."""
    import jax.numpy as jnp

    t = _stream()
    rng = np.random.default_rng(4)
    logp = _log_softmax(rng.normal(size=(len(t), V)) * 2).astype(np.float32)
    mix = ng.position_mix_from_spec(spec, t, V)
    mix.check(len(t))
    pos = np.arange(1, len(t))
    nll = -logp[pos, t[pos]]
    qlogp = np.take_along_axis(logp[pos], mix.query_ids[pos], axis=-1)
    side = {k: jnp.asarray(v[pos]) for k, v in mix.side.items()}
    got = np.asarray(mix.combine(jnp.asarray(nll), jnp.asarray(qlogp), side, jnp.asarray(t[pos], jnp.int32)))
    mixer = ng.NgramMixer(spec, t, V)
    want = mixer.score(pos, nll, logp[pos, mixer.hint_ids(pos)])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------- through the Evaluator


def _evaluate(tokens, mode, ngram_mode, params=None):
    import jax
    from dataclasses import replace

    from golfjax.config import ModelConfig
    from golfjax.data.tokenizer import ByteTables
    from golfjax.eval.evaluator import Evaluator
    from golfjax.model import gpt
    from golfjax.parallel import make_mesh, put_replicated

    vocab = 32
    model = ModelConfig(vocab_size=vocab, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1,
                        compute_dtype="float32")
    c = Config()
    cfg = replace(c, model=model, train=replace(c.train, train_seq_len=32),
                  eval=replace(c.eval, eval_mode=mode, eval_stride=8, eval_batch_windows=4),
                  ngram=replace(c.ngram, ngram_mode=ngram_mode, ngram_orders="1,2,3" if ngram_mode == "interp" else "2:4:1"))
    tables = ByteTables(np.ones(vocab, np.int16), np.zeros(vocab, bool), np.zeros(vocab, bool))
    mesh = make_mesh(jax.devices()[:1])
    params = gpt.init_params(model, jax.random.PRNGKey(0))
    ev = Evaluator(cfg, mesh, tables, bos_id=1, progress=False)
    return ev.evaluate(put_replicated(params, mesh), tokens, record=True), cfg


def _repetitive_stream() -> np.ndarray:
    """A 50-token phrase said six times with a few changes: contexts recur often enough for
    A2's gates (count >= 3) and the n-gram has something to predict."""
    rng = np.random.default_rng(5)
    t = np.tile(rng.integers(2, 32, 50), 6)
    flip = rng.random(len(t)) < 0.05
    t[flip] = rng.integers(2, 32, int(flip.sum()))
    return t


@pytest.fixture(scope="module")
def sliding_baseline():
    return _evaluate(_repetitive_stream(), "sliding", "interp")[0]


@pytest.mark.parametrize("ngram_mode", ["interp", "tilt"])
def test_evaluator_ngram_mode_is_the_host_mix_of_sliding_and_causal(ngram_mode, sliding_baseline):
    t = _repetitive_stream()
    mixed, cfg = _evaluate(t, "sliding+ngram", ngram_mode)
    pos, nll = sliding_baseline.info["per_position"]
    mpos, mnll = mixed.info["per_position"]
    np.testing.assert_array_equal(pos, mpos)
    mixer = ng.build_mixer(cfg.ngram, t, 32)
    if ngram_mode == "interp":
        np.testing.assert_allclose(mnll, mixer.score(pos, nll), rtol=2e-5, atol=2e-6)
    else:  # the report has no hint log-probs: positions without a hint must be the network's
        no_hint = mixer.hints.token[pos] < 0
        assert 10 < no_hint.sum() < len(pos) - 10
        np.testing.assert_allclose(mnll[no_hint], nll[no_hint], rtol=1e-6)
    assert mixed.bytes == sliding_baseline.bytes
    assert mixed.val_loss < sliding_baseline.val_loss - 0.1  # the repeats are predictable
    # causality: changing the tokens from 200 on leaves every earlier score unchanged
    u = t.copy()
    u[200:] = (u[200:] + 1) % 30 + 2
    other, _ = _evaluate(u, "sliding+ngram", ngram_mode)
    np.testing.assert_array_equal(other.info["per_position"][1][:199], mnll[:199])


# ---------------------------------------------------------------- out-of-stream scoring orders (LoRA TTT)


def _doc_stream(seed: int = 7) -> np.ndarray:
    """Documents (BOS = 1) over a small vocabulary, with repeats inside and across documents."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(2, V, 30)
    docs = []
    for n in (70, 25, 55, 40, 90, 12):
        body = np.tile(phrase, 4)[rng.integers(0, 30) :][: n - 1].copy()
        flip = rng.random(n - 1) < 0.15
        body[flip] = rng.integers(2, V, int(flip.sum()))
        docs.append(np.concatenate([[1], body]))
    return np.concatenate(docs)


def _lora_order(t: np.ndarray, docs: int = 2, chunk: int = 8):
    from golfjax.eval.ttt_lora import lora_scoring_order

    return lora_scoring_order(t, 1, docs, chunk)


def _brute_ordered_counts(tokens, k, order):
    """(ctx, joint, types, best, best_count) at every position from the entries scored before it."""
    out = {p: (0, 0, 0, -1, 0) for p in range(len(tokens))}
    ctx_of = {}
    for i, (p, cs) in enumerate(zip(order.positions, order.context_start)):
        if p - k < cs:
            continue
        ctx = tuple(tokens[p - k : p])
        seen: dict[int, int] = {}
        n = best_count = 0
        best = -1
        for q, y in ctx_of.get(ctx, []):
            n += 1
            seen[y] = seen.get(y, 0) + 1
            if seen[y] > best_count:
                best, best_count = y, seen[y]
        out[p] = (n, seen.get(tokens[p], 0), len(seen), best, best_count)
        ctx_of.setdefault(ctx, []).append((p, tokens[p]))
    return out


@pytest.mark.parametrize("k", [1, 2, 4])
def test_scoring_order_counts(k):
    """In stream order they are order_counts exactly; in LoRA's order they are the counts of the
    targets scored before, with contexts cut at the document's BOS (checked by hand)."""
    from golfjax.eval.mix import ScoringOrder

    t = _doc_stream()
    stream = ng.scoring_order_counts(t, k, ScoringOrder.stream(len(t)), with_best=True)
    plain = ng.order_counts(t, k, with_best=True)
    for name in ("ctx", "joint", "types", "best", "best_count"):
        np.testing.assert_array_equal(getattr(stream, name), getattr(plain, name), err_msg=name)
    order = _lora_order(t)
    order.check(len(t))
    assert not np.array_equal(order.positions, np.arange(1, len(t)))  # really out of stream order
    c = ng.scoring_order_counts(t, k, order, with_best=True)
    want = _brute_ordered_counts([int(x) for x in t], k, order)
    for p in range(len(t)):
        assert (c.ctx[p], c.joint[p], c.types[p], c.best[p], c.best_count[p]) == want[p], p


def _mixed_distribution(spec, t, p, order, logp):
    """Every token's mixed probability at position p, through the Evaluator's device combine: the
    side arrays at p are rebuilt with each candidate as the target (they depend on it only as the
    target, never as context)."""
    import jax.numpy as jnp

    probs = np.empty(V)
    for y in range(V):
        u = t.copy()
        u[p] = y
        mix = ng.position_mix_from_spec(spec, u, V, order)
        side = {name: jnp.asarray(v[p : p + 1]) for name, v in mix.side.items()}
        qlogp = jnp.asarray(logp[mix.query_ids[p]][None], jnp.float32)
        nll = mix.combine(jnp.asarray([-logp[y]], jnp.float32), qlogp, side, jnp.asarray([y], jnp.int32))
        probs[y] = np.exp(-float(np.asarray(nll)[0]))
    return probs


@pytest.mark.parametrize("scoring", ["stream", "lora"])
@pytest.mark.parametrize("spec", [ng.NgramSpec(mode="interp", orders=(1, 2, 3), lam=0.6), _tilt_spec((1, 2, 3))],
                         ids=["interp", "tilt"])
def test_mixed_distributions_sum_to_one(spec, scoring):
    """(e) In every scoring order an evaluator uses, the mixed distribution at a position sums to 1
    over the vocabulary (positions with and without a tilt hint, first targets of documents).
    Substituting the target works at non-BOS positions only: a BOS is structure known up front
    (documents are cut and queued by it, as in the records), so the LoRA order may read a
    document's BOS as context before the previous document's last target is scored."""
    from golfjax.eval.mix import ScoringOrder

    t = _doc_stream()
    order = ScoringOrder.stream(len(t)) if scoring == "stream" else _lora_order(t)
    rng = np.random.default_rng(8)
    hints = ng.position_mix_from_spec(spec, t, V, order).side.get("hint")
    picks = [1, 2, 71, 72, 151, 200, len(t) - 1]
    if hints is not None:
        picks += [int(np.flatnonzero((hints >= 0) & (t != 1))[-1])]
    for p in picks:
        assert t[p] != 1
        logp = _log_softmax(rng.normal(size=V) * 2)
        total = _mixed_distribution(spec, t, p, order, logp).sum()
        assert total == pytest.approx(1.0, abs=2e-6), p


@pytest.mark.parametrize("spec", [ng.NgramSpec(mode="interp", orders=(1, 2, 3, 4), lam=0.5), _tilt_spec((1, 2, 3))],
                         ids=["interp", "tilt"])
def test_ordered_mix_never_depends_on_a_later_target(spec):
    """(a) for the n-gram alone: in LoRA's scoring order, changing every target after entry i
    (BOS kept) leaves the mix of entries 0..i-1 unchanged, while later entries change."""
    t = _doc_stream()
    order = _lora_order(t)
    base = ng.position_mix_from_spec(spec, t, V, order)
    rng = np.random.default_rng(9)
    for cut in (40, 130, 260):
        u = t.copy()
        later = order.positions[cut:]
        later = later[t[later] != 1]
        u[later] = rng.integers(2, V, len(later))
        other = ng.position_mix_from_spec(spec, u, V, order)
        before, after = order.positions[:cut], order.positions[cut:]
        for name in base.side:
            np.testing.assert_array_equal(other.side[name][before], base.side[name][before], err_msg=name)
        assert any(not np.array_equal(other.side[n][after], base.side[n][after]) for n in base.side)


def test_mixer_in_a_scoring_order_refuses_other_orders():
    t = _doc_stream()
    order = _lora_order(t)
    mixer = ng.NgramMixer(ng.NgramSpec(mode="interp", orders=(1, 2)), t, V, scoring=order)
    mixer.score(order.positions[:20], np.ones(20))
    with pytest.raises(ValueError, match="scoring order"):
        mixer.score(np.sort(order.positions[20:40]), np.ones(20))  # stream order is not this order
    mixer.score(order.positions[20:40], np.ones(20))
    with pytest.raises(ValueError, match="scoring order"):
        mixer.score(order.positions[30:35], np.ones(5))  # rescoring
    from golfjax.eval.mix import ScoringOrder

    with pytest.raises(ValueError, match="exactly once"):
        ScoringOrder(np.ones_like(order.positions), order.context_start).check(len(t))
