"""Sliding-window evaluation and the Evaluator: exactly-once scoring, parity with plain,
bytes equal to the decoded text, causality, and the PositionMix hook."""

from __future__ import annotations

import json
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golfjax import interop
from golfjax.config import Config, ConfigError, ModelConfig, resolve
from golfjax.data.tokenizer import build_byte_tables, load_tokenizer
from golfjax.eval import bpb
from golfjax.eval.evaluator import Evaluator, position_bytes
from golfjax.eval.mix import PositionMix
from golfjax.eval.sliding import document_segments, flat_segments, make_windows
from golfjax.parallel import make_mesh, put_replicated
from tests.conftest import FINEWEB_DOCS, TOKENIZER_1024, require

MODEL = ModelConfig(vocab_size=1024, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2,
                    compute_dtype="float32")
SEQ = 64


def eval_config(**fields) -> Config:
    c = Config()
    return replace(c, model=MODEL, train=replace(c.train, train_seq_len=SEQ),
                   eval=replace(c.eval, val_batch_size=SEQ * 8 * 4, eval_batch_windows=4, **fields))


@pytest.fixture(scope="session")
def setup(golden_dir):
    """(tokenizer, tables, stream of whole documents each after BOS, trained golden params)."""
    sp = load_tokenizer(require(TOKENIZER_1024), 1024)
    lines = require(FINEWEB_DOCS).read_text().splitlines()
    docs = [json.loads(lines[i])["text"] for i in (2, 4, 7, 1)]  # short documents first (1200, 1459, ... tokens)
    tokens = np.concatenate([[sp.bos_id()] + sp.encode(d) for d in docs]).astype(np.uint16)
    state = interop.load_reference_state(golden_dir / "trained" / "final_state.npz")
    return sp, build_byte_tables(sp, 1024), tokens, interop.from_reference_state(state, MODEL)


def run(setup, tokens, devices=2, record=True, **fields):
    sp, tables, _, params = setup
    mesh = make_mesh(jax.devices()[:devices])
    ev = Evaluator(eval_config(**fields), mesh, tables, bos_id=sp.bos_id(), progress=False)
    return ev.evaluate(put_replicated(params, mesh), tokens, record=record)


@pytest.mark.parametrize("n,seq_len,stride", [(2, 8, 8), (50, 8, 3), (64, 16, 16), (65, 16, 16), (100, 16, 5),
                                              (1000, 64, 64), (1000, 64, 7), (17, 64, 16)])
def test_window_table_scores_every_target_once(n, seq_len, stride):
    """Flat and document-isolated tables cover positions 1..n-1 exactly once, windows stay
    inside their segment, and every later window has >= seq_len - stride context."""
    rng = np.random.default_rng(n)
    tokens = rng.integers(2, 50, n)
    tokens[rng.random(n) < 0.05] = 1
    for segments in (flat_segments(n), document_segments(tokens, 1)):
        win = make_windows(segments, seq_len, stride)
        hits = np.zeros(n, np.int64)
        for lo, hi in zip(win.scored_lo, win.scored_hi):
            hits[lo : hi + 1] += 1
        assert hits[0] == 0 and np.all(hits[1:] == 1), (segments, hits)
        assert np.all(win.length <= seq_len) and np.all(win.length >= 1)
        seg_of = np.searchsorted(segments[:, 0], win.start, side="right") - 1
        assert np.all(win.start + win.length <= segments[seg_of, 1])  # never reads past its segment
        later = win.first > 0
        assert np.all(win.first[later] == seq_len - stride)


def test_document_segments_cut_at_bos():
    tokens = np.array([5, 1, 7, 8, 1, 9, 1])
    np.testing.assert_array_equal(document_segments(tokens, 1), [[0, 1], [1, 4], [4, 6]])


def test_sliding_with_stride_equal_window_is_plain_exactly(setup):
    """Whole windows, stride = window: the same sequences, the same numbers, bit for bit."""
    tokens = setup[2][: 12 * SEQ + 1]
    plain = run(setup, tokens, eval_mode="plain", record=False)
    sliding = run(setup, tokens, eval_mode="sliding", eval_stride=SEQ, eval_seq_len=SEQ, record=False)
    assert plain.tokens_scored == sliding.tokens_scored == 12 * SEQ
    assert (sliding.val_loss, sliding.val_bpb, sliding.bytes) == (plain.val_loss, plain.val_bpb, plain.bytes)


