"""GPTQ calibration: training-stream and self-generated tokens, grams -> reference-named Hessians."""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golfjax import sample
from golfjax.config import Config
from golfjax.data.shards import write_shard
from golfjax.export import calibrate
from golfjax.model import gpt

SEQ = 12


@pytest.fixture(scope="module")
def tiny():
    c = Config()
    cfg = replace(c, model=replace(c.model, vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2),
                  train=replace(c.train, train_seq_len=SEQ))
    shapes = jax.eval_shape(lambda k: gpt.init_params(cfg.model, k), jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype), shapes)
    return cfg, params


def test_train_tokens_are_the_front_of_the_stream(tmp_path) -> None:
    a, b = np.arange(0, 50, dtype=np.uint16), np.arange(100, 140, dtype=np.uint16)
    write_shard(tmp_path / "fineweb_train_000000.bin", a)
    write_shard(tmp_path / "fineweb_train_000001.bin", b)
    toks = calibrate.calibration_tokens_train(sorted(tmp_path.glob("*.bin")), 75, 10)
    assert toks.shape == (7, 10) and toks.dtype == np.int32
    assert np.array_equal(toks.reshape(-1), np.concatenate([a, b])[:70])
    with pytest.raises(ValueError, match="at least one sequence"):
        calibrate.calibration_tokens_train(sorted(tmp_path.glob("*.bin")), 5, 10)


def test_selfgen_greedy_matches_the_sampler(tiny) -> None:
    """Temperature 0 must continue each random first token exactly as golfjax.sample's greedy decoding."""
    cfg, params = tiny
    toks = calibrate.calibration_tokens_selfgen(params, cfg, num_seqs=3, seq_len=SEQ, temperature=0.0, batch=2)
    assert toks.shape == (3, SEQ) and toks.dtype == np.int32
    for row in toks:
        assert sample.generate(params, cfg, [int(row[0])], SEQ - 1, temperature=0.0) == row[1:].tolist()


