"""The reference int8 artifact path end to end, and the command line as a user runs it.

golden: the int8 export of final_state (and trained/) through our container,
reloaded and evaluated, reproduces the reference's round-trip val_loss/val_bpb.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from golfjax.export.artifact import read_artifact
from golfjax.export.pipeline import export_params, load_artifact_params
from tests.conftest import REPO, TOKENIZER_1024, require
from tests.test_golden_parity import evaluate, golden_config, golden_json, load_params, val_setup  # noqa: F401

GOLDEN_ENV = {"VOCAB_SIZE": "1024", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
              "MLP_MULT": "2", "TRAIN_SEQ_LEN": "64"}


@pytest.mark.parametrize("sub", ["", "trained"])
def test_int8_artifact_round_trip(golden_dir, val_setup, tmp_path, sub):
    gj = golden_json(golden_dir, sub)
    params = load_params(golden_dir / sub / "final_state.npz")
    report = export_params(params, golden_config(), tmp_path / "model.golf")
    assert report.total_bytes == report.model_bytes + report.code_bytes < 16_000_000
    # The stored int8 tensors are the reference's, bit for bit.
    _, state_q, _ = read_artifact(report.path)
    ref = np.load(golden_dir / sub / "quant_int8.npz", allow_pickle=False)
    for key in ref.files:
        role, name = key.split("/", 1)
        array = state_q.tensors[name].arrays[{"quantized": "q", "scales": "scale", "passthrough": "data"}[role]]
        np.testing.assert_array_equal(array, ref[key], err_msg=key)
        assert array.dtype == ref[key].dtype, key
    cfg, q_params = load_artifact_params(report.path)
    assert cfg == golden_config()
    result = evaluate(q_params, val_setup)
    assert abs(result.val_loss - gj["quant"]["roundtrip_val_loss"]) <= 2e-6
    assert abs(result.val_bpb - gj["quant"]["roundtrip_val_bpb"]) <= 2e-6


def run_cli(args, env_extra, cwd=REPO):
    env = {**os.environ, **env_extra}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_command_line_reproduces_golden_numbers(golden_dir, golden_shards, tmp_path):
    """prepare_data.py text -> evaluate.py --reference-state with the reference's env vars.

    The shards are the session's `golden_shards`: that same `prepare_data.py text` command
    (test_prepare checks their sha256). The CLI scores the trained golden state; the untrained
    final state's numbers are checked in-process by test_golden_parity.test_validation_loss_and_bpb."""
    data = golden_shards
    gj = golden_json(golden_dir, "trained")
    proc = run_cli(["scripts/evaluate.py", "--reference-state", str(golden_dir / "trained" / "final_state.npz"),
                    "--data-dir", str(data), "--tokenizer", str(require(TOKENIZER_1024)), "--check-bytes"], GOLDEN_ENV)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(out["val_loss"] - gj["val_loss"]) <= 1e-6
    assert abs(out["val_bpb"] - gj["val_bpb"]) <= 1e-6
    assert out["bytes_match"], out

    artifact = tmp_path / "trained.golf"
    run_cli(["scripts/export.py", "--reference-state", str(golden_dir / "trained" / "final_state.npz"),
             "--out", str(artifact)], GOLDEN_ENV)
    proc = run_cli(["scripts/evaluate.py", "--artifact", str(artifact), "--data-dir", str(data),
                    "--tokenizer", str(TOKENIZER_1024)], {})
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    gj = golden_json(golden_dir, "trained")
    assert abs(out["val_loss"] - gj["quant"]["roundtrip_val_loss"]) <= 2e-6
    assert abs(out["val_bpb"] - gj["quant"]["roundtrip_val_bpb"]) <= 2e-6
