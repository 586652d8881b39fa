"""Full-Hessian GPTQ: lower output error than round-to-nearest at the same bits, and its mechanics."""

from __future__ import annotations

import numpy as np
import pytest

from golfjax.export import gptq, quant
from golfjax.export.quant import QuantPlan, QuantRule


def calibration(n: int = 1024, cols: int = 96, seed: int = 0) -> np.ndarray:
    """Correlated inputs with unequal column energy (what makes GPTQ worth it)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((cols, cols)) / np.sqrt(cols)
    energy = np.exp(rng.uniform(-1.5, 1.5, cols))
    return (rng.standard_normal((n, cols)) @ mix * energy + 0.05 * rng.standard_normal((n, cols))).astype(np.float32)


def linear(rows: int = 48, cols: int = 96, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.05).astype(np.float32)


def output_rms(x: np.ndarray, w: np.ndarray, w_hat: np.ndarray) -> float:
    """||X W^T - X W_hat^T||_F / sqrt(n): measured on the activations themselves."""
    d = x.astype(np.float64) @ (w.astype(np.float64) - w_hat).T
    return float(np.linalg.norm(d) / np.sqrt(len(x)))


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("clip", ["rowmax", "sdclip"])
def test_gptq_beats_round_to_nearest_on_the_output(bits: int, clip: str) -> None:
    x, w = calibration(), linear()
    h = x.T.astype(np.float64) @ x / len(x)
    rtn = quant.dequantize_tensor(quant.quantize_tensor(w, QuantRule(bits=bits, clip=clip)))
    qt = quant.quantize_tensor(w, QuantRule(bits=bits, clip=clip, gptq=True), h, block=32)
    g = quant.dequantize_tensor(qt)
    assert qt.scheme == f"int{bits}_per_row"
    lo, hi = quant.int_range(bits)
    assert qt.arrays["q"].min() >= lo and qt.arrays["q"].max() <= hi
    assert output_rms(x, w, g) < 0.85 * output_rms(x, w, rtn)
    # trace(E H E^T) is the same quantity, from H alone
    assert gptq.output_error(w, g, h) == pytest.approx(output_rms(x, w, g) ** 2, rel=1e-6)


def test_gptq_without_act_order_also_beats_rtn() -> None:
    x, w = calibration(seed=5), linear(seed=6)
    h = x.T.astype(np.float64) @ x / len(x)
    s = quant.stored_scale(quant.rowmax_clip(w) / 15).astype(np.float32)
    q = gptq.gptq_quantize(w, h, s, -15, 15, act_order=False)
    rtn = quant.quantize_rows(w, s.astype(np.float16), -15, 15)
    assert output_rms(x, w, q * s[:, None]) < output_rms(x, w, rtn * s[:, None])


def test_block_size_does_not_change_the_result() -> None:
    """Lazy block updates are an exact reordering of the column-by-column algorithm."""
    x, w = calibration(cols=64), linear(cols=64)
    h = x.T.astype(np.float64) @ x / len(x)
    s = quant.stored_scale(quant.rowmax_clip(w) / 31).astype(np.float32)
    one_block = gptq.gptq_quantize(w, h, s, -31, 31, block=64)
    small = gptq.gptq_quantize(w, h, s, -31, 31, block=8)
    assert np.mean(one_block == small) > 0.999


def test_dead_inputs_get_zero_codes() -> None:
    x, w = calibration(cols=40), linear(cols=40)
    x[:, [3, 17]] = 0.0
    h = x.T.astype(np.float64) @ x / len(x)
    s = quant.stored_scale(quant.rowmax_clip(w) / 31).astype(np.float32)
    q = gptq.gptq_quantize(w, h, s, -31, 31)
    assert not q[:, [3, 17]].any() and q[:, 0].any()


def test_singular_hessian_is_damped_and_bad_shapes_refused() -> None:
    x = calibration(n=8, cols=32)  # rank 8 < 32
    w = linear(cols=32)
    h = x.T.astype(np.float64) @ x / len(x)
    s = quant.stored_scale(quant.rowmax_clip(w) / 31).astype(np.float32)
    assert gptq.gptq_quantize(w, h, s, -31, 31).shape == w.shape
    with pytest.raises(ValueError, match="does not match"):
        gptq.gptq_quantize(w, h[:-1, :-1], s, -31, 31)
    with pytest.raises(ValueError, match="non-finite"):
        gptq.gptq_quantize(w, h * np.nan, s, -31, 31)


def test_search_with_gptq_tries_every_percentile() -> None:
    x, w = calibration(), linear()
    h = x.T.astype(np.float64) @ x / len(x)
    candidates = (0.99, 0.999, 1.0)
    q, s = quant.quantize_codes(w, QuantRule(bits=5, clip="search", percentiles=candidates, gptq=True), h)
    mse = quant.matrix_mse(w, quant.dequantize_rows(q, s))
    for p in candidates:
        qp, sp = quant.quantize_codes(w, QuantRule(bits=5, clip="percentile", clip_q=p, gptq=True), h)
        assert mse <= quant.matrix_mse(w, quant.dequantize_rows(qp, sp)) + 1e-12


def test_state_gptq_uses_the_output_side_hessian_for_the_tied_embedding() -> None:
    """tok_emb (V, d) is the logit projection: its Hessian is over the final hidden states (d, d)."""
    rng = np.random.default_rng(3)
    d, vocab = 96, 700
    hidden = calibration(cols=d, seed=4)
    state = {
        "tok_emb.weight": (rng.standard_normal((vocab, d)) * 0.05).astype(np.float32),
        "blocks.0.mlp.fc.weight": linear(rows=800, cols=d, seed=8),
    }
    h = hidden.T.astype(np.float64) @ hidden / len(hidden)
    hessians = {"tok_emb.weight": h, "blocks.0.mlp.fc.weight": h}
    rtn_plan = QuantPlan(embed=QuantRule(bits=5), mlp=QuantRule(bits=5))
    gptq_plan = QuantPlan(embed=QuantRule(bits=5, gptq=True), mlp=QuantRule(bits=5, gptq=True))
    rtn = quant.dequantize_state(quant.quantize_state(state, rtn_plan)[0])
    g = quant.dequantize_state(quant.quantize_state(state, gptq_plan, hessians)[0])
    for name, w in state.items():
        assert output_rms(hidden, w, g[name]) < 0.85 * output_rms(hidden, w, rtn[name]), name
    with pytest.raises(ValueError, match="no calibration Hessian"):
        quant.quantize_state(state, gptq_plan, {"tok_emb.weight": h})


def test_untied_input_embedding_is_rounded_not_gptqd() -> None:
    """Untied, tok_emb is a lookup table (no input activations); lm_head carries the output-side Hessian."""
    rng = np.random.default_rng(9)
    d = 96
    state = {"tok_emb.weight": (rng.standard_normal((700, d)) * 0.05).astype(np.float32),
             "lm_head.weight": (rng.standard_normal((700, d)) * 0.05).astype(np.float32)}
    hidden = calibration(cols=d, seed=10)
    h = hidden.T.astype(np.float64) @ hidden / len(hidden)
    plan = QuantPlan(embed=QuantRule(bits=6, gptq=True))
    state_q, _ = quant.quantize_state(state, plan, {"lm_head.weight": h})
    rtn = quant.quantize_tensor(state["tok_emb.weight"], QuantRule(bits=6))
    assert np.array_equal(state_q.tensors["tok_emb.weight"].arrays["q"], rtn.arrays["q"])
    head_rtn = quant.dequantize_tensor(quant.quantize_tensor(state["lm_head.weight"], QuantRule(bits=6)))
    head = quant.dequantize_tensor(state_q.tensors["lm_head.weight"])
    assert output_rms(hidden, state["lm_head.weight"], head) < output_rms(hidden, state["lm_head.weight"], head_rtn)