def test_selfgen_sampling_is_seeded(tiny) -> None:
    cfg, params = tiny
    a = calibrate.calibration_tokens_selfgen(params, cfg, 4, SEQ, temperature=0.8, seed=3, batch=2)
    b = calibrate.calibration_tokens_selfgen(params, cfg, 4, SEQ, temperature=0.8, seed=3, batch=2)
    c = calibrate.calibration_tokens_selfgen(params, cfg, 4, SEQ, temperature=0.8, seed=4, batch=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() < cfg.model.vocab_size
    assert len(np.unique(a[:, 0])) > 1  # random first tokens
    with pytest.raises(ValueError, match="temperature"):
        calibrate.calibration_tokens_selfgen(params, cfg, 1, SEQ, temperature=-1.0)


def test_grams_map_to_reference_names() -> None:
    g3 = np.stack([np.eye(4) * (i + 1) for i in range(3)])
    out = calibrate.grams_to_reference({"blocks/attn/c_q/kernel": g3, "tok_emb/embedding": np.eye(5)})
    assert sorted(out) == ["blocks.0.attn.c_q.weight", "blocks.1.attn.c_q.weight", "blocks.2.attn.c_q.weight",
                           "tok_emb.weight"]
    assert out["blocks.2.attn.c_q.weight"][0, 0] == 3
    with pytest.raises(ValueError, match="layers, in, in"):
        calibrate.grams_to_reference({"blocks/mlp/fc/kernel": np.eye(4)})


def test_collect_hessians_sums_batches_and_divides_by_tokens(tiny, monkeypatch) -> None:
    """With a stand-in gram function (the output-side gram of the final hidden states), the
    accumulation over batches, the normalisation and the naming are exact."""
    cfg, params = tiny

    def fake_grams(p, model_cfg, tokens):
        h = gpt.hidden_states(p, model_cfg, tokens).reshape(-1, model_cfg.model_dim).astype(jnp.float32)
        x = jnp.take(p["tok_emb"]["embedding"], tokens, axis=0).reshape(-1, model_cfg.model_dim)
        return {"tok_emb/embedding": h.T @ h, "blocks/attn/c_q/kernel": jnp.stack([x.T @ x] * model_cfg.num_layers)}

    monkeypatch.setattr(gpt, "matrix_input_grams", fake_grams, raising=False)
    tokens = np.random.default_rng(0).integers(0, 64, size=(4, SEQ)).astype(np.int32)
    hs = calibrate.collect_hessians(params, cfg, tokens, batch=2)
    assert sorted(hs) == ["blocks.0.attn.c_q.weight", "blocks.1.attn.c_q.weight", "tok_emb.weight"]
    h = np.asarray(gpt.hidden_states(params, cfg.model, jnp.asarray(tokens)), np.float64).reshape(-1, 32)
    assert np.allclose(hs["tok_emb.weight"], h.T @ h / tokens.size, rtol=1e-4, atol=1e-6)
    assert hs["tok_emb.weight"].dtype == np.float32 and hs["tok_emb.weight"].shape == (32, 32)
    x = np.asarray(params["tok_emb"]["embedding"], np.float64)[tokens.reshape(-1)]
    assert np.allclose(hs["blocks.1.attn.c_q.weight"], x.T @ x / tokens.size, rtol=1e-4, atol=1e-6)


def test_calibration_source_is_checked(tiny) -> None:
    cfg, params = tiny
    bad = replace(cfg, export=replace(cfg.export, quant_calib_source="val"))
    with pytest.raises(ValueError, match="calibration source"):
        calibrate.calibration_tokens(params, bad)


def test_train_calibration_without_shards_says_what_to_do(tiny, tmp_path) -> None:
    cfg, params = tiny
    empty = replace(cfg, data=replace(cfg.data, data_path=str(tmp_path)))
    with pytest.raises(ValueError, match="quant_calib_source=selfgen"):
        calibrate.calibration_tokens(params, empty)


GOLDEN_MODEL = dict(vocab_size=1024, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2,
                    compute_dtype="float32")


@pytest.fixture(scope="module")
def golden_trained(golden_dir):
    """The reference-trained golden model, its training batches split into calibration and held-out."""
    from golfjax import interop

    c = Config()
    cfg = replace(c, model=replace(c.model, **GOLDEN_MODEL))
    state = interop.load_reference_state(golden_dir / "trained" / "final_state.npz")
    with np.load(golden_dir / "trained" / "batches.npz", allow_pickle=False) as z:
        x, y = z["x"].reshape(-1, 64), z["y"].reshape(-1, 64)
    return cfg, state, interop.from_reference_state(state, cfg.model), x[:160], x[160:], y[160:]


@pytest.fixture(scope="module")
def golden_hessians(golden_trained):
    cfg, _, params, cal, _, _ = golden_trained
    return calibrate.collect_hessians(params, cfg, cal, batch=32)


def test_real_hessians_cover_every_matrix(golden_trained, golden_hessians) -> None:
    cfg, state, params, cal, _, _ = golden_trained
    hs = golden_hessians
    weights = {n for n, v in state.items() if v.ndim == 2 and n.endswith(".weight") and "blocks." in n}
    assert set(hs) == weights | {"tok_emb.weight"}
    for name, h in hs.items():
        assert h.shape == (state[name].shape[1],) * 2, name
        assert np.allclose(h, h.T, atol=1e-5 * np.abs(h).max()) and np.all(np.diagonal(h) >= 0), name
    hidden = np.asarray(gpt.hidden_states(params, cfg.model, jnp.asarray(cal)), np.float64).reshape(-1, 64)
    assert np.allclose(hs["tok_emb.weight"], hidden.T @ hidden / hidden.shape[0], rtol=1e-3, atol=1e-5)


def test_gptq_on_a_trained_model_beats_round_to_nearest(golden_trained, golden_hessians) -> None:
    """End to end: real calibration Hessians, every matrix int4; held-out loss closer to the float model's."""
    from golfjax import interop
    from golfjax.export import quant

    cfg, state, params, _, held_x, held_y = golden_trained
    hs = golden_hessians
    loss = jax.jit(lambda p: gpt.loss(p, cfg.model, jnp.asarray(held_x), jnp.asarray(held_y)))

    def held_out(plan, hessians=None) -> float:
        restored = quant.dequantize_state(quant.quantize_state(state, plan, hessians)[0])
        return float(loss(interop.from_reference_state(restored, cfg.model)))

    rtn_rule = quant.QuantRule(bits=4, clip="rowmax")
    gptq_rule = replace(rtn_rule, gptq=True)
    rtn = held_out(quant.QuantPlan(attn=rtn_rule, mlp=rtn_rule, embed=rtn_rule, passthrough_max_numel=0))
    gptq = held_out(quant.QuantPlan(attn=gptq_rule, mlp=gptq_rule, embed=gptq_rule, passthrough_max_numel=0), hs)
    base = float(loss(params))
    assert base < gptq < rtn
    assert gptq - base < 0.75 * (rtn - base)


def test_calibration_tokens_follow_the_config(tiny, tmp_path) -> None:
    cfg, params = tiny
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(1000, dtype=np.uint16) % 64)
    e = replace(cfg.export, quant_calib_batches=3, quant_calib_batch_tokens=40, quant_calib_seq_len=SEQ,
                quant_calib_selfgen_seqs=2)
    train = calibrate.calibration_tokens(params, replace(cfg, export=e, data=replace(cfg.data, data_path=str(tmp_path))))
    assert train.shape == (120 // SEQ, SEQ) and np.array_equal(train.reshape(-1), np.arange(120) % 64)
    gen = calibrate.calibration_tokens(params, replace(cfg, export=replace(e, quant_calib_source="selfgen",
                                                                          quant_calib_temperature=0.8)))
    assert gen.shape == (2, SEQ)


def test_export_pipeline_runs_gptq_with_real_calibration(golden_trained, tmp_path) -> None:
    """The export recipe calibrates on the training shards, runs GPTQ and writes an artifact whose
    weights restore close to the float model's."""
    from golfjax.export import pipeline, quant

    cfg, state, params, cal, held_x, held_y = golden_trained
    write_shard(tmp_path / "fineweb_train_000000.bin", cal.reshape(-1).astype(np.uint16))
    cfg = replace(cfg, data=replace(cfg.data, data_path=str(tmp_path)),
                  export=replace(cfg.export, quant_passthrough_max_numel=0, quant_calib_batches=2,
                                 quant_calib_batch_tokens=2048, quant_calib_seq_len=64))
    report = pipeline.export_params(params, cfg, tmp_path / "m.golf", scheme="gptq-int6-sdclip")
    _, restored, state_q, _ = pipeline.load_artifact(report.path)
    assert {qt.scheme.split("_lqer")[0] for n, qt in state_q.tensors.items() if ".mlp." in n} == {"int6_per_row"}
    loss = jax.jit(lambda p: gpt.loss(p, cfg.model, jnp.asarray(held_x), jnp.asarray(held_y)))
    assert abs(float(loss(restored)) - float(loss(params))) < 0.05
