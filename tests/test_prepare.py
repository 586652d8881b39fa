"""Data preparation: golden shards byte for byte, exporter tokenizer settings, FineWeb file lists, CLI errors."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from golfjax.data import prepare
from golfjax.data.prepare import PrepareError
from golfjax.data.shards import ShardError, read_shard, validate_shard, write_shard
from golfjax.data.tokenizer import TokenizerError, load_tokenizer

from tests.conftest import REPO, shared

CLI = REPO / "scripts" / "prepare_data.py"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True, env=env)




@pytest.fixture(scope="module")
def sp1024():
    return load_tokenizer(shared("data/tokenizers/fineweb_1024_bpe.model"), 1024)


@pytest.fixture(scope="module")
def docs():
    path = shared("data/fineweb/fineweb_challenge_docs_200.jsonl")
    return list(prepare.read_documents([path]))


# ------------------------------------------------------------ text -> shards


def test_cli_reproduces_golden_shards(golden_shards):
    golden = json.loads(shared("golden/golden.json").read_text())["data"]["shard_sha256"]
    for name, sha in golden.items():
        assert hashlib.sha256((golden_shards / name).read_bytes()).hexdigest() == sha, name
    assert validate_shard(golden_shards / "fineweb_val_000000.bin") == 74_982
    assert validate_shard(golden_shards / "fineweb_train_000000.bin") == 553_475
    assert sorted(p.name for p in golden_shards.glob("*.bin")) == sorted(golden)


def test_small_shards_split_the_same_stream(tmp_path, docs, sp1024, golden_shards):
    write_shard(tmp_path / "fineweb_train_000099.bin", np.arange(5))  # a previous export's leftover
    summary = prepare.tokenize_documents_to_shards(docs, sp1024, tmp_path, 20, shard_size=10_000, progress=False)
    assert summary["removed_stale_shards"] == 1
    assert (summary["docs_val"], summary["docs_train"]) == (20, 180)
    assert (summary["tokens_val"], summary["tokens_train"]) == (74_982, 553_475)
    assert (summary["files_val"], summary["files_train"]) == (8, 56)
    for split in ("val", "train"):
        files = sorted(tmp_path.glob(f"fineweb_{split}_*.bin"))
        assert [p.name for p in files] == [f"fineweb_{split}_{i:06d}.bin" for i in range(len(files))]
        assert all(validate_shard(p) == 10_000 for p in files[:-1])
        joined = np.concatenate([read_shard(p) for p in files])
        np.testing.assert_array_equal(joined, read_shard(golden_shards / f"fineweb_{split}_000000.bin"))


def test_each_document_is_bos_then_its_tokens(tmp_path, sp1024):
    texts = ["Hello world.", "  leading and trailing spaces kept as-is  ", "x"]
    prepare.tokenize_documents_to_shards(texts, sp1024, tmp_path, 1, progress=False)
    val, train = read_shard(tmp_path / "fineweb_val_000000.bin"), read_shard(tmp_path / "fineweb_train_000000.bin")
    assert val.tolist() == [1, *sp1024.encode(texts[0])]
    assert train.tolist() == [1, *sp1024.encode(texts[1]), 1, *sp1024.encode(texts[2])]


def test_too_few_documents_for_validation(tmp_path, sp1024):
    with pytest.raises(PrepareError, match="only 2 documents.*num_val_docs=5"):
        prepare.tokenize_documents_to_shards(["a", "b"], sp1024, tmp_path, 5, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_read_documents(tmp_path):
    txt = tmp_path / "book.txt"
    txt.write_text("line one\nline two\n\n\nsecond paragraph\n", encoding="utf-8")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b", "id": 2}\n', encoding="utf-8")
    assert list(prepare.read_documents([jsonl, txt])) == ["a", "b", txt.read_text()]
    assert list(prepare.read_documents([txt], "lines")) == ["line one", "line two", "second paragraph"]
    assert list(prepare.read_documents([txt], "paragraphs")) == ["line one\nline two", "second paragraph\n"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "ok"}\n{"text": \n', r"docs\.jsonl:2: bad JSON line"),
        (b'["text"]\n', r"docs\.jsonl:1: expected a JSON object"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"docs\.jsonl:2: not valid UTF-8"),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path, content, message):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(content)
    with pytest.raises(PrepareError, match=message):
        list(prepare.read_documents([path]))


def test_inputs_checked_before_reading(tmp_path):
    with pytest.raises(PrepareError, match="input file not found"):
        prepare.read_documents([tmp_path / "missing.jsonl"])
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(PrepareError, match=r"expected a \.txt or \.jsonl"):
        prepare.read_documents([tmp_path / "data.csv"])


# ------------------------------------------------------------ tokenizer training


def test_cli_trains_tokenizer_with_exporter_settings(tmp_path):
    docs = shared("data/fineweb/fineweb_challenge_docs_200.jsonl")
    result = run_cli("tokenizer", docs, "--vocab-size", 512, "--out-prefix", tmp_path / "tok_512_bpe")
    assert result.returncode == 0, result.stderr
    assert "84 document(s) longer than 4192 bytes were skipped" in result.stdout
    sp = load_tokenizer(tmp_path / "tok_512_bpe.model", 512)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sum(sp.is_byte(i) for i in range(512)) == 256  # byte_fallback
    assert [sp.id_to_piece(i) for i in sp.encode("2026")] == ["2", "0", "2", "6"]  # split_digits
    assert not sp.id_to_piece(sp.encode("hello")[0]).startswith("\u2581")  # no dummy prefix
    assert sp.encode("ｈｅｌｌｏ") == sp.encode("hello")  # NFKC
    model_pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    proto = model_pb2.ModelProto()
    proto.ParseFromString((tmp_path / "tok_512_bpe.model").read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    assert spec.model_type == model_pb2.TrainerSpec.BPE
    assert (spec.character_coverage, spec.hard_vocab_limit, spec.max_sentence_length) == (
        pytest.approx(0.999),
        False,
        4192,
    )
    assert (norm.name, norm.add_dummy_prefix) == ("nmt_nfkc", False)


def test_train_tokenizer_refuses_unfit_results(tmp_path):
    no_spaces = ["".join(np.random.default_rng(i).choice(list("abcdefgh"), size=300)) for i in range(50)]
    with pytest.raises(TokenizerError, match="U\\+2581"):
        prepare.train_tokenizer(no_spaces, 300, tmp_path / "nospace")
    with pytest.raises(TokenizerError, match="only supports .* pieces, not vocab_size=1024"):
        prepare.train_tokenizer(["abc abc def"] * 10, 1024, tmp_path / "tiny")
    with pytest.raises(TokenizerError, match="none of the 3 training documents is at most max_sentence_length=4192"):
        prepare.train_tokenizer(["word " * 1000] * 3, 300, tmp_path / "long")
    assert list(tmp_path.iterdir()) == []  # refused models are not left behind


def test_training_text_is_the_exporters():
    assert list(prepare.training_text(["  a\x00b  ", "   ", "c", "d"], max_docs=3)) == ["a b", "c"]


# ------------------------------------------------------------ FineWeb download


@pytest.fixture(scope="module")
def manifest():
    return json.loads(shared("data/fineweb/meta/manifest_sp1024.json").read_text())


def test_fineweb_file_list_from_manifest(manifest):
    files = prepare.fineweb_file_list(manifest, "sp1024", 2)
    assert files == [
        "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
        "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
        "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
        "datasets/tokenizers/fineweb_1024_bpe.model",
        "datasets/tokenizers/fineweb_1024_bpe.vocab",
    ]
    assert len(prepare.fineweb_file_list(manifest, "sp1024", 195)) == 1 + 195 + 2
    with_docs = prepare.fineweb_file_list(manifest, "sp1024", 0, remote_root="", with_docs=True)
    assert with_docs[:3] == [
        "docs_selected.jsonl",
        "docs_selected.source_manifest.json",
        "datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
    ]
    local = prepare.local_path_for_remote(files[1], "datasets", "/data")
    assert local == Path("/data/datasets/fineweb10B_sp1024/fineweb_train_000000.bin")
    vocab = prepare.local_path_for_remote(files[-1], "datasets", "/data")
    assert vocab == Path("/data/tokenizers/fineweb_1024_bpe.vocab")


@pytest.mark.parametrize(
    "variant, shards, message",
    [
        ("sp1024", 196, "has 195 training shards; requested 196"),
        ("sp1024", -1, "requested -1"),
        ("sp4096", 1, "fineweb10B_sp4096 .* not in the manifest; it has: fineweb10B_sp1024"),
        ("gpt2", 1, "unknown variant 'gpt2'"),
    ],
)
def test_fineweb_file_list_errors(manifest, variant, shards, message):
    with pytest.raises(PrepareError, match=message):
        prepare.fineweb_file_list(manifest, variant, shards)


def test_download_fetches_missing_files_into_the_reference_layout(tmp_path, monkeypatch):
    manifest = shared("data/fineweb/meta/manifest_sp1024.json")
    requested = []

    def fake_download(repo_id, remote, destination):
        requested.append(remote)
        destination.parent.mkdir(parents=True, exist_ok=True)
        if destination.suffix == ".bin":
            write_shard(destination, np.arange(3))
        else:
            destination.write_text("tokenizer")

    monkeypatch.setattr(prepare, "_hf_download", fake_download)
    summary = prepare.download_fineweb("sp1024", 1, tmp_path, manifest_path=manifest, progress=False)
    assert len(requested) == 4 and summary["downloaded"] == 4
    assert (tmp_path / "datasets/fineweb10B_sp1024/fineweb_train_000000.bin").is_file()
    assert (tmp_path / "tokenizers/fineweb_1024_bpe.model").is_file()
    again = prepare.download_fineweb("sp1024", 1, tmp_path, manifest_path=manifest, progress=False)
    assert (again["downloaded"], again["already_present"], len(requested)) == (0, 4, 4)
    (tmp_path / "datasets/fineweb10B_sp1024/fineweb_val_000000.bin").write_bytes(b"junk")
    with pytest.raises(ShardError, match="fineweb_val_000000.bin"):
        prepare.download_fineweb("sp1024", 1, tmp_path, manifest_path=manifest, progress=False)


def test_download_without_huggingface_hub_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(PrepareError, match=r"pip install golfjax\[download\]"):
        prepare.download_fineweb("sp1024", 1, tmp_path, progress=False)


# ------------------------------------------------------------ CLI errors


def test_cli_errors_are_one_line(tmp_path):
    docs = shared("data/fineweb/fineweb_challenge_docs_200.jsonl")
    model = shared("data/tokenizers/fineweb_1024_bpe.model")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    out = tmp_path / "out"
    cases = {
        "missing input": (["text", tmp_path / "nope.jsonl", "--tokenizer", model, "--out", out, "--num-val-docs", 1],
                          "input file not found"),
        "bad jsonl line": (["text", bad_jsonl, "--tokenizer", model, "--out", out, "--num-val-docs", 1],
                           "bad.jsonl:2: bad JSON line"),
        "missing tokenizer": (["text", docs, "--tokenizer", tmp_path / "no.model", "--out", out, "--num-val-docs", 1],
                              "tokenizer file not found"),
        "vocab mismatch": (["text", docs, "--tokenizer", model, "--vocab-size", 4096, "--out", out,
                            "--num-val-docs", 1], "VOCAB_SIZE=4096 does not match"),
        "unknown variant": (["fineweb", "--variant", "gpt2", "--out", out], "unknown variant 'gpt2'"),
    }  # fmt: skip
    for case, (args, message) in cases.items():
        result = run_cli(*args)
        assert result.returncode != 0, case
        lines = result.stderr.splitlines()  # a progress bar may come first
        assert lines[-1].startswith("error: ") and message in lines[-1], (case, result.stderr)
        assert sum(line.startswith("error") for line in lines) == 1, (case, result.stderr)
        assert "Traceback" not in result.stderr + result.stdout, case
