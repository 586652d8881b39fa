"""golfjax.sample and scripts/sample.py: windows, greedy = argmax decoding, seeds, the CLI."""

import os
import subprocess
import sys
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golfjax import sample
from golfjax.config import Config
from golfjax.model import gpt
from tests.conftest import GOLDEN, REPO, TOKENIZER_1024, require

SEQ = 16


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer model with every weight random (the reference zero-inits the output
    projections, which would make the blocks identities and the test weak)."""
    c = Config()
    cfg = replace(c, model=replace(c.model, vocab_size=64, num_layers=2, model_dim=32, num_heads=4,
                                   num_kv_heads=2), train=replace(c.train, train_seq_len=SEQ))
    shapes = jax.eval_shape(lambda k: gpt.init_params(cfg.model, k), jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype), shapes)
    return cfg, params


def test_buckets_and_windows():
    assert sample.window_buckets(1024) == (64, 128, 256, 512, 1024)
    assert sample.window_buckets(64) == (64,)
    assert sample.window_buckets(100) == (64, 100)
    assert sample.window_buckets(16, 4) == (4, 8, 16)
    w, pos = sample.context_window([5, 6, 7], 16, (4, 8, 16))
    assert w.shape == (1, 4) and pos == 2 and w[0].tolist() == [5, 6, 7, 0]
    w, pos = sample.context_window(list(range(20)), 16, (4, 8, 16))
    assert w.shape == (1, 16) and pos == 15 and w[0].tolist() == list(range(4, 20))
    with pytest.raises(ValueError):
        sample.context_window([], 16, (16,))


def test_greedy_equals_argmax_decoding(tiny, monkeypatch):
    """Every greedy token is the argmax of an independent forward: unpadded, unbucketed,
    over the first SEQ tokens (teacher forcing) while the context fits, then over the
    exact SEQ-token window ending at the previous token."""
    cfg, params = tiny
    monkeypatch.setattr(sample, "MIN_BUCKET", 4)  # buckets 4, 8, 16: every path is used
    context = [1, 17, 42]
    new = sample.generate(params, cfg, context, num_tokens=2 * SEQ, temperature=0.0)
    assert len(new) == 2 * SEQ and all(0 <= t < 64 for t in new)
    seq = context + new
    fwd = jax.jit(lambda p, x: gpt.forward(p, cfg.model, x))
    first = np.asarray(fwd(params, jnp.asarray([seq[:SEQ]], jnp.int32))[0]).argmax(-1)
    for n in range(len(context), len(seq)):  # n = context length when seq[n] was chosen
        if n <= SEQ:
            expected = first[n - 1]
        else:
            expected = np.asarray(fwd(params, jnp.asarray([seq[n - SEQ:n]], jnp.int32))[0, -1]).argmax()
        assert seq[n] == expected, f"token {n}"
    assert len(set(new)) > 3  # not a degenerate constant stream


def test_seeded_sampling(tiny):
    cfg, params = tiny
    a = sample.generate(params, cfg, [1, 2], 20, temperature=1.5, seed=3)
    b = sample.generate(params, cfg, [1, 2], 20, temperature=1.5, seed=3)
    c = sample.generate(params, cfg, [1, 2], 20, temperature=1.5, seed=4)
    assert a == b and len(a) == 20
    assert a != c
    assert sample.generate(params, cfg, [1, 2], 8, temperature=1.0, top_k=1, seed=9) == \
        sample.generate(params, cfg, [1, 2], 8, temperature=0.0)
    assert sample.generate(params, cfg, [1, 2], 0) == []
    with pytest.raises(ValueError, match="vocabulary"):
        sample.generate(params, cfg, [1, 64], 1)
    with pytest.raises(ValueError, match="temperature"):
        sample.generate(params, cfg, [1], 1, temperature=-1.0)


GOLDEN_ENV = {"VOCAB_SIZE": "1024", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
              "MLP_MULT": "2", "TRAIN_SEQ_LEN": "64"}


def test_script_on_golden_state_matches_library(monkeypatch):
    """scripts/sample.py on the golden trained state (reference env vars) prints the
    prompt and the same greedy continuation as golfjax.sample in process."""
    state = require(GOLDEN / "trained" / "final_state.npz")
    tok = require(TOKENIZER_1024)
    from golfjax import interop
    from golfjax.config import resolve
    from golfjax.data.tokenizer import load_tokenizer

    prompt = "The city council said"
    env = {**os.environ, **GOLDEN_ENV, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(REPO / "scripts" / "sample.py"), "--reference-state", str(state), "--tokenizer",
           str(tok), "--prompt", prompt, "--tokens", "40", "--temperature", "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.rstrip("\n")
    assert printed.startswith(prompt)

    for k, v in GOLDEN_ENV.items():
        monkeypatch.setenv(k, v)
    cfg, _ = resolve(None, [])
    params = interop.load_reference_params(state, cfg.model)
    sp = load_tokenizer(tok, 1024)
    out = sample.sample_text(params, cfg, sp, prompt, 40, temperature=0.0)
    assert out.prompt_ids[0] == sp.bos_id() and len(out.new_ids) == 40
    assert printed == out.text
    assert len(out.text) > len(prompt) + 40  # 40 real pieces were decoded, not control tokens


def test_script_user_errors(tmp_path):
    tok = require(TOKENIZER_1024)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    script = str(REPO / "scripts" / "sample.py")
    proc = subprocess.run([sys.executable, script, "--artifact", str(tmp_path / "missing.golf"), "--tokenizer",
                           str(tok)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, script, "--artifact", "x.golf", "--tokens", "-3"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--tokens must be >= 0" in proc.stderr
