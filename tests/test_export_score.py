"""A grader's view: train -> artifact -> scripts/score.py gives the training run's own final BPB, exactly.

One tiny run (2 layers, 6 steps, on the golden FineWeb shards) exports with a
non-reference recipe and the per-group codec, so the exactness covers int6
quantization, row reordering and transposed streams; the inspector and the
exporter's other recipes are run on the same run's outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, TOKENIZER_1024, require

TINY = ["model.vocab_size=1024", "model.num_layers=2", "model.model_dim=64", "model.num_heads=4",
        "model.num_kv_heads=2", "train.train_seq_len=64", "train.train_batch_tokens=2048", "train.iterations=6",
        "train.warmdown_iters=2", "train.val_loss_every=0", "train.train_log_every=0", "train.max_wallclock_seconds=0", "eval.val_batch_size=8192",
        "optim.muon_momentum_warmup_steps=2",
        "export.scheme=int6-brotli", "export.codec=pergroup", "export.pergroup_codecs=zlib,shuffle2+zlib,lzma",
        "export.quant_passthrough_max_numel=1000", "eval.eval_mode=sliding", "eval.eval_stride=32"]


def run(args: list[str], cwd=REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Background:
    """A command started now (output into out_dir, which it creates first) and waited for when its
    test asks (`result`): the commands on the trained run are independent, so they run side by side
    instead of one after the other."""

    def __init__(self, args: list[str], out_dir, env: dict, cwd=REPO):
        self.args, self.out_dir = args, out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "stdout", "wb") as so, open(out_dir / "stderr", "wb") as se:
            self.proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=so, stderr=se)

    def result(self, timeout=900) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        read = lambda name: (self.out_dir / name).read_text(errors="replace")
        return subprocess.CompletedProcess(self.args, self.proc.returncode, read("stdout"), read("stderr"))


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained_run(golden_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("score") / "run"
    sets = [arg for item in TINY for arg in ("--set", item)]
    proc = run([str(REPO / "scripts" / "train.py"), "--config", str(REPO / "configs" / "smoke.py"), *sets, "--set", f"data.data_path={golden_shards}",
                "--set", f"data.tokenizer_path={require(TOKENIZER_1024)}", "--run-dir", str(run_dir)])
    return run_dir, proc.stdout


@pytest.fixture(scope="module")
def commands(trained_run, tmp_path_factory):
    """Every command the tests below run on the trained run, started together (each test waits for its own)."""
    run_dir, _ = trained_run
    out = tmp_path_factory.mktemp("commands")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(REPO)
    quiet = {k: v for k, v in env.items() if k != "GOLFJAX_DEBUG"}
    artifact, ckpt = str(run_dir / "final_model.golf"), str(run_dir / "checkpoint")
    specs = {
        "score_plain": ([str(REPO / "scripts" / "score.py"), artifact, "--set", "eval.eval_mode=plain"], env),
        "score": ([str(REPO / "scripts" / "score.py"), artifact], env),
        "inspect": ([str(REPO / "scripts" / "inspect_artifact.py"), artifact, "--sort", "bytes", "--plot",
                     str(out / "bytes.png")], env),
        **{f"export_{scheme}": ([str(REPO / "scripts" / "export.py"), "--checkpoint", ckpt, "--out",
                                 str(out / f"export_{scheme}" / "m.golf"), "--scheme", scheme], env)
           for scheme in ("int8-zlib", "int6-zstd")},
        "over_budget": ([str(REPO / "scripts" / "export.py"), "--checkpoint", ckpt, "--out",
                         str(out / "over_budget" / "m.golf"), "--scheme", "int8-zlib", "--set", "export.codec=zlib",
                         "--set", "export.artifact_limit_bytes=50000"], quiet),
    }
    started = {name: Background(args, out / name, e) for name, (args, e) in specs.items()}
    yield out, started
    for b in started.values():
        if b.proc.poll() is None:
            b.proc.kill()


def test_score_reproduces_the_training_runs_bpb_exactly(trained_run, commands):
    run_dir, log = trained_run
    printed = [line for line in log.splitlines() if line.startswith("final_int8_zlib_roundtrip_exact")]
    assert len(printed) == 1
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["event"] == "final"

    out = last_json(ok(commands[1]["score_plain"].result()))  # score.py ARTIFACT --set eval.eval_mode=plain
    assert out["val_bpb"] == final["roundtrip_val_bpb"] and out["val_loss"] == final["roundtrip_val_loss"]
    assert printed[0] == f"final_int8_zlib_roundtrip_exact val_loss:{out['val_loss']:.8f} val_bpb:{out['val_bpb']:.8f}"
    assert out["scheme"] == "int6-brotli" and out["codec"] == "pergroup" and out["mode"] == "plain"
    assert out["model_bytes"] == (run_dir / "final_model.golf").stat().st_size
    assert out["total_bytes"] == out["model_bytes"] + out["code_bytes"] == final["artifact_bytes"] and out["fits"]


def test_score_reproduces_the_runs_final_sliding_evaluation_exactly(trained_run, commands):
    """The run's configured final evaluation (sliding here) scores the whole validation stream,
    as the grader's score.py does with the artifact's own settings: same targets, same BPB."""
    run_dir, log = trained_run
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final_eval = [e for e in events if e["event"] == "final_eval_mode"]
    assert len(final_eval) == 1 and final_eval[0]["mode"] == "sliding"
    out = last_json(ok(commands[1]["score"].result()))  # score.py ARTIFACT
    assert out["mode"] == "sliding"
    assert out["tokens_scored"] == final_eval[0]["tokens_scored"] and out["bytes"] == final_eval[0]["bytes"]
    assert out["val_bpb"] == final_eval[0]["val_bpb"] and out["val_loss"] == final_eval[0]["val_loss"]


def test_inspector_accounts_for_every_payload_byte(commands):
    out_dir, started = commands
    png = out_dir / "bytes.png"
    proc = ok(started["inspect"].result())  # inspect_artifact.py ARTIFACT --sort bytes --plot PNG
    out = last_json(proc)
    rows = {r["name"]: r for r in out["tensors"]}
    payload = sum(s["compressed_bytes"] for s in out["streams"])
    assert abs(sum(r["bytes"] for r in rows.values()) - payload) <= len(rows)  # rounding only
    assert out["model_bytes"] == payload + out["header_bytes"]
    assert rows["blocks.0.mlp.fc.weight"]["bits"] == 6 and rows["tok_emb.weight"]["bits"] == 8
    assert rows["blocks.0.attn_scale"]["bits"] == 32  # control tensors stay float32
    assert rows["tok_emb.weight"]["stream"] == "tok_emb"
    assert [r["bytes"] for r in out["tensors"]] == sorted((r["bytes"] for r in out["tensors"]), reverse=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tok_emb.weight" in proc.stdout and "stream:tok_emb" in proc.stdout


@pytest.mark.parametrize("scheme", ["int8-zlib", "int6-zstd"])
def test_export_recipes_from_the_runs_checkpoint(commands, scheme):
    out_dir, started = commands
    out = last_json(ok(started[f"export_{scheme}"].result()))  # export.py --checkpoint C --out M --scheme S
    assert out["scheme"] == scheme and out["model_bytes"] == (out_dir / f"export_{scheme}" / "m.golf").stat().st_size
    assert out["total_bytes"] == out["model_bytes"] + out["code_bytes"]
    assert out["codec"] == "pergroup"  # the run's export.codec travels with its config


@pytest.mark.parametrize("script", ["score.py", "inspect_artifact.py"])
def test_tampered_artifact_is_one_error_line(tmp_path, script):
    import numpy as np

    from golfjax.export.artifact import write_artifact
    from golfjax.export.quant import quantize_state_int8

    path = tmp_path / "m.golf"
    write_artifact(path, quantize_state_int8({"w": np.ones((4, 4), np.float32)})[0], {})
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x10
    path.write_bytes(bytes(blob))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GOLFJAX_DEBUG")}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {path}: payload checksum mismatch (sha256): "
                                                "the file is corrupted or was modified"]


def test_over_budget_export_fails_with_the_breakdown(commands):
    # export.py --checkpoint C --out M --scheme int8-zlib --set export.codec=zlib --set export.artifact_limit_bytes=50000
    proc = commands[1]["over_budget"].result()
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: artifact over budget by ") and "> limit 50000" in lines[0]
    assert lines[1] == "largest tensors:" and lines[2].split()[0] == "tok_emb.weight"
    assert len(lines) == 7  # the five largest


@pytest.mark.parametrize("item, message", [
    ("export.scheme=int7-magic", "unknown export scheme 'int7-magic'; known: int8-zlib, int6-zstd"),
    ("export.codec=shuffle2+gzip", "unknown codec 'shuffle2+gzip'"),
    ("export.pergroup_codecs=zlib,rar", "unknown codec 'rar'"),
])
def test_export_typos_fail_when_the_config_is_resolved(item, message):
    from golfjax.config import ConfigError, resolve

    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        resolve(None, [item], environ={})
    resolve(None, ["export.scheme=gptq-lqer-pergroup", "export.pergroup_codecs=zlib,shuffle2+lzma"], environ={})
