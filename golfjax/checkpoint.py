"""Checkpoints: the resumable training state (orbax CheckpointManager) and the params-only model.

A run directory holds two kinds:

    checkpoints/<step>/     the whole training state after <step> steps (the last K kept):
        state/              orbax StandardSave of {params, opt_state, avg} as a nested dict (avg: EMA/SWA, empty when off)
        meta/               JSON: step, consumed train_ms, stop_after, loader position,
                            training shards, size of metrics.jsonl, seed, why it was saved
        config/             JSON: the resolved config (golfjax.config.to_dict)
    checkpoint/             params only (config.json + params/), written at the end of a
                            run for scripts/export.py and scripts/evaluate.py

Atomicity is orbax's: a save is written into `<step>.orbax-checkpoint-tmp/` and
renamed to `<step>/` only when every item is on disk, and the manager lists
finalized steps only. A save cut short (SIGKILL, full disk) is therefore never
restored, and the previous checkpoints stay untouched (old ones are deleted only
after a newer one is committed). Leftover tmp directories are removed when the
manager is opened again. Saves are asynchronous: `save` copies the state to the
host and returns; the write finishes in the background (`wait` blocks for it).

Zero-size leaves (skip_weights of a 1-layer model, their Adam moments) cannot be
stored by orbax; they are dropped on save and recreated from the template.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from golfjax.config import SECTIONS, Config, ConfigError, from_dict, to_dict, with_values
from golfjax.model import gpt

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"  # the manager's directory inside a run directory
TEST_KILL_ENV = "GOLFJAX_TEST_KILL"  # tests only: "during-save:N" or "after-step:N" (SIGKILL self)


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, unreadable or unwritable."""


class NonFiniteState(RuntimeError):
    """The state to save has NaN/Inf values: it is not saved (the last good checkpoint stays the latest)."""


# ----------------------------------------------------------------------------
# pytree <-> nested dict of host arrays


def _leaf_key(path) -> tuple[str, ...]:
    return tuple(jax.tree_util.keystr(path, simple=True, separator="/").split("/"))


def state_to_tree(state) -> dict:
    """Any pytree (TrainState, params) as a nested str-keyed dict of host copies, zero-size leaves dropped.

    The copies are taken now (np.array copies): the train step donates the
    device buffers while orbax is still writing in the background.
    """
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if int(np.prod(np.shape(leaf))) == 0:
            continue
        *parents, name = _leaf_key(path)
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        if name in node:
            raise CheckpointError(f"two state leaves share the checkpoint key {'/'.join((*parents, name))}")
        node[name] = np.array(jax.device_get(leaf), copy=True)
    return out


def nonfinite_leaves(tree: dict, prefix: str = "") -> list[str]:
    """Keys of the floating-point leaves of a `state_to_tree` dict that hold NaN or Inf."""
    bad = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            bad += nonfinite_leaves(value, name + "/")
        elif jnp.issubdtype(value.dtype, jnp.inexact) and not np.isfinite(value).all():
            bad.append(name)
    return bad


def tree_to_state(tree: dict, template):
    """Inverse of `state_to_tree`: leaves of `tree` in the structure of `template` (zeros where size 0)."""
    leaves = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(template)[0]:
        shape, dtype = np.shape(leaf), leaf.dtype
        if int(np.prod(shape)) == 0:
            leaves.append(np.zeros(shape, dtype))
            continue
        node = tree
        for key in _leaf_key(path):
            node = node[key]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)


