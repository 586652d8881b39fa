"""The wall-clock-capped training loop of the reference, in JAX.

Order of events, as `train_gpt.py`: compile (before the clock), then per step:
validate when due (clock paused), compute the LR multiplier from the consumed
training time, run the step, log. At the end: save the params, export the
artifact, reload it and evaluate it (`final_int8_zlib_roundtrip_exact ...`).

Checkpoints (golfjax.checkpoint) hold everything the loop's future depends on:
params, optimizer state, step, consumed training time (paused while saving, as
while validating), the wall-clock stop step, the loader position and the size
of metrics.jsonl. A run resumed from one (`train.resume`) continues exactly as
if it had not stopped: same batches, same LR multipliers, same validation
cadence, and metrics.jsonl continues from the checkpoint's step (records
written after it are moved to metrics.discarded.jsonl).

SIGTERM/SIGINT during the loop ask for a stop: after the current step the loop
saves a checkpoint, waits for it, and raises RunInterrupted (scripts exit with
128 + the signal number). A second signal aborts at once.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from golfjax import checkpoint
from golfjax.config import Config, ConfigError, describe
from golfjax.data.loader import TokenLoader, default_grad_accum_steps
from golfjax.eval.evaluator import Evaluator, load_byte_sidecar, load_validation_stream
from golfjax.eval.plain import EvalResult, evaluate_config, make_token_nll
from golfjax.export.pipeline import export_params, load_artifact_params
from golfjax.model import gpt
from golfjax.optim.build import build_optimizer, lr_multiplier, param_labels, training_budget_ms
from golfjax.parallel import (is_coordinator, make_mesh, num_ranks, process_ranks, put_process_local,
                              put_replicated)
from golfjax.profiling import ProfileWindow
from golfjax.train.data_setup import RunData, prepare_run_data
from golfjax.train.averaging import averaged_params
from golfjax.train.step import TrainState, init_state, make_train_step


class TrainingError(RuntimeError):
    """Training cannot go on (for example a non-finite loss)."""


class RunInterrupted(Exception):
    """SIGTERM/SIGINT stopped the run after saving a checkpoint; `exit_status` is 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


class RunLog:
    """Human log lines (stdout + train.log) and JSONL metrics, only on process 0."""

    def __init__(self, run_dir: Path, console: TextIO = sys.stdout):
        self.enabled = jax.process_index() == 0
        self.console = console
        self.run_dir = run_dir
        if self.enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._text = open(run_dir / "train.log", "a", encoding="utf-8")
            self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    @staticmethod
    def rewind_metrics(run_dir: Path, size: int) -> int:
        """Cut metrics.jsonl back to `size` bytes (a checkpoint's); the cut records go to
        metrics.discarded.jsonl. Returns how many records were moved."""
        path = run_dir / "metrics.jsonl"
        if jax.process_index() != 0 or not path.is_file() or path.stat().st_size <= size:
            return 0
        with open(path, "rb+") as f:
            f.seek(size)
            tail = f.read()
            f.truncate(size)
        with open(run_dir / "metrics.discarded.jsonl", "ab") as f:
            f.write(tail)
        return tail.count(b"\n")

    def line(self, msg: str, console: bool = True) -> None:
        if not self.enabled:
            return
        if console:
            tqdm.write(msg, file=self.console)
        print(msg, file=self._text, flush=True)

    def metrics(self, record: dict) -> None:
        if self.enabled:
            print(json.dumps(record), file=self._metrics, flush=True)

    def metrics_size(self) -> int:
        """Bytes of metrics.jsonl written so far (what a checkpoint records; every record is flushed)."""
        return os.fstat(self._metrics.fileno()).st_size if self.enabled else 0

    def close(self) -> None:
        if self.enabled:
            self._text.close()
            self._metrics.close()