def test_sliding_scores_the_tail_plain_drops(setup):
    tokens = setup[2][: 12 * SEQ + 1 + 37]
    plain = run(setup, tokens, eval_mode="plain", record=False)
    sliding = run(setup, tokens, eval_mode="sliding", eval_stride=SEQ, record=False)
    assert plain.tokens_scored == 12 * SEQ
    assert sliding.tokens_scored == len(tokens) - 1 == plain.tokens_scored + 37
    assert sliding.info["plain_tokens"] == plain.tokens_scored
    assert sliding.bytes == bpb.stream_bytes(tokens, setup[1]) > plain.bytes


@pytest.mark.parametrize("doc_isolated", [False, True])
def test_sliding_counts_bytes_of_the_decoded_text_and_each_target_once(setup, doc_isolated):
    """(a) a wrong byte count fails here: the bytes equal the UTF-8 length of the decoded
    text of tokens[1:], found without the tables; (c) every target scored once."""
    sp, tables, tokens, _ = setup
    tokens = tokens[:1500]
    rep = run(setup, tokens, eval_mode="sliding", eval_stride=16, eval_doc_isolated=doc_isolated)
    assert rep.bytes == bpb.decoded_utf8_bytes(sp, tokens)
    pos, nll = rep.info["per_position"]
    np.testing.assert_array_equal(np.sort(pos), np.arange(1, len(tokens)))
    assert rep.tokens_scored == len(tokens) - 1 and np.all(np.isfinite(nll))
    # Recomputed from the recorded per-position NLL: the report's loss is their mean.
    assert rep.val_loss == pytest.approx(nll.sum() / (len(tokens) - 1), rel=1e-12)


def test_position_bytes_use_the_predecessor():
    """bytes[p] belongs to target p after p-1; a boundary predecessor drops the space byte."""
    sp = load_tokenizer(require(TOKENIZER_1024), 1024)
    tables = build_byte_tables(sp, 1024)
    piece = sp.piece_to_id("▁the")
    out = position_bytes(np.array([1, piece, piece]), tables)
    np.testing.assert_array_equal(out, [0, 3, 4])


def test_stride_and_doc_isolation_change_the_context(setup):
    """Same targets, other context: the numbers move (the 30-step golden model is too small
    to promise a direction; scripts/bench_eval.py measures it on a trained model)."""
    tokens = setup[2][:1500]
    assert np.sum(tokens[1:] == setup[0].bos_id()) >= 1
    flat = run(setup, tokens, eval_mode="sliding", eval_stride=16, record=False)
    whole = run(setup, tokens, eval_mode="sliding", eval_stride=SEQ, record=False)
    docs = run(setup, tokens, eval_mode="sliding", eval_stride=16, eval_doc_isolated=True, record=False)
    assert flat.tokens_scored == whole.tokens_scored == docs.tokens_scored
    assert flat.val_loss != whole.val_loss and flat.val_loss != docs.val_loss


def _perturbed_prefix_equal(setup, q, **fields):
    tokens = setup[2][:1500].copy()
    base = run(setup, tokens, **fields)
    changed = tokens.copy()
    changed[q:] = (changed[q:].astype(np.int64) * 7 + 3) % 1000 + 8  # every later token differs
    other = run(setup, changed, **fields)
    (p0, n0), (p1, n1) = base.info["per_position"], other.info["per_position"]
    a, b = np.zeros(len(tokens)), np.zeros(len(tokens))
    a[p0], b[p1] = n0, n1
    return a, b


@pytest.mark.parametrize("fields", [dict(eval_mode="sliding", eval_stride=16),
                                    dict(eval_mode="sliding", eval_stride=16, eval_doc_isolated=True)])
def test_score_of_a_token_ignores_later_tokens(setup, fields):
    """Acceptance (a) for sliding: changing tokens from q on leaves every score before q unchanged."""
    q = 1337  # in the second document
    a, b = _perturbed_prefix_equal(setup, q, **fields)
    np.testing.assert_array_equal(a[:q], b[:q])
    assert np.all(a[q:] != b[q:])


