"""The ablation runner: train config variants over seeds, compare each to the control.

A *toggle* is `section.field=v0,v1,...`; its first value is the control's
(`''` is the empty string: `model.smear='',v1`). With
several toggles, mode "each" varies one toggle at a time (every other toggle
at its first value), mode "grid" runs every combination; either way the first
variant is the control (every toggle at its first value). Each variant is
trained once per seed (`train.seed=S`) by `scripts/train.py` in a subprocess;
the metric (default: the int8 round-trip val_bpb of the plain evaluation;
score_val_bpb is the configured eval mode's) is read from the run's
metrics.jsonl "final" event, or else (round-trip metrics only) from its
`final_int8_zlib_roundtrip_exact ... val_bpb:` log line. Runs whose final
event already exists are reused, so an interrupted ablation resumes. The
comparison (mean, delta to the control, bootstrap CI, permutation and Welch
p-values) comes from golfjax.stats; the report is a markdown table.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from golfjax import stats
from golfjax.config import ConfigError, resolve

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "scripts" / "train.py"
# score_*: the configured eval mode's result on the round-trip weights (= roundtrip_* in plain mode).
METRICS = ("roundtrip_val_bpb", "score_val_bpb", "final_val_bpb", "roundtrip_val_loss", "score_val_loss",
           "final_val_loss")
MODES = ("each", "grid")
_EXACT_LINE = re.compile(r"final_int8_zlib_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)")


class AblationError(ValueError):
    """A bad toggle, seed list or config, found before anything is trained."""


@dataclass(frozen=True)
class Toggle:
    key: str  # section.field
    values: tuple[str, ...]  # values[0] is the control's


@dataclass(frozen=True)
class Variant:
    name: str  # "control" or "a.b=x c.d=y"
    overrides: tuple[str, ...]  # the --set items that make it (control: every toggle at its first value)
    changed: tuple[str, ...]  # the items that differ from the control


@dataclass(frozen=True)
class RunOutcome:
    """One trained run; `metrics` is the final event (or what the log line gave)."""

    ok: bool
    metrics: dict = field(default_factory=dict)
    error: str = ""
    reused: bool = False


# A train function: (config path, --set items, run dir) -> outcome. Injected in tests.
TrainFn = Callable[[str, Sequence[str], Path], RunOutcome]


def parse_toggle(text: str) -> Toggle:
    if "=" not in text:
        raise AblationError(f"--toggle {text!r}: expected section.field=value1,value2[,...]")
    key, raw = text.split("=", 1)
    key = key.strip()
    # '' (or "") stands for the empty string, e.g. model.smear='',v1 (off, then on)
    values = tuple("" if v.strip() in ("''", '""') else v.strip() for v in raw.split(","))
    if "." not in key:
        raise AblationError(f"--toggle {text!r}: expected section.field=... (e.g. model.num_layers=2,3)")
    if len(values) < 2 or any(not v and v0.strip() not in ("''", '""') for v, v0 in zip(values, raw.split(","))):
        raise AblationError(f"--toggle {text!r}: give at least two non-empty comma-separated values ('' for the empty string)")
    if len(set(values)) != len(values):
        raise AblationError(f"--toggle {text!r}: repeated value")
    return Toggle(key, values)


def parse_seeds(text: str) -> tuple[int, ...]:
    """"3" means seeds 1, 2, 3; "1,7,42" is an explicit list; "2," is the list of seed 2 alone."""
    try:
        if "," in text:
            parts = text.split(",")
            if parts[-1].strip() == "" and len(parts) > 1:
                parts = parts[:-1]  # "2,": a one-seed list
            seeds = tuple(int(s) for s in parts)
        else:
            n = int(text)
            if n <= 0:
                raise AblationError(f"--seeds {text!r}: need at least one seed")
            seeds = tuple(range(1, n + 1))
    except ValueError:
        raise AblationError(f"--seeds {text!r}: expected a count (3) or a list (1,2,3)") from None
    if len(set(seeds)) != len(seeds):
        raise AblationError(f"--seeds {text!r}: repeated seed")
    return seeds


def make_variants(toggles: Sequence[Toggle], mode: str = "each") -> list[Variant]:
    """The control first, then the variants (see the module docstring for the modes)."""
    if not toggles:
        raise AblationError("give at least one --toggle")
    keys = [t.key for t in toggles]
    if len(set(keys)) != len(keys):
        raise AblationError(f"a config key is toggled twice: {keys}")
    if mode not in MODES:
        raise AblationError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    control_items = tuple(f"{t.key}={t.values[0]}" for t in toggles)

    def variant(choice: Sequence[str]) -> Variant:
        items = tuple(f"{t.key}={v}" for t, v in zip(toggles, choice))
        changed = tuple(i for i, c in zip(items, control_items) if i != c)
        return Variant(" ".join(changed) if changed else "control", items, changed)

    control = tuple(t.values[0] for t in toggles)
    if mode == "grid":
        choices = list(itertools.product(*(t.values for t in toggles)))
    else:
        choices = [control]
        for i, t in enumerate(toggles):
            for v in t.values[1:]:
                choices.append(control[:i] + (v,) + control[i + 1:])
    return [variant(c) for c in choices]


def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.=-]+", "_", text.replace(" ", "__"))
    return s[:120] or "run"


def check_variants(config: str, base_overrides: Sequence[str], variants: Sequence[Variant], seeds) -> None:
    """Resolve every variant's config now, so a typo fails before hours of training."""
    for v in variants:
        for s in seeds[:1]:
            try:
                resolve(config, [*base_overrides, *v.overrides, f"train.seed={s}"])
            except ConfigError as e:
                raise AblationError(f"variant {v.name!r}: {e}") from e