class TrainClock:
    """Consumed training time in ms; paused while validating and checkpointing."""

    def __init__(self, consumed_ms: float = 0.0):
        self.consumed_ms = consumed_ms
        self._t0 = time.perf_counter()

    def elapsed_ms(self) -> float:
        return self.consumed_ms + 1000.0 * (time.perf_counter() - self._t0)

    def pause(self) -> float:
        self.consumed_ms = self.elapsed_ms()
        return self.consumed_ms

    def restart(self) -> None:
        self._t0 = time.perf_counter()


class StopSignals:
    """While active, SIGTERM and SIGINT only set `received`; the loop stops at the next step boundary.

    A second signal restores the previous handlers and re-raises itself, so
    Ctrl-C twice aborts at once (KeyboardInterrupt) and a second SIGTERM kills.
    Inactive outside the main thread (signal handlers can only be set there).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, console: TextIO = sys.stderr):
        self.received: int | None = None
        self.console = console
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.received = signum
        again = "press Ctrl-C" if signum == signal.SIGINT else "send it"
        print(f"received {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
              f"({again} again to abort without saving)", file=self.console, flush=True)


@dataclass
class Progress:
    """Where the loop is: all of it is saved in a checkpoint."""
    step: int = 0
    train_ms: float = 0.0
    stop_after: int | None = None  # the wall-clock cap's last step, once reached


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    steps: int
    train_time_ms: float
    final: EvalResult
    roundtrip: EvalResult
    artifact_path: Path
    artifact_total_bytes: int


@dataclass
class _Run:
    """What the loop's pieces share."""
    cfg: Config
    run_dir: Path
    log: RunLog
    checkpoints: checkpoint.TrainCheckpoints
    data: RunData | None = None
    mesh: object = None
    loader: TokenLoader | None = None
    compiled: object = None
    compiled_unrolled: object = None  # the step before depth recurrence switches on (recur_start_frac > 0)
    token_nll: object = None
    val_sidecar: object = None  # CaseOps original-byte sidecar of the validation tokens, or None


def check_run_options(cfg: Config) -> None:
    t = cfg.train
    if t.checkpoint_every < 0:
        raise ConfigError(f"train.checkpoint_every (--checkpoint-every, CHECKPOINT_EVERY) must be >= 0 "
                          f"(0: checkpoints only on SIGTERM/SIGINT), got {t.checkpoint_every}")
    if t.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints (KEEP_CHECKPOINTS) must be >= 1, got {t.keep_checkpoints}")
    if t.resume and not (t.run_dir or t.run_id):
        raise ConfigError("--resume needs the directory of the run to continue: pass --run-dir DIR")


def run_directory(cfg: Config) -> Path:
    """train.run_dir, else <out_dir>/<run_id> (a fresh timestamped id when run_id is empty)."""
    t = cfg.train
    run_dir = Path(t.run_dir) if t.run_dir else Path(t.out_dir) / (
        t.run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6])
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} is a file; give --run-dir a directory")
    return run_dir


def run(cfg: Config, console: TextIO = sys.stdout) -> RunResult:
    """Train `cfg` end to end (or continue it, with train.resume); returns the final and round-trip evaluations."""
    check_run_options(cfg)
    run_dir = run_directory(cfg)
    cfg, checkpoints, resume_step = _open_checkpoints(cfg, run_dir)
    discarded = 0
    if resume_step is not None:
        meta, _ = checkpoints.read_meta(resume_step)
        discarded = RunLog.rewind_metrics(run_dir, int(meta.get("metrics_bytes", 0)))
    try:
        log = RunLog(run_dir, console)
    except OSError as exc:
        raise OSError(f"cannot create the run directory {run_dir}: {exc}; choose a writable --run-dir") from exc
    ctx = _Run(cfg, run_dir, log, checkpoints)
    try:
        result = _run(ctx, resume_step, discarded)
        checkpoints.close()  # a failed background write is reported here
        return result
    except KeyboardInterrupt:
        raise  # abort at once: a save still being written stays uncommitted and is never restored
    except BaseException:
        _close_quietly(checkpoints)  # the error in flight is the one to report
        raise
    finally:
        ctx.log.close()


