"""PNG pictures of a run from its `metrics.jsonl`: train loss and val BPB against
step and against training wall-clock.

One figure, `RUN_DIR/curves.png`, with 2x2 panels:

    train loss vs step      | train loss vs train time (s)
    val BPB vs step         | val BPB vs train time (s)

Train time is the reference's `train_time_ms` (the clock pauses for
validation). The final int8 round-trip val BPB, when the run got that far, is
a dashed line on the BPB panels. A resumed run appends to the same
metrics.jsonl, so a step logged twice keeps its last record; a line cut short
by a killed run is skipped. Matplotlib draws through its Agg canvas
(`matplotlib.figure.Figure`, no pyplot, no display needed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

PLOT_NAME = "curves.png"


@dataclass
class RunMetrics:
    """Train and val series sorted by step (one record per step, the last logged)."""

    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    final: dict | None = None
    skipped_lines: int = 0


def read_metrics(path: str | Path) -> RunMetrics:
    """Parse a metrics.jsonl (events 'train', 'val', 'final'); unknown events are ignored."""
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    out = RunMetrics()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                out.skipped_lines += 1
                continue
            if not isinstance(rec, dict):
                out.skipped_lines += 1
                continue
            event = rec.get("event")
            if event == "train" and _finite(rec.get("train_loss")) and "step" in rec:
                train[int(rec["step"])] = rec
            elif event == "val" and _finite(rec.get("val_bpb")) and "step" in rec:
                val[int(rec["step"])] = rec
            elif event == "final":
                out.final = rec
    out.train = [train[k] for k in sorted(train)]
    out.val = [val[k] for k in sorted(val)]
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _series(records: list[dict], key: str) -> tuple[list[float], list[float], list[float]]:
    steps = [float(r["step"]) for r in records]
    secs = [float(r.get("train_time_ms", math.nan)) / 1000.0 for r in records]
    ys = [float(r[key]) for r in records]
    return steps, secs, ys


def _smooth(ys: list[float], window: int) -> list[float]:
    """Trailing running mean (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _draw(ax, xs, ys, label, color, smooth: bool) -> None:
    pts = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x)]
    if not pts:
        ax.text(0.5, 0.5, "no train_time_ms in the metrics", ha="center", va="center", transform=ax.transAxes)
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    marker = "o" if len(xs) <= 30 else None
    if smooth and len(ys) > 50:
        window = max(5, len(ys) // 50)
        ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8, label=label)
        ax.plot(xs, _smooth(ys, window), color=color, linewidth=1.6, label=f"running mean ({window} steps)")
    else:
        ax.plot(xs, ys, color=color, marker=marker, markersize=4, linewidth=1.4, label=label)


def plot_metrics(metrics: RunMetrics, out_path: str | Path, title: str = "") -> Path:
    """Draw the 2x2 figure of `metrics` into `out_path` (PNG)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), dpi=100, layout="constrained")
    axes = fig.subplots(2, 2)
    panels = [
        (axes[0][0], metrics.train, "train_loss", "step", "train loss (nats)", "tab:blue", True),
        (axes[0][1], metrics.train, "train_loss", "time", "train loss (nats)", "tab:blue", True),
        (axes[1][0], metrics.val, "val_bpb", "step", "val BPB", "tab:red", False),
        (axes[1][1], metrics.val, "val_bpb", "time", "val BPB", "tab:red", False),
    ]
    final_bpb = (metrics.final or {}).get("roundtrip_val_bpb")
    for ax, records, key, xaxis, ylabel, color, smooth in panels:
        ax.set_xlabel("step" if xaxis == "step" else "training wall-clock (s)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if not records:
            ax.text(0.5, 0.5, f"no {'validation' if key == 'val_bpb' else 'train'} events",
                    ha="center", va="center", transform=ax.transAxes, color="0.4")
            continue
        steps, secs, ys = _series(records, key)
        _draw(ax, steps if xaxis == "step" else secs, ys, key, color, smooth)
        if key == "val_bpb" and _finite(final_bpb):
            ax.axhline(final_bpb, color="k", linestyle="--", linewidth=1.0,
                       label=f"int8 round trip {final_bpb:.4f}")
        if key == "val_bpb":
            last = records[-1]
            ax.annotate(f"{last['val_bpb']:.4f}", ((steps if xaxis == "step" else secs)[-1], last["val_bpb"]),
                        textcoords="offset points", xytext=(-4, 6), ha="right", fontsize=8)
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(title or "training curves")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png")
    return out_path


def write_run_plots(run_dir: str | Path) -> list[Path]:
    """Write the run's plots into `run_dir`; returns the files written ([] when the
    run has no metrics.jsonl or no usable train/val record yet)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    metrics = read_metrics(path)
    if not metrics.train and not metrics.val:
        return []
    title = run_dir.name
    if metrics.train:
        title += f"  ({metrics.train[-1]['step']} steps"
        bpb = (metrics.final or {}).get("roundtrip_val_bpb")
        title += f", round-trip val BPB {bpb:.4f})" if _finite(bpb) else ")"
    return [plot_metrics(metrics, run_dir / PLOT_NAME, title)]
