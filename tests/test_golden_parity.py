"""Parity with the PyTorch reference's own outputs (../shared/golden).

Tolerances are those of ../shared/golden/README.md. `trained/` is the check
that sees attention and MLP bugs: at initialisation the zero-initialised output
projections hide them from the logits.
"""

from __future__ import annotations

import json
from dataclasses import replace

import jax
import numpy as np
import pytest

from golfjax import interop
from golfjax.config import Config, ModelConfig
from golfjax.data.loader import load_validation_tokens
from golfjax.data.shards import list_shards
from golfjax.data.tokenizer import build_byte_tables, load_tokenizer
from golfjax.eval.plain import evaluate_plain
from golfjax.model import gpt
from golfjax.parallel import make_mesh, put_replicated
from tests.conftest import TOKENIZER_1024

GOLDEN_MODEL = ModelConfig(vocab_size=1024, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2,
                           compute_dtype="float32")
SEQ = 64


def golden_config() -> Config:
    c = Config()
    return replace(
        c, model=GOLDEN_MODEL,
        train=replace(c.train, iterations=5, train_batch_tokens=512, train_seq_len=SEQ, max_wallclock_seconds=0.0),
        eval=replace(c.eval, val_batch_size=65536),
        # The golden training steps match eager bf16 Newton-Schulz (README, "Faithfulness").
        optim=replace(c.optim, muon_ns_rounding="eager"),
    )


def golden_json(golden_dir, sub=""):
    return json.loads((golden_dir / sub / "golden.json").read_text())


def load_params(path):
    return interop.from_reference_state(interop.load_reference_state(path), GOLDEN_MODEL)


@pytest.fixture(scope="module")
def val_setup(golden_shards):
    sp = load_tokenizer(TOKENIZER_1024, 1024)
    tables = build_byte_tables(sp, 1024)
    tokens = load_validation_tokens(list_shards(golden_shards, "fineweb_val_*.bin"), SEQ)
    return tokens, tables


def evaluate(params, val_setup, devices=1):
    tokens, tables = val_setup
    mesh = make_mesh(jax.devices()[:devices])
    return evaluate_plain(put_replicated(params, mesh), GOLDEN_MODEL, tokens, tables, mesh, SEQ, 128,
                          progress=False)


def test_reference_names_round_trip(golden_dir):
    state = interop.load_reference_state(golden_dir / "init_state.npz")
    back = interop.to_reference_state(interop.from_reference_state(state, GOLDEN_MODEL))
    assert set(back) == set(state)
    for name in state:
        np.testing.assert_array_equal(back[name], state[name], err_msg=name)


def test_wrong_architecture_is_a_clear_error(golden_dir):
    state = interop.load_reference_state(golden_dir / "init_state.npz")
    with pytest.raises(interop.InteropError, match="missing"):
        interop.from_reference_state(state, replace(GOLDEN_MODEL, num_layers=3))
    with pytest.raises(interop.InteropError, match="shape"):
        interop.from_reference_state(state, replace(GOLDEN_MODEL, mlp_mult=3))


def test_initial_logits_and_micro_losses(golden_dir):
    params = load_params(golden_dir / "init_state.npz")
    batch = np.load(golden_dir / "step1_batch.npz")
    ref = np.load(golden_dir / "init_logits_step1.npz")
    x, y = batch["x"][:, 0], batch["y"][:, 0]
    logits = np.asarray(jax.jit(lambda p, t: gpt.forward(p, GOLDEN_MODEL, t))(params, x))
    assert np.abs(logits - ref["logits"]).max() <= 1e-6
    losses = np.asarray(jax.jit(jax.vmap(lambda a, b: gpt.loss(params, GOLDEN_MODEL, a[None], b[None])))(x, y))
    np.testing.assert_allclose(losses, ref["loss"], atol=1e-5, rtol=0)


def test_step1_gradients(golden_dir):
    from golfjax.train.step import accumulate_grads

    params = load_params(golden_dir / "init_state.npz")
    batch = np.load(golden_dir / "step1_batch.npz")
    cfg = golden_config()
    grads, _ = jax.jit(lambda p, x, y: accumulate_grads(p, cfg, x, y))(params, batch["x"], batch["y"])
    ours = interop.to_reference_state(grads)
    ref = np.load(golden_dir / "step1_grads.npz")
    for name in ref.files:
        r, o = ref[name], ours[name]
        norm = np.linalg.norm(r)
        if norm == 0:
            assert not np.any(o), f"{name}: reference gradient is exactly zero, ours is not"
        else:
            assert np.linalg.norm(o - r) / norm <= 1e-5, name


@pytest.mark.parametrize("state,sub,key", [
    ("init_state.npz", "", "init_val"),
    ("final_state.npz", "", "val"),
    ("final_state.npz", "trained", "val"),
])
def test_validation_loss_and_bpb(golden_dir, val_setup, state, sub, key):
    gj = golden_json(golden_dir, sub)
    result = evaluate(load_params(golden_dir / sub / state), val_setup)
    assert result.tokens == golden_json(golden_dir)["data"]["val_tokens_evaluated"]
    assert result.bytes == golden_json(golden_dir)["data"]["val_bytes_evaluated"]
    assert abs(result.val_loss - gj[f"{key}_loss"]) <= 1e-6
    assert abs(result.val_bpb - gj[f"{key}_bpb"]) <= 1e-6


def test_eval_on_8_devices_equals_1(golden_dir, val_setup):
    params = load_params(golden_dir / "trained" / "final_state.npz")
    one = evaluate(params, val_setup, devices=1)
    eight = evaluate(params, val_setup, devices=8)
    assert len(jax.devices()) == 8
    assert eight.tokens == one.tokens and eight.bytes == one.bytes
    # Per-device batch shapes change XLA's float32 matmul blocking, so last bits may differ.
    assert abs(eight.val_loss - one.val_loss) <= 1e-6
    assert abs(eight.val_bpb - one.val_bpb) <= 1e-6
    gj = golden_json(golden_dir, "trained")
    assert abs(eight.val_loss - gj["val_loss"]) <= 1e-6