def _open_checkpoints(cfg: Config, run_dir: Path):
    """(config, checkpoints, step to resume from or None); a new run refuses a directory with checkpoints."""
    if cfg.train.resume:
        checkpoints, step = checkpoint.latest_for_resume(run_dir)
        cfg = checkpoint.resume_config(cfg, checkpoints.read_meta(step)[1])
        checkpoints.keep = cfg.train.keep_checkpoints
        return cfg, checkpoints, step
    checkpoints = checkpoint.run_checkpoints(run_dir, cfg.train.keep_checkpoints)
    latest = checkpoints.latest_step()
    if latest is not None:
        raise ConfigError(f"{run_dir} already holds the checkpoints of a run (latest step {latest}); "
                          "continue it with --resume, or choose another --run-dir")
    return cfg, checkpoints, None


def _close_quietly(checkpoints: checkpoint.TrainCheckpoints) -> None:
    try:
        checkpoints.close()
    except Exception:  # noqa: BLE001
        pass


def _run(ctx: _Run, resume_step: int | None, discarded: int) -> RunResult:
    log = ctx.log
    log.line(f"run_dir:{ctx.run_dir}")
    state, progress = _setup(ctx, resume_step, discarded)
    state, progress, final = _train(ctx, state, progress)
    return _finish(ctx, state, progress, final)


def _setup(ctx: _Run, resume_step: int | None, discarded: int):
    """Data, mesh, loader, initial (or restored) state, compiled step; returns (state, progress)."""
    log, t_cfg = ctx.log, ctx.cfg.train
    ctx.data = prepare_run_data(ctx.cfg, log.line)
    ctx.cfg = cfg = ctx.data.config  # data setup may fill in paths (smoke corpus)
    log.line("resolved config:\n" + describe(cfg), console=False)
    # CaseOps: every BPB of the run counts the original text's bytes (the byte tables would
    # count the case operators' bytes too, ~10% too many).
    ctx.val_sidecar = load_byte_sidecar(cfg, len(ctx.data.val_tokens))

    ctx.mesh = mesh = make_mesh()
    ranks = num_ranks(mesh)
    grad_accum = t_cfg.grad_accum_steps or default_grad_accum_steps(ranks)
    ctx.loader = TokenLoader(ctx.data.train_files, t_cfg.train_batch_tokens, t_cfg.train_seq_len, ranks, grad_accum,
                             local_ranks=process_ranks(mesh), order=cfg.data.data_order, seed=t_cfg.seed)

    if resume_step is None:
        params = gpt.init_params(cfg.model, jax.random.PRNGKey(t_cfg.seed))
        tx = build_optimizer(params, cfg.optim, cfg.model.tie_embeddings, mesh)
        state, progress = init_state(cfg, params, tx), Progress()
    else:  # shapes only: the values come from the checkpoint
        params = jax.eval_shape(lambda: gpt.init_params(cfg.model, jax.random.PRNGKey(t_cfg.seed)))
        tx = build_optimizer(params, cfg.optim, cfg.model.tie_embeddings, mesh)
        template = jax.eval_shape(lambda p: init_state(cfg, p, tx), params)
        state, progress = _restore(ctx, resume_step, template, discarded)
    state = put_replicated(state, mesh)
    step_fn = make_train_step(cfg, mesh, tx)
    ctx.token_nll = make_token_nll(cfg.model, mesh)

    labels = jax.tree.leaves(param_labels(params, cfg.model.tie_embeddings))
    log.line(f"model_params:{gpt.count_params(params)} groups:" +
             ",".join(f"{g}={labels.count(g)}" for g in sorted(set(labels))))
    compute = jnp.dtype(gpt.resolve_compute_dtype(cfg.model.compute_dtype)).name
    attention = gpt.resolve_attention_impl(cfg.model.attention_impl, jnp.dtype(compute))
    log.line(f"devices:{ranks} backend:{jax.default_backend()} grad_accum_steps:{grad_accum} compute_dtype:{compute} "
             f"attention:{attention or 'xla'}")
    log.line(f"train_batch_tokens:{t_cfg.train_batch_tokens} train_seq_len:{t_cfg.train_seq_len} "
             f"iterations:{t_cfg.iterations} max_wallclock_seconds:{t_cfg.max_wallclock_seconds:.3f}")
    log.line(f"seed:{t_cfg.seed}")
    if t_cfg.checkpoint_every:
        log.line(f"checkpoints:{ctx.checkpoints.directory} every:{t_cfg.checkpoint_every} "
                 f"keep:{t_cfg.keep_checkpoints}")

    # Compile before the clock starts, so that training begins from the true init.
    t_compile = time.perf_counter()
    batch = jax.ShapeDtypeStruct(ctx.loader.batch_shape, jnp.int32)
    ctx.compiled = step_fn.lower(state, batch, batch, jnp.float32(1.0)).compile()
    if recurrence_start_frac(cfg) > 0:  # both graphs before the clock: the switch costs no training time
        ctx.compiled_unrolled = make_train_step(cfg, mesh, tx, recurrent=False).lower(
            state, batch, batch, jnp.float32(1.0)).compile()
        log.line(f"depth_recurrence: off until training fraction {recurrence_start_frac(cfg):.3f} "
                 "(both step graphs compiled)")
    log.line(f"compile_time:{time.perf_counter() - t_compile:.1f}s")
    return state, progress