def _interpolate_uniform(nll, qlogp, side, targets):
    """Toy n-gram: lam * p_network + (1 - lam) * uniform, lam per position."""
    lam = side["lam"]
    return -jnp.log(lam * jnp.exp(-nll) + (1.0 - lam) / MODEL.vocab_size)


def _tilt_to_hint(nll, qlogp, side, targets):
    """Toy A2 tilt: p'(t) ~ p(t) exp(beta [t = hint])."""
    beta, hint_logp = side["beta"], qlogp[..., 0]
    is_hint = (targets == side["hint"]).astype(nll.dtype)
    return nll + jnp.log1p(jnp.exp(hint_logp) * jnp.expm1(beta)) - beta * is_hint


@pytest.mark.parametrize("mode", ["sliding+ngram", "ttt+ngram"])
def test_position_mix_is_applied_per_position(setup, monkeypatch, mode):
    """The n-gram hook: the evaluator hands combine the network NLL, the query log-probs and
    the side rows of the scored position (checked against the mix computed by hand); a tilt
    with beta = 0 is the network itself, with beta > 0 it moves the score."""
    sp, tables, tokens, _ = setup
    tokens = tokens[:700]
    n = len(tokens)
    lam = np.linspace(0.3, 0.9, n).astype(np.float32)
    hint = np.roll(tokens, 1).astype(np.int32)  # "predict the previous token": prefix-only
    beta = np.full(n, 1.5, np.float32)
    mixes = {"interp": PositionMix(np.zeros((n, 0), np.int32), {"lam": lam}, _interpolate_uniform),
             "tilt": PositionMix(hint[:, None], {"beta": beta, "hint": hint}, _tilt_to_hint),
             "tilt0": PositionMix(hint[:, None], {"beta": 0 * beta, "hint": hint}, _tilt_to_hint)}
    extra = dict(ttt_chunk_tokens=256, ttt_batch_seqs=2, ttt_epochs=1, ttt_chunks_per_call=2, ttt_lr=0.0)
    fields = dict(eval_mode=mode, eval_stride=16, **(extra if mode.startswith("ttt") else {}))
    net = run(setup, tokens, **{**fields, "eval_mode": mode.split("+")[0]})
    pos, nll = net.info["per_position"]
    got = {}
    for name, mix in mixes.items():
        monkeypatch.setattr("golfjax.eval.evaluator.build_mix", lambda cfg, toks, mix=mix: mix)
        got[name] = run(setup, tokens, **fields)
        np.testing.assert_array_equal(got[name].info["per_position"][0], pos)
        assert got[name].bytes == net.bytes and got[name].mode == mode
    expected = -np.log(lam[pos] * np.exp(-nll) + (1.0 - lam[pos]) / MODEL.vocab_size)
    np.testing.assert_allclose(got["interp"].info["per_position"][1], expected, rtol=1e-5)
    np.testing.assert_allclose(got["tilt0"].info["per_position"][1], nll, rtol=1e-5)
    assert abs(got["tilt"].val_loss - net.val_loss) > 1e-3


def test_byte_sidecar_replaces_the_tables(setup):
    """CaseOps: with a sidecar, bytes are the sidecar's at the scored positions (plain too)."""
    sp, tables, tokens, params = setup
    tokens = tokens[: 6 * SEQ + 20]
    sidecar = (np.arange(len(tokens)) % 5).astype(np.uint16)
    mesh = make_mesh(jax.devices()[:2])
    for mode, expected in (("sliding", int(sidecar[1:].sum())), ("plain", int(sidecar[1 : 6 * SEQ + 1].sum()))):
        ev = Evaluator(eval_config(eval_mode=mode, eval_stride=16), mesh, tables, byte_sidecar=sidecar, progress=False)
        assert ev.evaluate(put_replicated(params, mesh), tokens).bytes == expected


def test_eval_config_is_checked():
    with pytest.raises(ConfigError, match="eval_mode"):
        resolve(None, ["eval.eval_mode=beam"])
    with pytest.raises(ConfigError, match="eval_stride"):
        resolve(None, ["eval.eval_seq_len=64", "eval.eval_stride=65"])
    cfg, _ = resolve(None, [], {"EVAL_MODE": "ttt", "TTT_LR": "0.005", "EVAL_STRIDE": "32"})
    assert (cfg.eval.eval_mode, cfg.eval.ttt_lr, cfg.eval.eval_stride) == ("ttt", 0.005, 32)