# ---------------------------------------------------------------- training through scripts/train.py


def read_final(run_dir: Path) -> dict | None:
    """The last "final" event of a run's metrics.jsonl, or None."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    final = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("event") == "final":
            final = record
    return final


def parse_exact_line(text: str) -> dict | None:
    """{'roundtrip_val_loss', 'roundtrip_val_bpb'} from the last `final_int8_zlib_roundtrip_exact` line."""
    matches = _EXACT_LINE.findall(text)
    if not matches:
        return None
    loss, bpb = matches[-1]
    return {"roundtrip_val_loss": float(loss), "roundtrip_val_bpb": float(bpb)}


def subprocess_train(config: str, overrides: Sequence[str], run_dir: Path, *, extra_args: Sequence[str] = (),
                     python: str = sys.executable, echo: bool = True) -> RunOutcome:
    """Train one run with scripts/train.py; its output goes to run_dir/stdout.log."""
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [python, str(TRAIN_SCRIPT), "--config", str(config), *extra_args]
    for item in [*overrides, f"train.out_dir={run_dir.parent}", f"train.run_id={run_dir.name}"]:
        cmd += ["--set", item]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if echo:
        print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "stdout.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    final = read_final(run_dir)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
        return RunOutcome(False, final or {}, f"exit {proc.returncode}: {tail}")
    if final is None:
        final = parse_exact_line(proc.stdout)
    if final is None:
        return RunOutcome(False, {}, "no final event in metrics.jsonl and no final_int8_zlib_roundtrip_exact line")
    return RunOutcome(True, final)


# ---------------------------------------------------------------- the ablation


@dataclass
class VariantResult:
    variant: Variant
    seeds: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    artifact_bytes: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    comparison: stats.Comparison | None = None


@dataclass
class Ablation:
    config: str
    metric: str
    seeds: tuple[int, ...]
    base_overrides: tuple[str, ...]
    results: list[VariantResult]
    seconds: float

    def as_dict(self) -> dict:
        return {
            "config": self.config,
            "metric": self.metric,
            "seeds": list(self.seeds),
            "base_overrides": list(self.base_overrides),
            "seconds": self.seconds,
            "variants": [
                {
                    "name": r.variant.name,
                    "overrides": list(r.variant.overrides),
                    "seeds": r.seeds,
                    "values": r.values,
                    "artifact_bytes": r.artifact_bytes,
                    "steps": r.steps,
                    "failures": r.failures,
                    "comparison": r.comparison.as_dict() if r.comparison else None,
                }
                for r in self.results
            ],
        }


def run_ablation(
    config: str,
    toggles: Sequence[Toggle],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    base_overrides: Sequence[str] = (),
    mode: str = "each",
    metric: str = "roundtrip_val_bpb",
    train_fn: TrainFn | None = None,
    rerun: bool = False,
    log: Callable[[str], None] = print,
    n_boot: int = 10_000,
) -> Ablation:
    """Train every (variant, seed) once (reusing finished runs unless `rerun`) and compare to the control."""
    if metric not in METRICS:
        raise AblationError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    seeds = tuple(seeds)
    if not seeds:
        raise AblationError("no seeds")
    variants = make_variants(toggles, mode)
    check_variants(config, base_overrides, variants, seeds)
    train_fn = train_fn or subprocess_train
    out = Path(out_dir)
    t0 = time.perf_counter()
    results = []
    total = len(variants) * len(seeds)
    done = 0
    for v in variants:
        res = VariantResult(v)
        for s in seeds:
            done += 1
            run_dir = out / slug(v.name) / f"seed{s}"
            final = None if rerun else read_final(run_dir)
            if final is not None:
                outcome = RunOutcome(True, final, reused=True)
            else:
                log(f"[{done}/{total}] training {v.name} seed {s} -> {run_dir}")
                outcome = train_fn(config, [*base_overrides, *v.overrides, f"train.seed={s}"], run_dir)
            value = outcome.metrics.get(metric) if outcome.ok else None
            if value is None or not math.isfinite(float(value)):
                why = outcome.error or f"metric {metric} missing or not finite: {value!r}"
                res.failures.append(f"seed {s}: {why}")
                log(f"[{done}/{total}] {v.name} seed {s} FAILED: {why}")
                continue
            res.seeds.append(s)
            res.values.append(float(value))
            if "artifact_bytes" in outcome.metrics:
                res.artifact_bytes.append(float(outcome.metrics["artifact_bytes"]))
            if "steps" in outcome.metrics:
                res.steps.append(float(outcome.metrics["steps"]))
            log(f"[{done}/{total}] {v.name} seed {s}: {metric}={float(value):.6f}" + (" (reused)" if outcome.reused else ""))
        results.append(res)
    control = results[0]
    for r in results[1:]:
        if control.values and r.values:
            r.comparison = stats.compare(control.values, r.values, n_boot=n_boot)
    return Ablation(config, metric, seeds, tuple(base_overrides), results, time.perf_counter() - t0)


# ---------------------------------------------------------------- the report


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(ab: Ablation) -> str:
    lower_better = "bpb" in ab.metric or "loss" in ab.metric
    lines = [
        f"Ablation of `{ab.config}` on `{ab.metric}`"
        + (" (lower is better)" if lower_better else "")
        + f", seeds {', '.join(map(str, ab.seeds))}"
        + (f", fixed: `{' '.join(ab.base_overrides)}`" if ab.base_overrides else "")
        + ".",
        "",
        "| variant | n | mean | std | delta vs control | 95% CI of delta | p (permutation) | p (Welch t) "
        "| per seed | artifact bytes | steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ab.results:
        c = r.comparison
        n = len(r.values)
        mean = stats.mean(r.values) if n else None
        sd = stats.std(r.values) if n else None
        if r is ab.results[0]:
            delta = ci = p_perm = p_welch = "(control)"
        elif c is None:
            delta = ci = p_perm = p_welch = "—"
        else:
            delta = f"{c.delta:+.4f} ({100 * c.rel_delta:+.2f}%)"
            ci = f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}]"
            floor = " (floor)" if c.permutation_exact and c.p_permutation <= c.p_permutation_floor + 1e-12 else ""
            p_perm = f"{c.p_permutation:.3g}{floor}"
            p_welch = _fmt(c.p_welch, ".3g")
        per_seed = ", ".join(f"{s}: {v:.4f}" for s, v in zip(r.seeds, r.values)) or "—"
        if r.failures:
            per_seed += f"; {len(r.failures)} failed"
        art = _fmt(stats.mean(r.artifact_bytes), ",.0f") if r.artifact_bytes else "—"
        steps = _fmt(stats.mean(r.steps), ".0f") if r.steps else "—"
        name = f"`{r.variant.name}`" if r.variant.changed else f"control (`{' '.join(r.variant.overrides)}`)"
        lines.append(f"| {name} | {n} | {_fmt(mean)} | {_fmt(sd)} | {delta} | {ci} | {p_perm} | {p_welch} "
                     f"| {per_seed} | {art} | {steps} |")
    lines += [
        "",
        "delta = variant mean - control mean. The CI is a percentile bootstrap (10,000 resamples, groups "
        "resampled independently); p (permutation) is two-sided and exact when the relabelings are few — with "
        "n seeds per arm it cannot go below 2 / C(2n, n) (0.1 for 3 seeds), marked (floor); p (Welch t) assumes "
        "normal seed noise and is the one that can reach the challenge's p < 0.01 with 3 seeds.",
    ]
    failures = [(r.variant.name, f) for r in ab.results for f in r.failures]
    if failures:
        lines += ["", "Failed runs:"] + [f"- `{name}` {f}" for name, f in failures]
    return "\n".join(lines) + "\n"
