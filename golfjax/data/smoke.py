"""An offline corpus for the smoke run: docstrings of Python's standard library.

Every Python installation ships them, so a fresh clone with no network and no
`../shared` can still train, export and score. One document per module
(its docstrings joined by blank lines), modules in sorted order, shuffled with
a fixed seed; the result depends only on the Python version.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

import numpy as np


def _module_docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    docs = [ast.get_docstring(n) for n in nodes]
    return "\n\n".join(d.strip() for d in docs if d and len(d.strip()) > 40)


def stdlib_documents(max_bytes: int = 3_000_000, min_doc_bytes: int = 500) -> list[str]:
    """Docstring documents of the top-level stdlib modules, shuffled with seed 0."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/__init__.py")):
        if path.name.startswith("_") and path.name != "__init__.py" or path.parent.name.startswith("test"):
            continue
        text = _module_docstrings(path)
        if len(text.encode("utf-8")) < min_doc_bytes:
            continue
        docs.append(text)
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    order = np.random.RandomState(0).permutation(len(docs))
    return [docs[i] for i in order]