def _restore(ctx: _Run, step: int, template, discarded: int):
    """The state, progress and loader position of checkpoint `step`."""
    meta, _ = ctx.checkpoints.read_meta(step)
    shards = [[p.name, n] for p, n in zip(ctx.loader.stream.files, ctx.loader.stream.lengths)]
    if meta["shards"] != shards:
        raise checkpoint.CheckpointError(
            f"cannot resume from {ctx.checkpoints.path(step)}: its training shards ({_shard_summary(meta['shards'])}) "
            f"are not those of {ctx.cfg.data.data_path} ({_shard_summary(shards)}); point data.data_path at the "
            "run's data")
    state = ctx.checkpoints.restore_state(step, template)
    ctx.loader.restore(meta["loader"])
    progress = Progress(int(meta["step"]), float(meta["train_ms"]), meta["stop_after"])
    ctx.log.line(f"resumed_from:{ctx.checkpoints.path(step)} step:{progress.step} "
                 f"train_time:{progress.train_ms:.0f}ms discarded_metrics_records:{discarded}")
    if meta.get("devices") != num_ranks(ctx.mesh):
        ctx.log.line(f"resume_note: saved on {meta.get('devices')} devices, continuing on {num_ranks(ctx.mesh)}: "
                     "the same batches, but gradient sums in another order (not bit for bit)")
    ctx.log.metrics({"event": "resume", "step": progress.step, "train_time_ms": progress.train_ms,
                     "checkpoint": str(ctx.checkpoints.path(step)), "discarded_records": discarded})
    return state, progress


def _shard_summary(shards: list) -> str:
    return f"{len(shards)} files, first {shards[0][0] if shards else 'none'}"


