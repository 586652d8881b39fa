"""Reference (PyTorch) state dicts <-> golfjax params.

The reference names its tensors `tok_emb.weight`, `blocks.3.attn.c_q.weight`
(shape (out, in), used as x @ W.T), `blocks.3.resid_mix`, `skip_weights`,
`lm_head.weight`. golfjax keeps blocks stacked on a leading layer axis with
Flax `(in, out)` kernels. The mapping is a rule, not a table: join the tree
path with dots, put the layer index after `blocks`, and turn `kernel` /
`embedding` into a (transposed) `weight`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from golfjax.config import ModelConfig
from golfjax.model import gpt


class InteropError(ValueError):
    """A reference state that does not fit the configured model."""


def _flat(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _reference_name(path: tuple[str, ...], layer: int | None) -> tuple[str, bool]:
    """Reference name of a param path, and whether its layout is transposed."""
    *head, last = path
    transposed = last == "kernel"
    if last in ("kernel", "embedding"):
        last = "weight"
    parts = list(head) + [last]
    if layer is not None:
        parts = [parts[0], str(layer)] + parts[1:]
    return ".".join(parts), transposed


def to_reference_state(params: dict) -> dict[str, np.ndarray]:
    """golfjax params -> flat float32 numpy dict with reference names and layouts."""
    state: dict[str, np.ndarray] = {}
    for path, leaf in _flat(jax.device_get(params)):
        arr = np.asarray(leaf)
        if path[0] == "blocks":
            for layer in range(arr.shape[0]):
                name, transposed = _reference_name(path, layer)
                state[name] = np.ascontiguousarray(arr[layer].T if transposed else arr[layer])
        else:
            name, transposed = _reference_name(path, None)
            state[name] = np.ascontiguousarray(arr.T if transposed else arr)
    return state


def from_reference_state(state: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """Reference state dict -> golfjax params for `cfg`, checking every name and shape."""
    template = jax.eval_shape(lambda: gpt.init_params(cfg, jax.random.PRNGKey(0)))
    expected = {name for name in to_reference_state_names(template)}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise InteropError(
            "reference state does not match the configured model "
            f"(num_layers={cfg.num_layers}, model_dim={cfg.model_dim}, tie_embeddings={cfg.tie_embeddings}): "
            f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}"
        )

    def build(path: tuple[str, ...], spec) -> np.ndarray:
        if path[0] == "blocks":
            layers = []
            for layer in range(spec.shape[0]):
                name, transposed = _reference_name(path, layer)
                layers.append(_checked(state[name], transposed, spec.shape[1:], name))
            return np.stack(layers)
        name, transposed = _reference_name(path, None)
        return _checked(state[name], transposed, spec.shape, name)

    return _map_with_path(template, build)


def to_reference_state_names(template: dict) -> list[str]:
    names = []
    for path, leaf in _flat(template):
        if path[0] == "blocks":
            names += [_reference_name(path, layer)[0] for layer in range(leaf.shape[0])]
        else:
            names.append(_reference_name(path, None)[0])
    return names


def _checked(arr: np.ndarray, transposed: bool, shape: tuple[int, ...], name: str) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32)
    arr = arr.T if transposed else arr
    if arr.shape != tuple(shape):
        want = tuple(reversed(shape)) if transposed else tuple(shape)
        got = tuple(reversed(arr.shape)) if transposed else arr.shape
        raise InteropError(f"{name}: shape {got} in the reference state, the configured model needs {want}")
    return np.ascontiguousarray(arr)


def _map_with_path(tree: dict, fn, prefix: tuple[str, ...] = ()) -> dict:
    return {
        k: _map_with_path(v, fn, prefix + (k,)) if isinstance(v, dict) else fn(prefix + (k,), v)
        for k, v in tree.items()
    }


def load_reference_state(path: str | Path) -> dict[str, np.ndarray]:
    """Read a reference state dict from .npz (no pickle) or .pt (torch, weights only)."""
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"reference state not found: {path}")
    if path.suffix == ".npz":
        if not zipfile.is_zipfile(path):
            raise InteropError(f"{path}: not a readable .npz state dict (not a zip archive)")
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (ValueError, zipfile.BadZipFile, OSError) as exc:
            raise InteropError(f"{path}: not a readable .npz state dict ({exc})") from exc
    if path.suffix in (".pt", ".pth"):
        try:
            import torch
        except ImportError as exc:
            raise InteropError(f"{path}: reading .pt needs torch (pip install 'golfjax[torch]')") from exc
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v.detach().float().numpy() for k, v in obj.items()}
    raise InteropError(f"{path}: unknown reference state format (expected .npz or .pt)")


def load_reference_params(path: str | Path, cfg: ModelConfig) -> dict:
    """Read a reference state file into params for `cfg`; errors name the file."""
    state = load_reference_state(path)
    try:
        return from_reference_state(state, cfg)
    except InteropError as exc:
        raise InteropError(f"{path}: {exc}") from None
