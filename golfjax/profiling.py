"""jax.profiler traces around a chosen window of training steps (`--profile START:STOP`).

Steps are numbered as in the log lines (the first step is 1) and the window is
half-open like a Python slice: `--profile 5:8` traces steps 5, 6 and 7. The
trace starts just before step START and stops, after the outputs of step
STOP-1 are ready, so the trace holds whole steps only; each step is wrapped in
`StepTraceAnnotation("train", step_num=N)`, which XProf's step views use.

The trace goes to `RUN_DIR/profile` (`RUN_DIR/profile/process_I` when several
processes run, so that processes on one host do not overwrite each other):
`plugins/profile/<timestamp>/<host>.xplane.pb` (XProf / TensorBoard),
`<host>.trace.json.gz` (Chrome trace JSON) and `perfetto_trace.json.gz`
(drag into https://ui.perfetto.dev). `create_perfetto_link` is never used: it
blocks until someone opens the link.

This module imports jax only when a trace starts, so a command line can check
the spec (`parse_profile_spec`) before jax is loaded.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


class ProfileSpecError(ValueError):
    """A `--profile` value that is not START:STOP with 1 <= START < STOP."""


def parse_profile_spec(spec: str | None) -> tuple[int, int] | None:
    """'5:8' -> (5, 8); None or '' -> None (no profiling)."""
    if spec is None or str(spec).strip() == "":
        return None
    text = str(spec).strip()
    hint = (f"--profile must be START:STOP, the steps to trace as a half-open range of step numbers "
            f"as in the log (the first step is 1), e.g. 5:8 traces steps 5, 6 and 7; got {spec!r}")
    parts = text.split(":")
    if len(parts) != 2:
        raise ProfileSpecError(hint)
    try:
        start, stop = int(parts[0]), int(parts[1])
    except ValueError:
        raise ProfileSpecError(hint) from None
    if start < 1 or stop <= start:
        raise ProfileSpecError(hint)
    return start, stop


def find_trace_files(trace_root: str | Path) -> dict[str, list[Path]]:
    """The files a trace wrote under `trace_root`, by kind: xplane, trace_json, perfetto."""
    root = Path(trace_root)
    return {
        "xplane": sorted(root.rglob("*.xplane.pb")),
        "trace_json": sorted(p for p in root.rglob("*.trace.json.gz")),
        "perfetto": sorted(root.rglob("perfetto_trace.json.gz")),
    }


class ProfileWindow:
    """Starts, annotates and stops a jax.profiler trace around steps [START, STOP).

    Call `before_step(n)` just before step n's work (loading its batch
    included), `after_step(n, outputs)` once its outputs exist, and `close()`
    when training ends (it stops a trace the run did not reach STOP for, e.g.
    a wall-clock cap or an error). With `spec=None` every call is a no-op.

    `overhead_s` accumulates the seconds spent starting and stopping the trace
    (stopping writes the files: seconds for a large trace), so that a
    wall-clock-capped loop can leave them out of its training time.
    """

    def __init__(self, run_dir: str | Path, spec: str | None, perfetto: bool = True):
        self.window = parse_profile_spec(spec)
        self.perfetto = perfetto
        self.log_dir: Path | None = None  # set when the trace starts
        self._tracing = False
        self._annotation: Any = None
        self._run_dir = Path(run_dir)
        self.overhead_s = 0.0

    @property
    def enabled(self) -> bool:
        return self.window is not None

    @property
    def tracing(self) -> bool:
        return self._tracing

    def _target_dir(self) -> Path:
        import jax

        root = self._run_dir / "profile"
        if jax.process_count() > 1:
            root = root / f"process_{jax.process_index()}"
        return root

    def before_step(self, step: int) -> None:
        """Start the trace at step START; open the step's annotation inside the window."""
        if self.window is None:
            return
        start, stop = self.window
        if step == start and not self._tracing:
            import jax

            t = time.perf_counter()
            self.log_dir = self._target_dir()
            self.log_dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.log_dir), create_perfetto_link=False,
                                     create_perfetto_trace=self.perfetto)
            self._tracing = True
            self.overhead_s += time.perf_counter() - t
        if self._tracing and start <= step < stop:
            import jax

            self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
            self._annotation.__enter__()

    def after_step(self, step: int, outputs: Any = None) -> Path | None:
        """Wait for `outputs` (any pytree of arrays) inside the window, close the step's
        annotation, and stop the trace after step STOP-1. Returns the trace directory
        when this call stopped the trace, else None."""
        if self.window is None or not self._tracing:
            return None
        import jax

        if outputs is not None:
            jax.block_until_ready(outputs)
        self._close_annotation()
        if step >= self.window[1] - 1:
            return self._stop()
        return None

    def close(self) -> Path | None:
        """Stop a trace still running (the run ended inside the window)."""
        if not self._tracing:
            return None
        self._close_annotation()
        return self._stop()

    def _close_annotation(self) -> None:
        if self._annotation is not None:
            ann, self._annotation = self._annotation, None
            ann.__exit__(None, None, None)

    def _stop(self) -> Path | None:
        import jax

        t = time.perf_counter()
        self._tracing = False
        jax.profiler.stop_trace()
        self.overhead_s += time.perf_counter() - t
        return self.log_dir

    def __enter__(self) -> "ProfileWindow":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