def _host_template(tree) -> dict:
    """Zero arrays shaped like `state_to_tree(tree)` (orbax then restores host numpy arrays)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if int(np.prod(leaf.shape)) == 0:
            continue
        *parents, name = _leaf_key(path)
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = np.zeros(leaf.shape, leaf.dtype)
    return out


def abstract_train_state(cfg: Config):
    """Shapes and dtypes of the TrainState of `cfg` (nothing allocated)."""
    from golfjax.optim.build import build_optimizer
    from golfjax.train.step import init_state

    def build():
        params = gpt.init_params(cfg.model, jax.random.PRNGKey(0))
        return init_state(cfg, params, build_optimizer(params, cfg.optim, cfg.model.tie_embeddings))

    return jax.eval_shape(build)


# ----------------------------------------------------------------------------
# the training-state checkpoints


def _describe_failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, OSError) else str(exc)


class TrainCheckpoints:
    """The last `keep` training states of a run in `<run_dir>/checkpoints/`, saved asynchronously."""

    def __init__(self, directory: str | Path, keep: int = 3, read_only: bool = False):
        self.directory = Path(directory).resolve()
        self.keep = keep
        self.read_only = read_only
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no such checkpoint directory")
        self._opened: ocp.CheckpointManager | None = None  # opened (and the directory created) on first use
        self._pending: int | None = None  # step of a save that may still be writing

    @property
    def _manager(self) -> ocp.CheckpointManager:
        if self._opened is None:
            # Reading opens a manager that never saves (orbax's read_only mode only adds warnings).
            options = ocp.CheckpointManagerOptions(
                max_to_keep=None if self.read_only else self.keep, create=not self.read_only,
                cleanup_tmp_directories=not self.read_only, enable_async_checkpointing=True)
            try:
                self._opened = ocp.CheckpointManager(self.directory, options=options)
            except OSError as exc:
                raise CheckpointError(f"cannot create the checkpoint directory {self.directory}: {exc}") from exc
        return self._opened

    def steps(self) -> list[int]:
        """Steps of the complete (committed) checkpoints, ascending (none if the directory does not exist)."""
        if self._opened is None and not self.directory.is_dir():
            return []
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def last_complete(self) -> str:
        """For messages: the newest committed checkpoint, or that there is none."""
        if self._opened is not None:
            self._opened.reload()
        step = self.latest_step()
        return f"{self.path(step)} (step {step})" if step is not None else "none was saved"

    def save(self, state, meta: dict[str, Any], cfg: Config) -> Path:
        """Start saving `state` (a pytree) with `meta` (JSON) as checkpoint `meta['step']`; returns its path.

        The arrays are copied to the host before this returns; the files are
        written in the background. An error of this save or of the previous one
        raises CheckpointError naming the newest complete checkpoint.
        """
        step = int(meta["step"])
        if step in self.steps():
            return self.path(step)  # already saved (e.g. resumed at this step, then stopped)
        tree = state_to_tree(state)
        broken = nonfinite_leaves(tree)
        if broken:
            raise NonFiniteState(f"the training state after step {step} has NaN/Inf values in {', '.join(broken[:4])}"
                                 + (f" and {len(broken) - 4} more" if len(broken) > 4 else ""))
        meta = {"format_version": FORMAT_VERSION, **meta}
        self.wait()  # the previous save first: its failure is reported under its own step
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta),
                config=ocp.args.JsonSave(to_dict(cfg))), force=True)
        except Exception as exc:  # noqa: BLE001 - orbax/tensorstore raise many types; all mean "not saved"
            raise self._error(step, exc) from exc
        self._pending = step
        _test_kill("during-save", step)
        return self.path(step)

    def wait(self) -> None:
        """Block until the background write has finished (raises CheckpointError if it failed)."""
        if self._opened is None:
            return
        try:
            self._opened.wait_until_finished()
            self._opened.check_for_errors()
        except Exception as exc:  # noqa: BLE001
            raise self._error(self._pending, exc) from exc
        self._pending = None

    def close(self) -> None:
        """Finish the pending write (its error is raised) and release the manager."""
        if self._opened is None:
            return
        try:
            self.wait()
        finally:
            self._opened.close()
            self._opened = None

    def _error(self, step: int | None, exc: BaseException) -> CheckpointError:
        self._pending = None
        which = f"checkpoint {self.path(step)}" if step is not None else f"a checkpoint in {self.directory}"
        return CheckpointError(
            f"could not write {which}: {_describe_failure(exc)}; the previous checkpoint is intact: "
            f"{self.last_complete()}; free disk space (or fix the directory's permissions), then continue "
            f"with --resume")

    def read_meta(self, step: int) -> tuple[dict, Config]:
        """The JSON items of checkpoint `step`: (meta, config)."""
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
            meta, config = dict(restored.meta), from_dict(restored.config)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"cannot read checkpoint {self.path(step)}: {_describe_failure(exc)}") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{self.path(step)}: checkpoint format {meta.get('format_version')!r}; "
                                  f"this golfjax reads format {FORMAT_VERSION}")
        return meta, config

    def restore_state(self, step: int, template):
        """The state pytree of checkpoint `step` as host numpy arrays, in the structure of `template`."""
        target = _host_template(template)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
            return tree_to_state(restored.state, template)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint {self.path(step)} does not fit this model and optimizer "
                f"({_describe_failure(exc)}); was it written by another golfjax version?") from exc


def _test_kill(point: str, step: int) -> None:
    """Tests only: SIGKILL this process at `point` of `step` when GOLFJAX_TEST_KILL=point:step."""
    if os.environ.get(TEST_KILL_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def kill_hook_after_step(step: int, checkpoints: TrainCheckpoints | None) -> None:
    """Tests only: after `step` (and its pending save) SIGKILL this process when GOLFJAX_TEST_KILL=after-step:N."""
    if os.environ.get(TEST_KILL_ENV) == f"after-step:{step}":
        if checkpoints is not None:
            checkpoints.wait()
        _test_kill("after-step", step)


# ----------------------------------------------------------------------------
# resuming: which checkpoint, and which config


# What a resumed run may change: its length and clock, logging and checkpoint
# cadence, where its files are, evaluation batching and the export. Everything
# else (model, optimizer, batch geometry, seed, data patterns) shapes the
# trajectory and stays the checkpoint's.
RESUME_MAY_CHANGE = frozenset({
    "train.iterations", "train.max_wallclock_seconds", "train.val_loss_every", "train.train_log_every",
    "train.warmup_steps", "train.checkpoint_every", "train.keep_checkpoints", "train.resume", "train.run_dir",
    "train.out_dir", "train.run_id", "data.data_path", "data.tokenizer_path", "eval.val_batch_size",
}) | {f"export.{name}" for name in to_dict(Config())["export"]}


def resume_config(requested: Config, saved: Config) -> Config:
    """The checkpoint's config with the requested values of RESUME_MAY_CHANGE; any other difference is refused."""
    want, have = json.loads(json.dumps(to_dict(requested))), json.loads(json.dumps(to_dict(saved)))
    conflicts, changes = [], {}
    for section in SECTIONS:
        for name, old in have[section].items():
            new = want[section].get(name)
            key = f"{section}.{name}"
            if new == old:
                continue
            if key not in RESUME_MAY_CHANGE:
                conflicts.append(f"{key} (checkpoint {old!r}, requested {new!r})")
            elif not (section == "data" and new == ""):  # "" = smoke data, which the first run filled in
                changes.setdefault(section, {})[name] = getattr(getattr(requested, section), name)
    if conflicts:
        raise ConfigError(
            f"cannot resume: the requested config differs from the checkpoint's in {'; '.join(conflicts)}; "
            "a resumed run keeps the checkpoint's model, optimizer, batches and seed: drop the change, "
            "or start a new run in another --run-dir")
    return with_values(saved, changes)


