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


def write_config_setting(path: Path, section: str, name: str, value) -> Path:
    """A config file whose get_config() is the default with one field set to `value` (any Python value)."""
    path.write_text("from dataclasses import replace\nfrom golfjax.config import Config\n\n\ndef get_config():\n"
                    f"    c = Config()\n    return replace(c, {section}=replace(c.{section}, {name}={value!r}))\n")
    return path


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return require(GOLDEN)


def shared(relative: str) -> Path:
    """A path inside the shared folder; skips (naming it) when absent."""
    return require(SHARED / relative)


@pytest.fixture(scope="session")
def golden_shards(tmp_path_factory) -> Path:
    """The golden configuration's shards, built once by `prepare_data.py text` (test_prepare checks their sha256)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("golden_shards")
    cmd = [sys.executable, str(REPO / "scripts" / "prepare_data.py"), "text", str(require(FINEWEB_DOCS)),
           "--tokenizer", str(require(TOKENIZER_1024)), "--out", str(out), "--num-val-docs", "20", "--quiet"]
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return out
