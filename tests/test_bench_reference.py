"""scripts/bench_reference.py, the timing harness of the PyTorch reference train_gpt.py.

The command line is checked everywhere (it must work without torch). One step of
the reference itself runs only where torch is importable and
GOLFJAX_REFERENCE_TRAIN_GPT names a copy of openai/parameter-golf's train_gpt.py
(golfjax does not ship it): it is a benchmark tool, and CI has neither.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_reference.py"
ENV_VAR = "GOLFJAX_REFERENCE_TRAIN_GPT"

# Runs the script as __main__ in a Python where `import torch` fails, installed or not.
_NO_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
             "runpy.run_path(sys.argv[0], run_name='__main__')")

TINY = dict(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=128, train_seq_len=32)

KEYS = {"tokens_per_s", "step_ms", "step_ms_min", "peak_rss_mb", "compile_s", "tokens_per_step", "steps",
        "warmup_steps", "loss", "loss_finite", "dtype", "compiled", "torch", "threads", "machine", "cpu",
        "shape", "reference_sha256"}


def _run_without_torch(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GOLFJAX_DEBUG"}
    return subprocess.run([sys.executable, "-c", _NO_TORCH, str(SCRIPT), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_help_without_torch():
    proc = _run_without_torch("--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--reference", "--dtype", "--compile", "--no-compile", "--steps", "--threads"):
        assert flag in proc.stdout


def test_missing_reference_is_one_error_line(tmp_path):
    proc = _run_without_torch("--reference", str(tmp_path / "train_gpt.py"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: reference file not found"), proc.stderr


def test_reference_without_torch_is_one_error_line(tmp_path):
    ref = tmp_path / "train_gpt.py"
    ref.write_text("raise SystemExit('must not be imported without torch')\n")
    proc = _run_without_torch("--reference", str(ref))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: torch is not importable"), proc.stderr


def _harness():
    spec = importlib.util.spec_from_file_location("bench_reference_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def reference() -> str:
    path = os.environ.get(ENV_VAR)
    if not path:
        pytest.skip(f"set {ENV_VAR}=/path/to/train_gpt.py (openai/parameter-golf) to time the reference")
    pytest.importorskip("torch", reason="the reference harness needs torch in this Python")
    if not Path(path).is_file():
        pytest.fail(f"{ENV_VAR}={path} is not a file")
    return path


@pytest.mark.parametrize("dtype,compiled", [
    ("fp32", False),
    ("bf16", False),
    pytest.param("bf16", True, marks=pytest.mark.slow),  # torch.compile on CPU: ~1-2 minutes
])
def test_one_tiny_step(reference, dtype, compiled):
    bench = _harness()
    result = bench.bench(reference, dtype=dtype, compile=compiled, steps=1, warmup=1, threads=1,
                         train_batch_tokens=8 * TINY["train_seq_len"], overrides=TINY)
    json.dumps(result)
    assert KEYS <= result.keys()
    assert result["dtype"] == dtype and result["compiled"] is compiled
    assert result["tokens_per_step"] == 256 and result["grad_accum_steps"] == 8
    assert result["shape"]["num_layers"] == 2 and result["threads"] == 1
    assert result["loss_finite"] and math.isfinite(result["loss"])
    # Uniform random tokens: the first loss is about log(vocab).
    assert abs(result["loss_first"] - math.log(TINY["vocab_size"])) < 0.5
    assert result["tokens_per_s"] > 0 and result["step_ms_min"] <= result["step_ms"]


def test_harness_follows_the_reference_split(reference):
    """Muon gets exactly the blocks' matrices; bf16 keeps the reference's dtypes (bf16 token embedding)."""
    import torch

    bench = _harness()
    ref = bench.load_reference(reference)
    hp = bench.hyperparameters(ref, dict(TINY, train_batch_tokens=256))
    h = bench.build(ref, hp, dtype="bf16", compile=False)
    muon = {id(p) for g in h.optimizer_muon.param_groups for p in g["params"]}
    matrices = [p for name, p in h.base_model.blocks.named_parameters()
                if p.ndim == 2 and "resid_mix" not in name]
    assert muon == {id(p) for p in matrices}
    assert len(h.optimizers) == 3  # tied embeddings: token, Muon, scalar
    assert h.base_model.tok_emb.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in matrices)
    assert h.base_model.skip_weights.dtype == torch.float32
    with pytest.raises(ValueError, match="no 'nope'"):
        bench.hyperparameters(ref, {"nope": 1})
    with pytest.raises(ValueError, match="multiple of train_seq_len"):
        bench.build(ref, bench.hyperparameters(ref, dict(TINY, train_batch_tokens=100)), compile=False)
