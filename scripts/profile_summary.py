"""Summarise a jax.profiler trace: step times and the XLA ops that take the time.

    python scripts/profile_summary.py RUN_DIR/profile [--top 15]
    python scripts/profile_summary.py --config configs/baseline.py --set train.train_batch_tokens=8192 \
        --steps 2 --out /tmp/baseline_profile

The first form reads the newest `*.trace.json.gz` under the directory (the
Chrome trace JSON jax.profiler writes beside the `.xplane.pb`). The second
profiles the jitted train step itself on synthetic tokens (as scripts/bench.py
times it: compile, one warm-up step, then `--steps` traced steps wrapped by
golfjax.profiling.ProfileWindow), saves the compiled HLO beside the trace and
summarises it; no data files are needed.

Reported: the traced steps ("train" step annotations) and their wall time;
every XLA op execution (trace events carrying an `hlo_op`) summed by op name
over the traced steps, with its share of all op time and, when the HLO text is
available (`hlo.txt` in the trace directory), what the op computes (the
opcodes inside a fusion, e.g. `dot` for a matmul). Op times on different
threads overlap, so op time can exceed wall time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import add_config_args, run_main, setup_devices

# Opcodes worth naming when they appear inside a fusion (the rest are elementwise glue).
NOTABLE = ("dot", "convolution", "reduce", "exponential", "tanh", "rsqrt", "sort", "scatter", "gather",
           "dynamic-slice", "dynamic-update-slice", "transpose", "all-reduce", "custom-call", "while",
           "select", "divide", "log", "power", "sqrt", "iota", "concatenate", "pad")


def newest_trace(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ValueError(f"no *.trace.json.gz under {path} (a jax.profiler trace directory, e.g. RUN_DIR/profile)")
    return found[-1]


def load_events(trace: Path) -> list[dict]:
    with gzip.open(trace, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def hlo_index(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """Instruction name -> (what it computes, the JAX op_name of its metadata, output shape).

    What: the opcode; for a fusion its kind and the notable opcodes inside it
    (e.g. `fusion[Custom]: dot` is a matmul). op_name is JAX's name stack, e.g.
    `jit(f)/while/body/closed_call/transpose(jvp())/closed_call/Block/mlp/fc/dot_general`.
    """
    computations: dict[str, list[tuple[str, str, bool]]] = {}  # name -> [(opcode, op_name, is_root)]
    current = None
    instr: dict[str, tuple[str, str]] = {}  # name -> (opcode, line)
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m and "=" not in line.split("{")[0]:
            current = m.group(1)
            computations[current] = []
            continue
        m = re.match(r"\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*\S.*?\s([\w\-]+)\(", line)
        if m:
            name, opcode = m.group(2), m.group(3)
            instr[name] = (opcode, line)
            if current is not None:
                computations[current].append((opcode, _op_name(line), bool(m.group(1))))
    out = {}
    for name, (opcode, line) in instr.items():
        desc, op_name = opcode, _op_name(line)
        if opcode == "fusion":
            kind = re.search(r"kind=k(\w+)", line)
            called = re.search(r"calls=%?([\w.\-]+)", line)
            inner = computations.get(called.group(1), []) if called else []
            notable = sorted({o for o, _, _ in inner if o in NOTABLE}, key=NOTABLE.index)
            desc = f"fusion[{kind.group(1) if kind else '?'}]" + (f": {', '.join(notable)}" if notable else "")
            if not op_name:  # fusions made by XLA passes may drop metadata: take the fused ops'
                named = ([n for o, n, _ in inner if o in ("dot", "convolution") and n]
                         or [n for _, n, root in inner if root and n] or [n for _, n, _ in inner if n])
                op_name = named[0] if named else ""
        elif opcode == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', line)
            desc = f"custom-call {target.group(1)}" if target else desc
        shape = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\S+?)(?:\{[\d,]*\})?\s", line)
        out[name] = (desc, op_name, shape.group(1) if shape else "")
    return out


def _op_name(line: str) -> str:
    m = re.search(r'op_name="([^"]*)"', line)
    return m.group(1) if m else ""


def source_op(op_name: str, hlo_name: str) -> tuple[str, str]:
    """(phase, op path) of an XLA op: phase is forward / backward (inside the gradient's
    jvp / transpose) or optimizer+other; the path is the flax module path and primitive,
    e.g. ('backward', 'Block/mlp/fc/dot_general'). Without metadata: the op name sans number."""
    if not op_name:
        return "no name stack", re.sub(r"\.\d+$", "", hlo_name)
    phase = "backward" if "transpose(jvp" in op_name else "forward" if "jvp(" in op_name else "optimizer+other"
    parts = [p for p in op_name.split("/") if p and not re.fullmatch(
        r"jit\(.*\)|while|body|cond|closed_call|jvp\(.*\)|transpose\(jvp\(.*\)\)|checkpoint|remat", p)]
    return phase, "/".join(parts) or op_name


def summarize(trace_dir: Path, top: int = 15, hlo_text: str | None = None) -> dict:
    trace = newest_trace(trace_dir)
    events = [e for e in load_events(trace) if e.get("ph") == "X"]
    steps = sorted((e for e in events if e.get("name") == "train" and "step_num" in e.get("args", {})),
                   key=lambda e: e["ts"])
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in steps]

    def in_steps(e) -> bool:
        return not windows or any(a <= e["ts"] < b for a, b in windows)

    ops = [e for e in events if "hlo_op" in e.get("args", {}) and in_steps(e)]
    if hlo_text is None:  # hlo.txt beside the trace or a few levels up (this script's profile mode)
        for d in list(trace.parents)[:6]:
            if (d / "hlo.txt").is_file():
                hlo_text = (d / "hlo.txt").read_text()
                break
    index = hlo_index(hlo_text) if hlo_text else {}
    n_steps = max(len(steps), 1)
    total_us = sum(e["dur"] for e in ops)
    groups: dict[tuple[str, str], list] = defaultdict(lambda: [0.0, 0, defaultdict(float)])
    kinds: dict[str, float] = defaultdict(float)
    phases: dict[str, float] = defaultdict(float)
    for e in ops:
        name = e["args"]["hlo_op"]
        desc, op_name, shape = index.get(name, ("", "", ""))
        phase, path = source_op(op_name, name)
        if not op_name and desc:  # XLA passes dropped the name stack: group by what the op computes
            path = f"{path} ({desc})"
        g = groups[(phase, path)]
        g[0] += e["dur"]
        g[1] += 1
        g[2][shape] += e["dur"]
        kinds[_kind(desc, name)] += e["dur"]
        phases[phase] += e["dur"]
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    top_rows = [{"phase": ph, "op": path, "shapes": [k for k, _ in sorted(g[2].items(), key=lambda kv: -kv[1]) if k][:2],
                 "ms_per_step": g[0] / 1000 / n_steps, "share": g[0] / total_us if total_us else 0.0,
                 "calls_per_step": g[1] / n_steps} for (ph, path), g in rows]
    # Wall time in which at least one op runs (union of op intervals), per step.
    busy, end = 0.0, -1.0
    for a, b in sorted((e["ts"], e["ts"] + e["dur"]) for e in ops):
        if b > end:
            busy += b - max(a, end)
            end = b

    def shares(d):
        return sorted(((k, v / total_us if total_us else 0.0) for k, v in d.items()), key=lambda kv: -kv[1])

    return {
        "trace": str(trace),
        "hlo_metadata": bool(index),
        "steps": [int(e["args"]["step_num"]) for e in steps],
        "step_ms": [e["dur"] / 1000 for e in steps],
        "op_ms_per_step": total_us / 1000 / n_steps,
        "busy_ms_per_step": busy / 1000 / n_steps,
        "op_executions_per_step": len(ops) / n_steps,
        "distinct_ops": len({e["args"]["hlo_op"] for e in ops}),
        "top": top_rows,
        "by_phase": shares(phases),
        "by_kind": shares(kinds),
    }


def _kind(desc: str, name: str) -> str:
    """A coarse class for the time split: matmul, softmax exp, reductions, copies, loops, other."""
    if "dot" in desc or "convolution" in desc or name.startswith(("dot", "convolution")):
        return "matmul (dot) ops"
    if "exponential" in desc:
        return "exp (softmax) fusions"
    if "reduce" in desc:
        return "reductions"
    if desc.startswith(("copy", "transpose")) or "transpose" in desc or name.startswith(("copy", "transpose")):
        return "copies/transposes"
    if desc.startswith(("while", "conditional", "call")) or name.startswith(("while", "conditional", "call")):
        return "control flow (while/call)"
    return "elementwise/other" if desc else "not in hlo.txt"


def print_summary(s: dict) -> None:
    print(f"trace: {s['trace']}")
    if s["step_ms"]:
        print(f"traced steps: {s['steps']}  wall ms: " + ", ".join(f"{t:.1f}" for t in s["step_ms"]))
    else:
        print("no 'train' step annotations: all op events counted")
    print(f"per step: op time {s['op_ms_per_step']:.1f} ms (summed over threads), at least one op running "
          f"{s['busy_ms_per_step']:.1f} ms, {s['op_executions_per_step']:.0f} op executions, "
          f"{s['distinct_ops']} distinct ops")
    print(f"\ntop {len(s['top'])} source ops by time (XLA ops grouped by their JAX name stack"
          f"{'' if s['hlo_metadata'] else '; no hlo.txt found, so by XLA op name'}):")
    print(f"{'ms/step':>9} {'share':>6} {'calls':>6}  {'phase':<15} op  [largest output shapes]")
    for r in s["top"]:
        shapes = f"  [{', '.join(r['shapes'])}{', ...' if len(r['shapes']) > 1 else ''}]" if r["shapes"] else ""
        print(f"{r['ms_per_step']:9.1f} {100 * r['share']:5.1f}% {r['calls_per_step']:6.0f}  {r['phase']:<15} "
              f"{r['op']}{shapes}")
    for title, key in (("phase", "by_phase"), ("kind", "by_kind")):
        print(f"\ntime split by {title}:")
        for k, share in s[key]:
            print(f"  {100 * share:5.1f}%  {k}")


def profile_train_step(args) -> Path:
    """Profile `args.steps` train steps of `args.config` on synthetic tokens into args.out."""
    import jax
    import jax.numpy as jnp

    from golfjax.config import resolve
    from golfjax.model import gpt
    from golfjax.parallel import make_mesh, num_ranks
    from golfjax.profiling import ProfileWindow
    from golfjax.train.synthetic import batch_shape, synthetic_step

    cfg, _ = resolve(args.config, args.overrides)
    mesh = make_mesh()
    ranks = num_ranks(mesh)
    shape = batch_shape(cfg, ranks)
    step = synthetic_step(cfg, mesh)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hlo.txt").write_text(step.compiled.as_text())
    step.run()  # warm-up, untraced
    t0 = time.perf_counter()
    step.run()  # one untraced step, for the tracing overhead
    untraced_ms = 1000 * (time.perf_counter() - t0)
    window = ProfileWindow(out, f"2:{2 + args.steps}")
    for n in range(2, 2 + args.steps):
        window.before_step(n)
        metrics = step.run()
        window.after_step(n, (step.state, metrics))
    window.close()
    print(f"config: {args.config} {' '.join(args.overrides)}; batch (accum, seqs, seq_len) = {shape}; "
          f"devices {ranks} ({jax.default_backend()}); compute dtype "
          f"{jnp.dtype(gpt.resolve_compute_dtype(cfg.model.compute_dtype)).name}")
    print(f"untraced step: {untraced_ms:.1f} ms (compare with the traced steps' wall time below)")
    print(f"machine: {_cpu_name()} ({platform.machine()}), {os.cpu_count()} cpus, jax {jax.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} at the end; {time.strftime('%Y-%m-%d')}")
    return out / "profile"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace_dir", nargs="?", type=Path, help="trace directory (e.g. RUN_DIR/profile) or file")
    parser.add_argument("--top", type=int, default=15, help="ops to list (default 15)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object instead")
    add_config_args(parser)
    parser.add_argument("--steps", type=int, default=2, help="with --config: steps to trace (default 2)")
    parser.add_argument("--out", help="with --config: directory for hlo.txt and profile/")
    args = parser.parse_args()
    if (args.trace_dir is None) == (args.config is None):
        parser.error("give either TRACE_DIR or --config C --out DIR")
    if args.config:
        if not args.out:
            parser.error("--config needs --out DIR")
        setup_devices(args.cpu_devices)
        trace_dir = profile_train_step(args)
    else:
        trace_dir = args.trace_dir
        if not trace_dir.exists():
            raise ValueError(f"{trace_dir} does not exist")
    s = summarize(trace_dir, args.top)
    print(json.dumps(s) if args.json else "", end="\n" if args.json else "")
    if not args.json:
        print_summary(s)
    return 0


if __name__ == "__main__":
    run_main(main)
