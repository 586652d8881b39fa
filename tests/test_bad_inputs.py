"""Bad inputs and faults end the real command line with one `error:` line, exit status 2 and no traceback.

Each case runs `python scripts/...` in a subprocess (cwd = the repo, no
GOLFJAX_DEBUG) with a tiny model configured through the reference's
environment variables, and asserts the exit status and the first line of
stderr (the message, which names the file, key or flag and the fix). Every
case fails before anything is compiled: data, tokenizer, config, checkpoint
and run-directory mistakes are found while the run is being set up. Faults
that need a broken disk or a NaN mid-run are in test_checkpoint.py and
test_resume.py.
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
from tests.conftest import REPO, TOKENIZER_1024, require, write_config_setting

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
    root = tmp_path_factory.mktemp("bad_inputs")
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
    paths["a_file"] = root / "a_file"
    paths["a_file"].write_text("not a directory\n")
    paths["typo_config"] = write_config_setting(root / "typo_config.py", "model", "ve_layers", [7, 8])
    paths["resumable"], paths["halfsaved"] = _checkpointed_runs(root, paths)
    return paths


def _checkpointed_runs(root: Path, paths: dict[str, Path]) -> tuple[Path, Path]:
    """A run directory with a complete checkpoint (step 2) of the tiny config the cases resolve,
    and one whose only checkpoint (step 4) was cut short (orbax's tmp directory, never renamed)."""
    import shutil

    from golfjax.checkpoint import TrainCheckpoints
    from golfjax.config import apply_env
    from tests.test_checkpoint import meta, random_state

    cfg, _ = apply_env(Config(), {**TINY, "OUT_DIR": str(root / "runs"), "TOKENIZER_PATH": str(TOKENIZER_1024),
                                  "DATA_PATH": str(paths["good"])})
    resumable, halfsaved = root / "resumable", root / "halfsaved"
    saver = TrainCheckpoints(resumable / "checkpoints")
    saver.save(random_state(cfg), meta(2), cfg)
    saver.close()
    (halfsaved / "checkpoints").mkdir(parents=True)
    shutil.copytree(resumable / "checkpoints" / "2", halfsaved / "checkpoints" / "4.orbax-checkpoint-tmp")
    (halfsaved / "checkpoints" / "4.orbax-checkpoint-tmp" / "commit_success.txt").unlink()
    return resumable, halfsaved


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


# (id, script and args, extra environment, exit status, first line of stderr). "{name}" is a path of `work`;
# a first line ending in "..." is compared as a prefix.
BASE = ["train.py", "--config", "configs/baseline.py"]
CASES = [
    # data and tokenizer
    ("missing_data_dir", BASE, {"DATA_PATH": "{root}/no_such_dir"}, 2,
     "error: no shards found in {root}/no_such_dir matching 'fineweb_train_*.bin' (directory does not exist)"),
    ("no_shards_match", BASE, {"DATA_PATH": "{empty}"}, 2,
     "error: no shards found in {empty} matching 'fineweb_train_*.bin' (no file matches)"),
    ("corrupt_shard_magic", BASE, {"DATA_PATH": "{badmagic}"}, 2,
     "error: bad shard header in {badmagic}/fineweb_train_000000.bin: magic 12345, expected 20240520"),
    ("truncated_shard", BASE, {"DATA_PATH": "{truncated}"}, 2,
     "error: truncated shard {truncated}/fineweb_val_000000.bin: header says 2000 tokens, so 5024 bytes expected, "
     "but the file has 4924 bytes"),
    ("vocab_mismatch", BASE, {"DATA_PATH": "{good}", "VOCAB_SIZE": "512"}, 2,
     "error: VOCAB_SIZE=512 does not match tokenizer vocab_size=1024 ({tokenizer})"),
    ("missing_tokenizer", BASE, {"DATA_PATH": "{good}", "TOKENIZER_PATH": "{root}/no_such.model"}, 2,
     "error: tokenizer file not found: {root}/no_such.model"),
    ("val_shorter_than_seq", BASE, {"DATA_PATH": "{tinyval}"}, 2,
     "error: validation split (10 tokens in 1 shard(s), first {tinyval}/fineweb_val_000000.bin) is shorter than "
     "one sequence of TRAIN_SEQ_LEN=32 plus one target token"),
    # config
    ("unknown_set_key", [*BASE, "--set", "model.no_such_key=3"], {}, 2,
     "error: --set 'model.no_such_key=3': unknown config key 'model.no_such_key'; fields of model: vocab_size, ..."),
    ("malformed_set", [*BASE, "--set", "num_layers"], {}, 2, "error: --set 'num_layers': expected section.field=value"),
    ("bad_set_value", [*BASE, "--set", "model.num_layers=two"], {}, 2,
     "error: --set model.num_layers: cannot read 'two' as int"),
    ("bad_env_value", BASE, {"NUM_LAYERS": "abc"}, 2, "error: environment NUM_LAYERS: cannot read 'abc' as int"),
    ("missing_config_file", ["train.py", "--config", "configs/no_such_config.py"], {}, 2,
     "error: config file not found: configs/no_such_config.py"),
    ("config_field_of_the_wrong_type", ["train.py", "--config", "{typo_config}"], {}, 2,
     "error: model.ve_layers must be str, got list [7, 8]"),
    ("no_config_given", ["train.py"], {}, 2,
     "error: --config FILE is required to start a run (configs/smoke.py, configs/baseline.py, ...); "
     "to continue one, pass --run-dir DIR --resume"),
    ("negative_checkpoint_every", [*BASE, "--checkpoint-every", "-1"], {}, 2,
     "error: train.checkpoint_every (--checkpoint-every, CHECKPOINT_EVERY) must be >= 0 "
     "(0: checkpoints only on SIGTERM/SIGINT), got -1"),
    # run directory, resume
    ("run_dir_is_a_file", [*BASE, "--run-dir", "{a_file}"], {}, 2,
     "error: run directory {a_file} is a file; give --run-dir a directory"),
    ("run_dir_not_writable", [*BASE, "--run-dir", "{a_file}/run"], {}, 2,
     "error: cannot create the run directory {a_file}/run: [Errno 20] Not a directory: '{a_file}/run'; "
     "choose a writable --run-dir"),
    ("resume_without_run_dir", ["train.py", "--resume"], {}, 2,
     "error: --resume needs the directory of the run to continue: pass --run-dir DIR"),
    ("resume_without_checkpoint", [*BASE, "--run-dir", "{empty}", "--resume"], {}, 2,
     "error: cannot resume {empty}: it holds no complete checkpoint (in {empty}/checkpoints); start the run "
     "without --resume, with --checkpoint-every N to save some"),
    ("resume_only_a_half_written_checkpoint", ["train.py", "--run-dir", "{halfsaved}", "--resume"], {}, 2,
     "error: cannot resume {halfsaved}: it holds no complete checkpoint (in {halfsaved}/checkpoints); ..."),
    ("resume_with_another_model", ["train.py", "--run-dir", "{resumable}", "--resume", "--set", "model.num_layers=2"],
     {}, 2, "error: cannot resume: the requested config differs from the checkpoint's in model.num_layers "
            "(checkpoint 1, requested 2); a resumed run keeps the checkpoint's model, optimizer, batches and seed: "
            "drop the change, or start a new run in another --run-dir"),
    ("new_run_over_a_checkpointed_run", [*BASE, "--run-dir", "{resumable}"], {}, 2,
     "error: {resumable} already holds the checkpoints of a run (latest step 2); continue it with --resume, "
     "or choose another --run-dir"),
    # model sources, artifacts
    ("missing_reference_state", ["evaluate.py", "--reference-state", "{root}/no_such.npz"], {}, 2,
     "error: reference state not found: {root}/no_such.npz"),
    ("garbled_reference_state", ["evaluate.py", "--reference-state", "{garbled_state}"], {}, 2,
     "error: {garbled_state}: not a readable .npz state dict (not a zip archive)"),
    ("mismatched_reference_state", ["evaluate.py", "--reference-state", "{wrong_state}"], {}, 2,
     "error: {wrong_state}: reference state does not match the configured model (num_layers=1, model_dim=32, "
     "tie_embeddings=True): missing [..."),
    ("tampered_artifact", ["evaluate.py", "--artifact", "{tampered}"], {}, 2,
     "error: {tampered}: payload checksum mismatch (sha256): the file is corrupted or was modified"),
    ("artifact_is_a_directory", ["evaluate.py", "--artifact", "{a_directory}"], {}, 2,
     "error: artifact not found: {a_directory} (a directory)"),
    ("export_from_a_non_checkpoint", ["export.py", "--checkpoint", "{empty}", "--out", "{root}/x.golf"], {}, 2,
     "error: {empty}: not a golfjax checkpoint (expected config.json + params/, a run directory with checkpoints/, "
     "or checkpoints/<step>)"),
    ("export_from_a_half_written_checkpoint",
     ["export.py", "--checkpoint", "{halfsaved}/checkpoints/4.orbax-checkpoint-tmp", "--out", "{root}/x.golf"], {}, 2,
     "error: {halfsaved}/checkpoints/4.orbax-checkpoint-tmp: an incomplete checkpoint (its save did not finish); "
     "use a complete one in {halfsaved}/checkpoints"),
    ("export_out_is_a_directory", ["export.py", "--checkpoint", "{resumable}", "--out", "{a_directory}"], {}, 2,
     "error: --out {a_directory} is a directory; give the artifact's file name (e.g. {a_directory}/model.golf)"),
]


@pytest.mark.parametrize("args, extra_env, status, first_line", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_error(work, args, extra_env, status, first_line):
    tokenizer = require(TOKENIZER_1024)
    fill = {k: str(v) for k, v in work.items()} | {"tokenizer": str(tokenizer)}
    env = {k: v for k, v in os.environ.items()
           if k not in CONFIG_ENV_NAMES and k not in ("GOLFJAX_DEBUG", "XLA_FLAGS", "GOLFJAX_TEST_KILL")}
    env.update(JAX_PLATFORMS="cpu", OUT_DIR=str(work["root"] / "runs"), TOKENIZER_PATH=str(tokenizer),
               DATA_PATH=str(work["good"]), **TINY)
    env.update({k: v.format(**fill) for k, v in extra_env.items()})
    script, *rest = args
    cmd = [sys.executable, f"scripts/{script}", *(a.format(**fill) for a in rest)]

    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    output = proc.stdout + proc.stderr
    assert proc.returncode == status, output
    assert "Traceback" not in output, output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    expected = first_line.format(**fill)
    first = proc.stderr.splitlines()[0]
    if expected.endswith("..."):
        assert first.startswith(expected[:-3]), output
    else:
        assert first == expected, output
    assert "compile_time" not in proc.stdout, f"failed only after compiling:\n{output}"
