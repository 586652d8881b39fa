"""Bad inputs end the real command line with one `error:` line, a non-zero exit and no traceback.

Each case runs `python scripts/...` in a subprocess (cwd = the repo, no
GOLFJAX_DEBUG) with a tiny model configured through the reference's
environment variables, and must fail before anything is compiled: data,
tokenizer and config mistakes are found while the run is being set up.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from golfjax.config import SECTIONS, Config, env_name
from golfjax.data.shards import write_shard
from tests.conftest import REPO, TOKENIZER_1024, require

TINY = {
    "NUM_LAYERS": "1",
    "MODEL_DIM": "32",
    "NUM_HEADS": "2",
    "NUM_KV_HEADS": "1",
    "TRAIN_SEQ_LEN": "32",
    "TRAIN_BATCH_TOKENS": "256",
    "ITERATIONS": "1",
    "VAL_BATCH_SIZE": "256",
}
CONFIG_ENV_NAMES = {env_name(f.name) for s in SECTIONS for f in fields(getattr(Config(), s))}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """Shard directories (good, empty, corrupt, truncated, tiny val), bad states and artifacts."""
    root = tmp_path_factory.mktemp("cli_errors")
    rng = np.random.default_rng(0)

    def shards(name: str, train: int = 2000, val: int = 2000) -> Path:
        d = root / name
        d.mkdir()
        write_shard(d / "fineweb_train_000000.bin", rng.integers(0, 1024, train))
        write_shard(d / "fineweb_val_000000.bin", rng.integers(0, 1024, val))
        return d

    paths = {"root": root, "good": shards("good"), "tinyval": shards("tinyval", val=10)}
    (root / "empty").mkdir()
    paths["empty"] = root / "empty"

    bad = shards("badmagic")
    blob = bytearray((bad / "fineweb_train_000000.bin").read_bytes())
    blob[:4] = (12345).to_bytes(4, "little")
    (bad / "fineweb_train_000000.bin").write_bytes(bytes(blob))
    paths["badmagic"] = bad

    trunc = shards("truncated")
    blob = (trunc / "fineweb_val_000000.bin").read_bytes()
    (trunc / "fineweb_val_000000.bin").write_bytes(blob[:-100])
    paths["truncated"] = trunc

    paths["garbled_state"] = root / "garbled.npz"
    paths["garbled_state"].write_bytes(b"this is not a zip archive\n")
    paths["wrong_state"] = root / "wrong.npz"
    np.savez(paths["wrong_state"], **{"not_a_param.weight": np.zeros((2, 2), np.float32)})

    paths["tampered"] = _tampered_artifact(root / "tampered.golf")
    paths["a_directory"] = root / "a_directory.golf"
    paths["a_directory"].mkdir()
    return paths


def _tampered_artifact(path: Path) -> Path:
    """A genuine artifact (int8-quantized tensors, tiny config) with one payload byte flipped."""
    from golfjax.config import apply_env, to_dict
    from golfjax.export.artifact import write_artifact
    from golfjax.export.quant import quantize_state_int8

    cfg, _ = apply_env(Config(), TINY)
    rng = np.random.default_rng(1)
    state = {"tok_emb.weight": rng.normal(size=(1024, 32)).astype(np.float32),
             "blocks.0.attn.c_q.weight": rng.normal(size=(32, 32)).astype(np.float32)}
    write_artifact(path, quantize_state_int8(state)[0], to_dict(cfg))
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF
    path.write_bytes(bytes(blob))
    return path


# (id, script and args, extra environment, what the message must name). "{name}" is a path of `work`.
CASES = [
    ("missing_data_dir", ["train.py", "--config", "configs/baseline.py"],
     {"DATA_PATH": "{root}/no_such_dir"}, "{root}/no_such_dir"),
    ("no_shards_match", ["train.py", "--config", "configs/baseline.py"],
     {"DATA_PATH": "{empty}"}, "fineweb_train_*.bin"),
    ("corrupt_shard_magic", ["train.py", "--config", "configs/baseline.py"],
     {"DATA_PATH": "{badmagic}"}, "{badmagic}/fineweb_train_000000.bin"),
    ("truncated_shard", ["train.py", "--config", "configs/baseline.py"],
     {"DATA_PATH": "{truncated}"}, "{truncated}/fineweb_val_000000.bin"),
    ("vocab_mismatch", ["train.py", "--config", "configs/baseline.py"],
     {"DATA_PATH": "{good}", "VOCAB_SIZE": "512"}, "VOCAB_SIZE=512"),
    ("missing_tokenizer", ["train.py", "--config", "configs/baseline.py"],
     {"DATA_PATH": "{good}", "TOKENIZER_PATH": "{root}/no_such.model"}, "{root}/no_such.model"),
    ("val_shorter_than_seq", ["train.py", "--config", "configs/baseline.py"],
     {"DATA_PATH": "{tinyval}"}, "{tinyval}/fineweb_val_000000.bin"),
    ("unknown_set_key", ["train.py", "--config", "configs/baseline.py", "--set", "model.no_such_key=3"],
     {}, "model.no_such_key"),
    ("malformed_set", ["train.py", "--config", "configs/baseline.py", "--set", "num_layers"],
     {}, "num_layers"),
    ("bad_set_value", ["train.py", "--config", "configs/baseline.py", "--set", "model.num_layers=two"],
     {}, "model.num_layers"),
    ("bad_env_value", ["train.py", "--config", "configs/baseline.py"],
     {"NUM_LAYERS": "abc"}, "NUM_LAYERS"),
    ("missing_config_file", ["train.py", "--config", "configs/no_such_config.py"],
     {}, "configs/no_such_config.py"),
    ("missing_reference_state", ["evaluate.py", "--reference-state", "{root}/no_such.npz"],
     {}, "{root}/no_such.npz"),
    ("garbled_reference_state", ["evaluate.py", "--reference-state", "{garbled_state}"],
     {}, "{garbled_state}"),
    ("mismatched_reference_state", ["evaluate.py", "--reference-state", "{wrong_state}"],
     {}, "{wrong_state}"),
    ("tampered_artifact", ["evaluate.py", "--artifact", "{tampered}"],
     {}, "{tampered}"),
    ("artifact_is_a_directory", ["evaluate.py", "--artifact", "{a_directory}"],
     {}, "{a_directory}"),
]


@pytest.mark.parametrize("args, extra_env, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_error(work, args, extra_env, names):
    tokenizer = require(TOKENIZER_1024)
    fill = {k: str(v) for k, v in work.items()}
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_ENV_NAMES and k not in ("GOLFJAX_DEBUG", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", OUT_DIR=str(work["root"] / "runs"), TOKENIZER_PATH=str(tokenizer),
               DATA_PATH=str(work["good"]), **TINY)
    env.update({k: v.format(**fill) for k, v in extra_env.items()})
    script, *rest = args
    cmd = [sys.executable, f"scripts/{script}", *(a.format(**fill) for a in rest)]

    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert names.format(**fill) in errors[0], output
    assert "compile_time" not in proc.stdout, f"failed only after compiling:\n{output}"
