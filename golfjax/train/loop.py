"""The wall-clock-capped training loop of the reference, in JAX.

Order of events, as `train_gpt.py`: compile (before the clock), then per step:
validate when due (clock paused), compute the LR multiplier from the consumed
training time, run the step, log. At the end: save the checkpoint, export the
artifact, reload it and evaluate it (`final_int8_zlib_roundtrip_exact ...`).
"""

from __future__ import annotations

import json
import math
import sys
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
from golfjax.config import Config, describe
from golfjax.data.loader import TokenLoader, default_grad_accum_steps
from golfjax.eval.plain import EvalResult, evaluate_config, make_token_nll
from golfjax.export.pipeline import export_params, load_artifact_params
from golfjax.model import gpt
from golfjax.optim.build import build_optimizer, lr_multiplier, param_labels
from golfjax.parallel import make_mesh, num_ranks, put_replicated, put_sharded
from golfjax.train.data_setup import RunData, prepare_run_data
from golfjax.train.step import init_state, make_train_step


class TrainingError(RuntimeError):
    """Training cannot go on (for example a non-finite loss)."""


class RunLog:
    """Human log lines (stdout + train.log) and JSONL metrics, only on process 0."""

    def __init__(self, run_dir: Path, console: TextIO = sys.stdout):
        self.enabled = jax.process_index() == 0
        self.console = console
        if self.enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._text = open(run_dir / "train.log", "a", encoding="utf-8")
            self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def line(self, msg: str, console: bool = True) -> None:
        if not self.enabled:
            return
        if console:
            tqdm.write(msg, file=self.console)
        print(msg, file=self._text, flush=True)

    def metrics(self, record: dict) -> None:
        if self.enabled:
            print(json.dumps(record), file=self._metrics, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._text.close()
            self._metrics.close()


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    steps: int
    train_time_ms: float
    final: EvalResult
    roundtrip: EvalResult
    artifact_path: Path
    artifact_total_bytes: int


def run(cfg: Config, console: TextIO = sys.stdout) -> RunResult:
    """Train `cfg` end to end; returns the final and round-trip evaluations."""
    t_cfg = cfg.train
    run_id = t_cfg.run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    run_dir = Path(t_cfg.out_dir) / run_id
    log = RunLog(run_dir, console)
    try:
        return _run(cfg, run_dir, log)
    finally:
        log.close()


def _run(cfg: Config, run_dir: Path, log: RunLog) -> RunResult:
    t_cfg = cfg.train
    log.line(f"run_dir:{run_dir}")
    data = prepare_run_data(cfg, log.line)
    cfg = data.config  # data setup may fill in paths (smoke corpus)
    log.line("resolved config:\n" + describe(cfg), console=False)

    mesh = make_mesh()
    ranks = num_ranks(mesh)
    grad_accum = t_cfg.grad_accum_steps or default_grad_accum_steps(ranks)
    loader = TokenLoader(data.train_files, t_cfg.train_batch_tokens, t_cfg.train_seq_len, ranks, grad_accum)

    params = gpt.init_params(cfg.model, jax.random.PRNGKey(t_cfg.seed))
    tx = build_optimizer(params, cfg.optim, cfg.model.tie_embeddings)
    state = put_replicated(init_state(cfg, params, tx), mesh)
    step_fn, _ = make_train_step(cfg, mesh, tx)
    token_nll = make_token_nll(cfg.model, mesh)

    labels = jax.tree.leaves(param_labels(params, cfg.model.tie_embeddings))
    log.line(f"model_params:{gpt.count_params(params)} groups:" +
             ",".join(f"{g}={labels.count(g)}" for g in sorted(set(labels))))
    compute = jnp.dtype(gpt.resolve_compute_dtype(cfg.model.compute_dtype)).name
    log.line(f"devices:{ranks} backend:{jax.default_backend()} grad_accum_steps:{grad_accum} compute_dtype:{compute}")
    log.line(f"train_batch_tokens:{t_cfg.train_batch_tokens} train_seq_len:{t_cfg.train_seq_len} "
             f"iterations:{t_cfg.iterations} max_wallclock_seconds:{t_cfg.max_wallclock_seconds:.3f}")
    log.line(f"seed:{t_cfg.seed}")

    # Compile before the clock starts, so that training begins from the true init.
    t_compile = time.perf_counter()
    batch = jax.ShapeDtypeStruct(loader.batch_shape, jnp.int32)
    compiled = step_fn.lower(state, batch, batch, jnp.float32(1.0)).compile()
    log.line(f"compile_time:{time.perf_counter() - t_compile:.1f}s")

    max_ms = 1000.0 * t_cfg.max_wallclock_seconds if t_cfg.max_wallclock_seconds > 0 else None
    train_ms = 0.0
    stop_after: int | None = None
    step = 0
    tokens_per_step = t_cfg.train_batch_tokens
    bar = tqdm(total=t_cfg.iterations, desc="train", unit="step", disable=None, leave=False)
    t0 = time.perf_counter()
    while True:
        last = step == t_cfg.iterations or (stop_after is not None and step >= stop_after)
        if last or (t_cfg.val_loss_every > 0 and step % t_cfg.val_loss_every == 0):
            train_ms += 1000.0 * (time.perf_counter() - t0)
            res = evaluate_config(state.params, cfg, data.val_tokens, data.tables, mesh, token_nll)
            log.line(f"step:{step}/{t_cfg.iterations} val_loss:{res.val_loss:.4f} val_bpb:{res.val_bpb:.4f} "
                     f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")
            log.metrics({"event": "val", "step": step, "train_time_ms": train_ms, **res.as_dict()})
            t0 = time.perf_counter()
        if last:
            if stop_after is not None and step < t_cfg.iterations:
                log.line(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{step}/{t_cfg.iterations}")
            break

        elapsed_ms = train_ms + 1000.0 * (time.perf_counter() - t0)
        lr_mul = lr_multiplier(step, elapsed_ms, t_cfg.iterations, t_cfg.warmdown_iters, t_cfg.max_wallclock_seconds)
        x, y = loader.next_batch()
        t_step = time.perf_counter()
        state, metrics = compiled(state, put_sharded(x, mesh, 1), put_sharded(y, mesh, 1), jnp.float32(lr_mul))
        train_loss = float(metrics["train_loss"])  # waits for the step: the clock must see real work
        step_ms = 1000.0 * (time.perf_counter() - t_step)
        step += 1
        bar.update(1)
        if not math.isfinite(train_loss):
            raise TrainingError(f"step {step}: train_loss is {train_loss}; stopping (lower the learning rates?)")
        approx_ms = train_ms + 1000.0 * (time.perf_counter() - t0)
        log.metrics({"event": "train", "step": step, "train_loss": train_loss, "lr_mul": lr_mul,
                     "grad_norm": float(metrics["grad_norm"]), "step_ms": step_ms,
                     "tokens_per_s": tokens_per_step / max(step_ms / 1000.0, 1e-9), "train_time_ms": approx_ms})
        if t_cfg.train_log_every > 0 and (step <= 10 or step % t_cfg.train_log_every == 0 or stop_after is not None):
            log.line(f"step:{step}/{t_cfg.iterations} train_loss:{train_loss:.4f} "
                     f"train_time:{approx_ms:.0f}ms step_avg:{approx_ms / step:.2f}ms")
        if stop_after is None and max_ms is not None and approx_ms >= max_ms:
            stop_after = step
    bar.close()
    final = res

    ckpt_dir = checkpoint.save_params(run_dir / "checkpoint", state.params, cfg)
    log.line(f"checkpoint:{ckpt_dir}")
    report = export_params(state.params, cfg, run_dir / "final_model.golf")
    for text in report.lines():
        log.line(text)
    _, q_params = load_artifact_params(report.path)
    t_q = time.perf_counter()
    roundtrip = evaluate_config(put_replicated(q_params, mesh), cfg, data.val_tokens, data.tables, mesh, token_nll)
    log.line(f"final_int8_zlib_roundtrip val_loss:{roundtrip.val_loss:.4f} val_bpb:{roundtrip.val_bpb:.4f} "
             f"eval_time:{1000.0 * (time.perf_counter() - t_q):.0f}ms")
    log.line(f"final_int8_zlib_roundtrip_exact val_loss:{roundtrip.val_loss:.8f} val_bpb:{roundtrip.val_bpb:.8f}")
    log.metrics({"event": "final", "steps": step, "train_time_ms": train_ms, "artifact_bytes": report.total_bytes,
                 **{f"roundtrip_{k}": v for k, v in roundtrip.as_dict().items()},
                 **{f"final_{k}": v for k, v in final.as_dict().items()}})
    return RunResult(run_dir, step, train_ms, final, roundtrip, report.path, report.total_bytes)
