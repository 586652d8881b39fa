"""Model checkpoints: params saved by orbax (no pickle) beside the run config.

Layout of a checkpoint directory:
    config.json   the resolved golfjax config (golfjax.config.to_dict)
    params/       orbax StandardCheckpointer tree of float32 params
The full resumable training state (optimizer, loader position, clock) builds
on the same layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from golfjax.config import Config, from_dict, to_dict
from golfjax.model import gpt


class CheckpointError(ValueError):
    """A checkpoint directory that is missing or incomplete."""


def _without_empty(tree: dict) -> dict:
    """Drop zero-size leaves (e.g. skip_weights of a 1-layer model): orbax cannot store them."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = _without_empty(value)
        elif int(np.prod(value.shape)) > 0:
            out[key] = value
    return out


def _with_empty(restored: dict, template: dict) -> dict:
    """Put the zero-size leaves of `template` back into `restored`."""
    return {
        key: _with_empty(restored.get(key, {}), value) if isinstance(value, dict)
        else restored[key] if key in restored else np.zeros(value.shape, value.dtype)
        for key, value in template.items()
    }


def save_params(directory: str | Path, params, cfg: Config) -> Path:
    """Write params and config; the orbax write is atomic (temp dir, then rename)."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", _without_empty(jax.device_get(params)), force=True)
    checkpointer.wait_until_finished()
    (directory / "config.json").write_text(json.dumps(to_dict(cfg), indent=1, sort_keys=True))
    return directory


def load_config(directory: str | Path) -> Config:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a golfjax checkpoint (no config.json)")
    return from_dict(json.loads(path.read_text()))


def load_params(directory: str | Path, cfg: Config | None = None):
    """Restore params as host numpy arrays, shaped by the checkpoint's (or given) config."""
    directory = Path(directory).resolve()
    cfg = cfg or load_config(directory)
    if not (directory / "params").is_dir():
        raise CheckpointError(f"{directory}: not a golfjax checkpoint (no params/)")
    template = jax.eval_shape(lambda: gpt.init_params(cfg.model, jax.random.PRNGKey(0)))
    abstract = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    restored = ocp.StandardCheckpointer().restore(directory / "params", _without_empty(abstract))
    return jax.tree.map(np.asarray, _with_empty(restored, abstract))