def test_evaluate_cli_sliding_mode(golden_dir, golden_shards):
    """scripts/evaluate.py --mode sliding --stride S: reference lines, then one JSON line with
    the mode, the scored tokens (the whole stream), bytes equal to the decoded text, seconds."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = dict(os.environ, PYTHONPATH=str(REPO), VOCAB_SIZE="1024", NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4",
               NUM_KV_HEADS="2", MLP_MULT="2", TRAIN_SEQ_LEN="64", EVAL_BATCH_WINDOWS="64")
    cmd = [sys.executable, str(REPO / "scripts" / "evaluate.py"), "--reference-state",
           str(golden_dir / "trained" / "final_state.npz"), "--data-dir", str(golden_shards), "--tokenizer",
           str(TOKENIZER_1024), "--mode", "sliding", "--stride", "32", "--check-bytes", "--cpu-devices", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert lines[-2].startswith("final_sliding_window_exact val_loss:")
    assert out["mode"] == "sliding" and out["stride"] == 32 and out["bytes_match"]
    assert out["tokens_scored"] == out["stream_targets"] >= out["plain_tokens"]
    assert {"val_loss", "val_bpb", "bytes", "seconds"} <= set(out) and out["seconds"]["score"] > 0


def test_training_run_ends_with_the_configured_eval_mode(golden_shards, tmp_path):
    """eval.eval_mode=sliding: after the plain round trip, the run logs the Evaluator's lines
    and a final_eval_mode metrics event, and still finishes (artifact, final event)."""
    import io

    from golfjax.train.loop import run as train_run
    from tests.test_train_loop import tiny_config

    cfg = tiny_config(golden_shards, tmp_path, iterations=2, warmdown_iters=1, max_wallclock_seconds=0.0)
    cfg = replace(cfg, eval=replace(cfg.eval, eval_mode="sliding", eval_stride=16, eval_batch_windows=64))
    console = io.StringIO()
    result = train_run(cfg, console=console)
    log = console.getvalue()
    assert "final_int8_zlib_roundtrip_exact" in log and "final_sliding_window_exact val_loss:" in log
    events = [json.loads(line) for line in (tmp_path / "loop" / "metrics.jsonl").read_text().splitlines()]
    mode = [e for e in events if e["event"] == "final_eval_mode"]
    assert len(mode) == 1 and mode[0]["mode"] == "sliding"
    # The final evaluation scores the whole validation stream (as scripts/score.py does), not the
    # plain evaluator's truncated one: every target after the first token, the tail included.
    from golfjax.eval.evaluator import load_validation_stream
    assert mode[0]["tokens_scored"] == len(load_validation_stream(cfg)) - 1 > result.roundtrip.tokens
    assert events[-1]["event"] == "final" and result.artifact_total_bytes > 0
    # The run's score is the configured mode's, not the plain round trip's.
    final = events[-1]
    assert final["score_mode"] == "sliding" and final["score_val_bpb"] == mode[0]["val_bpb"]
    assert final["score_val_bpb"] != final["roundtrip_val_bpb"] and final["score_eval_seconds"] > 0


def test_load_byte_sidecar_uses_caseops_checks_and_cuts_to_the_stream(monkeypatch):
    """CaseOps off: no sidecar (byte tables); on: caseops.evaluation_bytes over the whole
    validation stream, cut to the tokens the run scores (the training loop's stream is truncated)."""
    from golfjax.data import caseops
    from golfjax.eval import evaluator

    cfg = Config()
    assert evaluator.load_byte_sidecar(cfg, 5) is None
    on = replace(cfg, caseops=replace(cfg.caseops, caseops_enabled=True))
    monkeypatch.setattr(evaluator, "load_validation_stream", lambda c: np.arange(10))
    monkeypatch.setattr(caseops, "evaluation_bytes", lambda c, toks: 2 * np.asarray(toks))
    np.testing.assert_array_equal(evaluator.load_byte_sidecar(on, 3), [0, 2, 4])