def run_checkpoints(run_dir: str | Path, keep: int = 3) -> TrainCheckpoints:
    return TrainCheckpoints(Path(run_dir) / CHECKPOINTS, keep)


def latest_for_resume(run_dir: str | Path) -> tuple[TrainCheckpoints, int]:
    """The checkpoints of `run_dir` and their latest complete step; CheckpointError naming the fix if none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"cannot resume {run_dir}: no such directory (--run-dir names the run to continue)")
    directory = (run_dir / CHECKPOINTS).resolve()
    step = TrainCheckpoints(directory, read_only=True).latest_step() if directory.is_dir() else None
    if step is None:  # (looked up read-only: a refused resume changes nothing)
        raise CheckpointError(
            f"cannot resume {run_dir}: it holds no complete checkpoint (in {directory}); "
            "start the run without --resume, with --checkpoint-every N to save some")
    return run_checkpoints(run_dir), step


def saved_config(run_dir: str | Path) -> Config:
    """The config of the latest complete checkpoint of `run_dir`."""
    checkpoints, step = latest_for_resume(run_dir)
    return checkpoints.read_meta(step)[1]


# ----------------------------------------------------------------------------
# the params-only checkpoint (end of a run; export and evaluate read it)


def save_params(directory: str | Path, params, cfg: Config) -> Path:
    """Write params and config; the orbax write is atomic (temp dir, then rename)."""
    directory = Path(directory).resolve()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(directory / "params", state_to_tree(params), force=True)
        checkpointer.wait_until_finished()
        if jax.process_index() == 0:  # one writer on a shared filesystem (orbax coordinates params/)
            tmp = directory / "config.json.tmp"
            tmp.write_text(json.dumps(to_dict(cfg), indent=1, sort_keys=True))
            os.replace(tmp, directory / "config.json")
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"could not write the params checkpoint {directory}: {_describe_failure(exc)}") from exc
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
    restored = ocp.StandardCheckpointer().restore(directory / "params", _host_template(template))
    return tree_to_state(restored, template)


# ----------------------------------------------------------------------------
# any checkpoint as a model source (scripts/export.py, evaluate.py --checkpoint)


def find_training_checkpoint(directory: str | Path) -> tuple[TrainCheckpoints, int]:
    """(manager, step) for a run directory, its checkpoints/ directory, or one checkpoints/<step>/."""
    directory = Path(directory).resolve()
    if (directory / CHECKPOINTS).is_dir():
        manager_dir, step = directory / CHECKPOINTS, None
    elif directory.name.isdigit() and (directory / "state").is_dir():
        manager_dir, step = directory.parent, int(directory.name)
    else:
        manager_dir, step = directory, None
    checkpoints = TrainCheckpoints(manager_dir, read_only=True)
    steps = checkpoints.steps()
    if step is None:
        if not steps:
            raise CheckpointError(f"{manager_dir}: no complete training checkpoint in it")
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{directory}: an incomplete checkpoint (the save did not finish); "
                              f"complete ones: {steps or 'none'}")
    return checkpoints, step


def load_model(directory: str | Path) -> tuple[Config, Any]:
    """(config, params as host arrays) from a params-only checkpoint or a training checkpoint.

    From a training checkpoint of a run with EMA/SWA the params are the averaged ones
    (what that run would evaluate and export at this step).

    `directory` may be `<run>/checkpoint` (config.json + params/), a run directory
    (its latest checkpoints/<step>), `<run>/checkpoints` or `<run>/checkpoints/<step>`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if ".orbax-checkpoint-tmp" in directory.name:
        raise CheckpointError(f"{directory}: an incomplete checkpoint (its save did not finish); "
                              f"use a complete one in {directory.parent}")
    if (directory / "config.json").is_file():
        cfg = load_config(directory)
        return cfg, load_params(directory, cfg)
    looks_like = (directory / CHECKPOINTS).is_dir() or (directory / "state").is_dir() or any(
        p.name.isdigit() for p in directory.iterdir())
    if not looks_like:
        raise CheckpointError(
            f"{directory}: not a golfjax checkpoint (expected config.json + params/, a run directory "
            f"with {CHECKPOINTS}/, or {CHECKPOINTS}/<step>)")
    checkpoints, step = find_training_checkpoint(directory)
    _, cfg = checkpoints.read_meta(step)
    state = checkpoints.restore_state(step, abstract_train_state(cfg))
    from golfjax.train.averaging import averaged_params

    return cfg, averaged_params(state.avg, state.params)[0]  # EMA/SWA weights when the run averages
