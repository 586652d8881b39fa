"""The CPU golf track: the build reproduces the track's sha256s, the chunking rule, tampered inputs are refused."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from golfjax.config import EVAL_MODES
from golfjax.data import prepare
from golfjax.data.prepare import PrepareError, chunk_paragraphs, split_paragraphs

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GOLFJAX_SHARED") or REPO.parent / "shared")
CLI = REPO / "scripts" / "prepare_data.py"


def shared_data() -> Path:
    data = SHARED / "data"
    if not (data / prepare.CPU_TRACK_FINEWEB).is_file():
        pytest.skip(f"needs the shared data in {data}")
    return data


def run_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True, env=env)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- the rules on small strings


def test_split_paragraphs_at_blank_lines_drops_whitespace_only():
    text = "a\nb\n\nc\n \t\n\nd\n\n\n   \n\n e \n"
    assert split_paragraphs(text) == ["a\nb", "c", "d", " e \n"]
    assert split_paragraphs("\n\n  \n\n") == []
    assert split_paragraphs("one") == ["one"]


def test_chunks_join_until_the_byte_limit():
    # "aaa" + "\n\n" + "bbb" = 8 bytes: fits 8, not 7
    assert chunk_paragraphs(["aaa", "bbb"], max_bytes=8) == ["aaa\n\nbbb"]
    assert chunk_paragraphs(["aaa", "bbb"], max_bytes=7) == ["aaa", "bbb"]
    assert chunk_paragraphs(["a", "b", "c", "d"], max_bytes=4) == ["a\n\nb", "c\n\nd"]
    assert chunk_paragraphs([], max_bytes=10) == []


def test_chunks_count_utf8_bytes_not_characters():
    # "é" is 2 bytes: "éé" + "\n\n" + "éé" = 10 bytes although 6 characters
    assert chunk_paragraphs(["éé", "éé"], max_bytes=9) == ["éé", "éé"]
    assert chunk_paragraphs(["éé", "éé"], max_bytes=10) == ["éé\n\néé"]


def test_a_long_paragraph_is_a_chunk_of_its_own_and_never_cut():
    long = "x" * 20
    assert chunk_paragraphs(["a", long, "b", "c"], max_bytes=8) == ["a", long, "b\n\nc"]
    assert chunk_paragraphs([long], max_bytes=8) == [long]


def test_greedy_means_a_later_small_paragraph_does_not_go_back():
    # "bbbbbb" does not fit after "aa"; "c" then joins "bbbbbb", never the earlier chunk
    assert chunk_paragraphs(["aa", "bbbbbb", "c"], max_bytes=8) == ["aa", "bbbbbb", "c"]
    assert chunk_paragraphs(["aa", "bbbb", "c"], max_bytes=8) == ["aa\n\nbbbb", "c"]


# ---------------------------------------------------------------- the real track


@pytest.fixture(scope="module")
def track(tmp_path_factory) -> Path:
    data = shared_data()
    out = tmp_path_factory.mktemp("cpu_track")
    result = run_cli("cpu-track", "--shared", data, "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def test_documents_follow_the_spec():
    val, train = prepare.cpu_track_documents(shared_data())
    assert len(val) == 50
    assert len(train) == 150 + 495 + len(
        chunk_paragraphs(split_paragraphs((shared_data() / "text/kjv_bible.txt").read_text(encoding="utf-8")))
    ) + len(chunk_paragraphs(split_paragraphs((shared_data() / "text/tinyshakespeare.txt").read_text(encoding="utf-8"))))
    assert len(train) == 1986
    fineweb = [json.loads(line)["text"] for line in open(shared_data() / prepare.CPU_TRACK_FINEWEB, encoding="utf-8")]
    assert val == fineweb[150:]
    assert set(fineweb[:150]) <= set(train) and not set(val) & set(train)


def test_build_reproduces_the_track_hashes(track):
    for name, spec in prepare.CPU_TRACK_SHARDS.items():
        assert sha256(track / name) == spec["sha256"], name
    assert sorted(p.name for p in track.glob("fineweb_*.bin")) == sorted(prepare.CPU_TRACK_SHARDS)
    manifest = json.loads((track / prepare.CPU_TRACK_MANIFEST).read_text())
    assert manifest["tokens_val"] == 113_483 and manifest["tokens_train"] == 7_923_495
    assert manifest["docs_val"] == 50 and manifest["docs_train"] == 1986
    assert sha256(track / prepare.CPU_TRACK_TOKENIZER_NAME) == prepare.CPU_TRACK_INPUTS[prepare.CPU_TRACK_TOKENIZER]
    assert prepare.verify_cpu_track(track) == {n: s["sha256"] for n, s in prepare.CPU_TRACK_SHARDS.items()}


def test_verify_names_a_modified_shard(track, tmp_path):
    for name in prepare.CPU_TRACK_SHARDS:
        shutil.copy(track / name, tmp_path / name)
    shard = tmp_path / "fineweb_val_000000.bin"
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 1
    shard.write_bytes(bytes(blob))
    with pytest.raises(PrepareError, match="fineweb_val_000000.bin has sha256"):
        prepare.verify_cpu_track(tmp_path)
    shard.unlink()
    with pytest.raises(PrepareError, match="missing shard fineweb_val_000000.bin"):
        prepare.verify_cpu_track(tmp_path)


def test_a_tampered_input_is_refused_and_nothing_is_left(tmp_path):
    data = shared_data()
    copy = tmp_path / "shared"
    for relative in prepare.CPU_TRACK_INPUTS:
        (copy / relative).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(data / relative, copy / relative)
    shakespeare = copy / "text/tinyshakespeare.txt"
    text = shakespeare.read_text(encoding="utf-8")
    shakespeare.unlink()
    shakespeare.write_text(text.replace("Romeo", "Juliet", 1), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / prepare.CPU_TRACK_MANIFEST).write_text("{}")  # a previous build's marker must not survive
    result = run_cli("cpu-track", "--shared", copy, "--out", out, "--quiet")
    assert result.returncode == 1
    assert result.stderr.startswith("error: refusing to build the CPU track")
    assert "fineweb_train_000000.bin has sha256" in result.stderr
    assert "text/tinyshakespeare.txt" in result.stderr and "kjv" not in result.stderr
    assert "Traceback" not in result.stderr
    assert list(out.iterdir()) == []


def test_missing_shared_data_is_one_clear_error(tmp_path):
    result = run_cli("cpu-track", "--shared", tmp_path, "--out", tmp_path / "out")
    assert result.returncode == 1
    assert "does not hold the shared data" in result.stderr


# ---------------------------------------------------------------- code bytes counted the records' way


def _without_docstrings(tree):
    import ast

    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def test_minified_code_is_the_same_program_without_comments_and_docstrings():
    import ast

    from golfjax.export import artifact

    src = '"""Module doc."""\n# a comment\nimport os  # trailing\n\n\ndef f(x):\n    """Doc."""\n    return x + 1\n\n\nclass C:\n    """Only a doc."""\n'
    out = artifact.minify_source(src)
    assert "Doc" not in out and "comment" not in out and "trailing" not in out
    namespace = {}
    exec(compile(out, "<min>", "exec"), namespace)
    assert namespace["f"](1) == 2 and isinstance(namespace["C"](), namespace["C"])
    for path in artifact.code_files():  # every counted file: same AST once docstrings go
        source = path.read_text(encoding="utf-8")
        minified = artifact.minify_source(source, str(path))
        assert ast.dump(ast.parse(minified)) == ast.dump(_without_docstrings(ast.parse(source))), path


def test_compressed_code_bytes_are_opt_in_smaller_and_labelled(tmp_path):
    from golfjax.export import artifact

    files = artifact.code_files()
    raw = artifact.code_bytes(files)
    assert raw == artifact.code_bytes(files, "raw") == sum(len(f.read_bytes()) for f in files)
    compressed = artifact.code_bytes(files, "compressed")
    assert compressed == artifact.code_bytes(files, "compressed")  # deterministic
    assert 0 < compressed < raw / 3
    with pytest.raises(artifact.ArtifactError, match="unknown code_bytes_mode"):
        artifact.code_bytes(files, "gzip")
    report = artifact.size_report(1000, files, 10**6, "compressed")
    assert report["code_bytes"] == compressed and report["code_bytes_raw"] == raw
    assert report["total_bytes"] == 1000 + compressed
    text = artifact.format_size_report(report, "int8+zlib")
    assert f"Code size: {compressed} bytes" in text and "code_bytes_mode=compressed" in text and f"raw {raw}" in text
    assert "code_bytes_mode" not in artifact.format_size_report(artifact.size_report(1000, files, 10**6))


def test_the_export_uses_the_configured_code_mode(tmp_path):
    from dataclasses import replace

    import jax

    from golfjax.config import Config, ConfigError, validate
    from golfjax.export.pipeline import export_params
    from golfjax.model import gpt

    c = Config()
    cfg = replace(c, model=replace(c.model, vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1),
                  export=replace(c.export, artifact_limit_bytes=10**6, code_bytes_mode="compressed"))
    params = gpt.init_params(cfg.model, jax.random.PRNGKey(0))
    report = export_params(params, cfg, tmp_path / "m.golf")
    assert report.size["code_bytes_mode"] == "compressed" and report.code_bytes < report.size["code_bytes_raw"]
    assert any("code_bytes_mode=compressed" in line for line in report.lines())
    with pytest.raises(ConfigError, match="code_bytes_mode"):
        validate(replace(cfg, export=replace(cfg.export, code_bytes_mode="zip")))


def test_track_configs():
    from golfjax.config import resolve

    base, _ = resolve(REPO / "configs/cpu_track/baseline.py", environ={})
    m, t = base.model, base.train
    assert (m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.mlp_mult, m.vocab_size) == (2, 192, 4, 1, 2.0, 1024)
    assert (t.train_seq_len, t.train_batch_tokens, t.max_wallclock_seconds) == (512, 8192, 600.0)
    assert base.export.artifact_limit_bytes == 1_000_000 and base.export.code_bytes_mode == "compressed"
    assert base.data.data_path == "data/cpu_track"
    assert base.data.tokenizer_path == f"data/cpu_track/{prepare.CPU_TRACK_TOKENIZER_NAME}"
    best, _ = resolve(REPO / "configs/cpu_track/best.py", environ={})
    # best.py plays by the same rules: the track's data, budget, shape and training time.
    assert best.data == base.data and best.train == base.train
    assert (best.export.artifact_limit_bytes, best.export.code_bytes_mode) == (1_000_000, "compressed")
    shape = ("num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "vocab_size")
    assert [getattr(best.model, f) for f in shape] == [getattr(m, f) for f in shape]
    assert best.eval.eval_mode in EVAL_MODES
