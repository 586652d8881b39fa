"""Test setup: 8 virtual CPU devices (set before jax is imported) and shared data.

The shared folder (tokenizers, FineWeb documents, golden reference outputs) sits
beside the checkout as ../shared, or wherever GOLFJAX_SHARED points.
"""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GOLFJAX_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"
TOKENIZER_1024 = SHARED / "data" / "tokenizers" / "fineweb_1024_bpe.model"
FINEWEB_DOCS = SHARED / "data" / "fineweb" / "fineweb_challenge_docs_200.jsonl"


def require(path: Path) -> Path:
    """Skip (with the missing path as the reason) when shared data is absent."""
    if not path.exists():
        pytest.skip(f"needs {path} (the ../shared folder beside the checkout, or GOLFJAX_SHARED)")
    return path


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return require(GOLDEN)


@pytest.fixture(scope="session")
def golden_shards(tmp_path_factory) -> Path:
    """The golden configuration's shards, built once by prepare_data's text path."""
    from golfjax.data.prepare import tokenize_documents_to_shards
    from golfjax.data.tokenizer import load_tokenizer
    import json

    require(FINEWEB_DOCS)
    sp = load_tokenizer(require(TOKENIZER_1024), 1024)
    out = tmp_path_factory.mktemp("golden_shards")
    with open(FINEWEB_DOCS, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    tokenize_documents_to_shards(docs, sp, out, num_val_docs=20)
    return out