def _validate(ctx: _Run, state, progress: Progress, clock: TrainClock) -> EvalResult:
    train_ms = clock.pause()
    res = evaluate_config(state.params, ctx.cfg, ctx.data.val_tokens, ctx.data.tables, ctx.mesh, ctx.token_nll,
                          byte_sidecar=ctx.val_sidecar)
    step, iterations = progress.step, ctx.cfg.train.iterations
    ctx.log.line(f"step:{step}/{iterations} val_loss:{res.val_loss:.4f} val_bpb:{res.val_bpb:.4f} "
                 f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")
    ctx.log.metrics({"event": "val", "step": step, "train_time_ms": train_ms, **res.as_dict()})
    clock.restart()
    return res


def recurrence_start_frac(cfg: Config) -> float:
    """model.recur_start_frac (0 when the model has no recurrence): the training fraction
    from which the depth-recurrent step runs."""
    if getattr(cfg.model, "recur_loops", 0) <= 0:
        return 0.0
    return float(getattr(cfg.model, "recur_start_frac", 0.0))


def training_fraction(cfg: Config, step: int, elapsed_ms: float) -> float:
    """How far training is: of the wall-clock budget when capped, else of the iterations."""
    t = cfg.train
    budget = training_budget_ms(t.max_wallclock_seconds, t.gptq_reserve_seconds)
    if budget > 0:
        return elapsed_ms / budget
    return step / max(t.iterations, 1)


def agreed_elapsed_ms(clock: TrainClock) -> float:
    """Consumed training time, the same on every process (process 0's), so that the
    LR multiplier and the wall-clock stop never differ between replicas."""
    elapsed = clock.elapsed_ms()
    if jax.process_count() == 1:
        return elapsed
    from jax.experimental import multihost_utils

    return float(multihost_utils.broadcast_one_to_all(np.float64(elapsed)))


def _train_step(ctx: _Run, state, progress: Progress, clock: TrainClock, profiler: ProfileWindow):
    """One optimizer step and its log lines; returns the new state."""
    t_cfg = ctx.cfg.train
    step = progress.step
    profile_overhead = profiler.overhead_s
    profiler.before_step(step + 1)
    elapsed = agreed_elapsed_ms(clock)
    lr_mul = lr_multiplier(step, elapsed, t_cfg.iterations, t_cfg.warmdown_iters, t_cfg.max_wallclock_seconds,
                           t_cfg.warmdown_frac, t_cfg.min_lr, t_cfg.gptq_reserve_seconds)
    compiled = ctx.compiled
    if ctx.compiled_unrolled is not None and training_fraction(ctx.cfg, step, elapsed) < recurrence_start_frac(ctx.cfg):
        compiled = ctx.compiled_unrolled
    x, y = ctx.loader.next_batch()
    t_step = time.perf_counter()
    state, metrics = compiled(state, put_process_local(x, ctx.mesh, 1), put_process_local(y, ctx.mesh, 1),
                              jnp.float32(lr_mul))
    train_loss = float(metrics["train_loss"])  # waits for the step: the clock must see real work
    step_ms = 1000.0 * (time.perf_counter() - t_step)
    progress.step = step = step + 1
    traced = profiler.after_step(step, (state, metrics))
    clock.consumed_ms -= 1000.0 * (profiler.overhead_s - profile_overhead)  # tracing is not training time
    if traced:
        ctx.log.line(f"profile:{traced}")
    if not math.isfinite(train_loss):
        ctx.checkpoints.wait()
        raise TrainingError(
            f"step {step}: train_loss is {train_loss}; stopped without writing an artifact (the weights are broken); "
            f"last good checkpoint: {ctx.checkpoints.last_complete()}; lower the learning rates (e.g. "
            "--set optim.matrix_lr=...) and start a new run")
    approx_ms = agreed_elapsed_ms(clock)
    record = {"event": "train", "step": step, "train_loss": train_loss, "lr_mul": lr_mul,
              "grad_norm": float(metrics["grad_norm"]), "step_ms": step_ms,
              "tokens_per_s": t_cfg.train_batch_tokens / max(step_ms / 1000.0, 1e-9),
              "train_time_ms": approx_ms}
    if ctx.compiled_unrolled is not None:
        record["recurrent"] = compiled is ctx.compiled
    ctx.log.metrics(record)
    if t_cfg.train_log_every > 0 and (step <= 10 or step % t_cfg.train_log_every == 0
                                      or progress.stop_after is not None):
        ctx.log.line(f"step:{step}/{t_cfg.iterations} train_loss:{train_loss:.4f} "
                     f"train_time:{approx_ms:.0f}ms step_avg:{approx_ms / step:.2f}ms")
    max_ms = training_budget_ms(t_cfg.max_wallclock_seconds, t_cfg.gptq_reserve_seconds)
    if progress.stop_after is None and max_ms > 0 and approx_ms >= max_ms:
        progress.stop_after = step
    return state


def _training_done(ctx: _Run, progress: Progress) -> bool:
    return progress.step >= ctx.cfg.train.iterations or (
        progress.stop_after is not None and progress.step >= progress.stop_after)


def _save_checkpoint(ctx: _Run, state, progress: Progress, clock: TrainClock, reason: str) -> Path:
    """Start an (async) save of the state after `progress.step`; the clock is paused meanwhile."""
    progress.train_ms = clock.pause()
    meta = {"step": progress.step, "train_ms": progress.train_ms, "stop_after": progress.stop_after,
            "loader": ctx.loader.state(), "metrics_bytes": ctx.log.metrics_size(), "reason": reason,
            "shards": [[p.name, n] for p, n in zip(ctx.loader.stream.files, ctx.loader.stream.lengths)],
            "seed": ctx.cfg.train.seed, "devices": num_ranks(ctx.mesh)}
    try:
        path = ctx.checkpoints.save(state, meta, ctx.cfg)
    except checkpoint.NonFiniteState as exc:
        raise TrainingError(f"step {progress.step}: {exc}; not saved, stopped without writing an artifact; "
                            f"last good checkpoint: {ctx.checkpoints.last_complete()}; lower the learning rates "
                            "and start a new run") from exc
    clock.restart()
    return path


def _maybe_checkpoint(ctx: _Run, state, progress: Progress, clock: TrainClock, signals: StopSignals) -> None:
    """Every checkpoint_every steps and after the last step; on a signal, save, wait and stop."""
    every = ctx.cfg.train.checkpoint_every
    if every > 0 and (progress.step % every == 0 or _training_done(ctx, progress)):
        path = _save_checkpoint(ctx, state, progress, clock, "every")
        ctx.log.line(f"checkpoint:{path} step:{progress.step}", console=False)
    if signals.received is not None:
        path = _save_checkpoint(ctx, state, progress, clock, "signal")
        ctx.checkpoints.wait()
        name = signal.Signals(signals.received).name
        message = (f"stopped by {name} after step {progress.step}/{ctx.cfg.train.iterations}; checkpoint {path}; "
                   f"continue with: python scripts/train.py --run-dir {ctx.run_dir} --resume")
        ctx.log.line(message, console=False)  # the script prints it (stderr) as it exits
        raise RunInterrupted(message, signals.received)
    checkpoint.kill_hook_after_step(progress.step, ctx.checkpoints)


def _train(ctx: _Run, state, progress: Progress):
    """Validate when due, step, checkpoint; until the iterations or the wall-clock cap are done."""
    t_cfg = ctx.cfg.train
    bar = tqdm(total=t_cfg.iterations, initial=progress.step, desc="train", unit="step",
               disable=None if is_coordinator() else True, leave=False)
    profiler = ProfileWindow(ctx.run_dir, t_cfg.profile or None)
    with StopSignals() as signals, profiler:
        clock = TrainClock(progress.train_ms)  # starts now: at step 0 the warmdown sees (almost) no time
        while True:
            last = _training_done(ctx, progress)
            if last:
                state = _apply_averages(ctx, state)
            if last or (t_cfg.val_loss_every > 0 and progress.step % t_cfg.val_loss_every == 0):
                final = _validate(ctx, state, progress, clock)
            if last:
                break
            state = _train_step(ctx, state, progress, clock, profiler)
            bar.update(1)
            _maybe_checkpoint(ctx, state, progress, clock, signals)
    bar.close()
    progress.train_ms = clock.consumed_ms
    if progress.stop_after is not None and progress.step < t_cfg.iterations:
        ctx.log.line(f"stopping_early: wallclock_cap train_time:{progress.train_ms:.0f}ms "
                     f"step:{progress.step}/{t_cfg.iterations}")
    ctx.checkpoints.wait()
    return state, progress, final


def _apply_averages(ctx: _Run, state: TrainState) -> TrainState:
    """The state whose params are the EMA/SWA average (what the final evaluation and the export see)."""
    params, what = averaged_params(state.avg, state.params)
    if what != "none":
        ctx.log.line(f"weight_averaging: final params are {what}")
    return TrainState(params, state.opt_state, state.avg)


def _write_plots(log: RunLog, run_dir: Path) -> None:
    """curves.png from metrics.jsonl; a finished run does not fail over a picture."""
    if not is_coordinator():
        return
    from golfjax.plots import write_run_plots

    try:
        for path in write_run_plots(run_dir):
            log.line(f"plot:{path}")
    except Exception as exc:  # noqa: BLE001
        log.line(f"plot_failed:{type(exc).__name__}: {exc}")


def _finish(ctx: _Run, state, progress: Progress, final: EvalResult) -> RunResult:
    """Params checkpoint, artifact, round-trip evaluation, final metrics."""
    cfg, log, run_dir = ctx.cfg, ctx.log, ctx.run_dir
    ckpt_dir = checkpoint.save_params(run_dir / "checkpoint", state.params, cfg)
    log.line(f"checkpoint:{ckpt_dir}")
    # Every process needs the round-trip weights; only process 0 writes the run's artifact
    # (the export is deterministic, so the others write a private copy).
    artifact_path = run_dir / "final_model.golf" if is_coordinator() else (
        run_dir / f".final_model.process{jax.process_index()}.golf")
    artifact_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        report = export_params(state.params, cfg, artifact_path)
    except OSError as exc:
        raise OSError(f"could not write the artifact {artifact_path}: {exc}; the trained params are safe in "
                      f"{ckpt_dir}: free disk space, then export them with: python scripts/export.py "
                      f"--checkpoint {ckpt_dir} --out {artifact_path}") from exc
    for text in report.lines():
        log.line(text)
    _, q_params = load_artifact_params(report.path)
    t_q = time.perf_counter()
    roundtrip = evaluate_config(put_replicated(q_params, ctx.mesh), cfg, ctx.data.val_tokens, ctx.data.tables,
                                ctx.mesh, ctx.token_nll, byte_sidecar=ctx.val_sidecar)
    roundtrip_s = time.perf_counter() - t_q
    log.line(f"final_int8_zlib_roundtrip val_loss:{roundtrip.val_loss:.4f} val_bpb:{roundtrip.val_bpb:.4f} "
             f"eval_time:{1000.0 * roundtrip_s:.0f}ms")
    log.line(f"final_int8_zlib_roundtrip_exact val_loss:{roundtrip.val_loss:.8f} val_bpb:{roundtrip.val_bpb:.8f}")
    # The run's score: the configured evaluation mode's BPB on the round-trip weights.
    score = {"score_mode": "plain", "score_val_loss": roundtrip.val_loss, "score_val_bpb": roundtrip.val_bpb,
             "score_eval_seconds": roundtrip_s}
    if cfg.eval.eval_mode != "plain":
        # The configured final evaluation, on the round-trip weights and over the whole
        # validation stream, as scripts/score.py scores the artifact (plain mode truncates).
        stream = load_validation_stream(cfg)
        evaluator = Evaluator(cfg, ctx.mesh, ctx.data.tables, byte_sidecar=load_byte_sidecar(cfg, len(stream)),
                              progress=False)
        eval_report = evaluator.evaluate(put_replicated(q_params, ctx.mesh), stream)
        for text in eval_report.lines():
            log.line(text)
        log.metrics({"event": "final_eval_mode", **eval_report.as_dict()})
        score = {"score_mode": eval_report.mode, "score_val_loss": eval_report.val_loss,
                 "score_val_bpb": eval_report.val_bpb, "score_eval_seconds": eval_report.seconds.get("total")}
    log.metrics({"event": "final", "steps": progress.step, "train_time_ms": progress.train_ms,
                 "artifact_bytes": report.total_bytes, **score,
                 **{f"roundtrip_{k}": v for k, v in roundtrip.as_dict().items()},
                 **{f"final_{k}": v for k, v in final.as_dict().items()}})
    _write_plots(log, run_dir)
    return RunResult(run_dir, progress.step, progress.train_ms, final, roundtrip, report.path, report.total_bytes)
