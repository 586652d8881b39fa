"""Time the PyTorch reference's own train step on CPU (a benchmark, not a test).

    /tmp/torchvenv/bin/python scripts/bench_reference.py --reference /tmp/ref/train_gpt.py --dtype fp32 --no-compile

Run it with a Python that has torch (and sentencepiece, which the reference
imports); golfjax itself is not needed there. --reference is your own copy of
`train_gpt.py` from openai/parameter-golf: it is imported as a module (its
main() is never run) and its own GPT, Muon, Adam groups and Hyperparameters
defaults are used. Only the glue of its main() is redone here, without data
loading, distributed or CUDA calls: the model casts, the torch.compile calls,
the optimizer split, and the training loop's step (zero grads, micro-batches
of forward under autocast and `(loss * grad_scale).backward()`, Muon momentum
warm-up, the learning rates, gradient clipping if set, every optimizer's step).

The shape is the reference's defaults (9 x 512, 8 heads, 4 KV heads, MLP 2x,
vocab 1024, seq 1024) with 8,192 tokens per step: one process, so
grad_accum_steps = 8 // world_size = 8 micro-batches of one sequence. The
reference reads its settings from the environment when it is imported
(NUM_LAYERS=2 MODEL_DIM=128 ... before the command changes the shape);
--train-batch-tokens replaces its TRAIN_BATCH_TOKENS.

--dtype bf16 is the reference as it trains: the model cast as in its main()
(`.bfloat16()`, CastedLinear weights back to float32, low-dim and control
params float32: the token embedding stays bf16) and forward + loss under
`torch.autocast("cpu", dtype=torch.bfloat16)` (its `device_type="cuda"` on
CPU). --dtype fp32 keeps every parameter float32 and runs without autocast;
Newton-Schulz is bf16 in both, as the reference's code has it.
--compile (the default, what the reference does) wraps the model in
`torch.compile(dynamic=False, fullgraph=True)` and `zeropower_via_newtonschulz5`
in `torch.compile`; --no-compile runs both eagerly.

Tokens are uniform random. The learning-rate multiplier is 1 (the reference's
wall-clock warmdown only changes the value of the learning rate, not the work).
After --warmup untimed steps (the first includes compilation, reported as
compile_s), --steps steps are timed, each step's time on stderr; the last line
is one JSON object with the keys of scripts/bench.py where they overlap
(tokens_per_s, step_ms median, step_ms_min, peak_rss_mb, tokens_per_step,
steps, compile_s, machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import run_main  # noqa: E402  (light: no jax import)

DTYPES = ("fp32", "bf16")
MODULE_NAME = "golfjax_bench_reference_train_gpt"


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        raise RuntimeError(f"torch is not importable in this Python ({sys.executable}): {exc}; "
                           "run this script with a Python that has torch") from None
    return torch


def load_reference(path: str | os.PathLike):
    """The user's train_gpt.py imported as a module (its top level runs, its main() does not)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference file not found: {path}")
    _import_torch()
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise RuntimeError(f"importing the reference {path} failed: {exc} (install what it imports "
                           f"in this Python, e.g. pip install sentencepiece)") from None
    for name in ("Hyperparameters", "GPT", "Muon", "CastedLinear", "restore_low_dim_params_to_fp32",
                 "zeropower_via_newtonschulz5", "CONTROL_TENSOR_NAME_PATTERNS"):
        if not hasattr(module, name):
            raise ValueError(f"{path} does not define {name}: not the reference train_gpt.py?")
    module.__dict__["_golfjax_source_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return module


def hyperparameters(ref, overrides: dict[str, Any] | None = None):
    """The reference's Hyperparameters (its defaults, or the environment at import), with `overrides`."""
    hp = ref.Hyperparameters()
    for key, value in (overrides or {}).items():
        if not hasattr(hp, key):
            raise ValueError(f"the reference's Hyperparameters has no {key!r}")
        setattr(hp, key, value)
    return hp


@dataclasses.dataclass
class Harness:
    ref: Any
    hp: Any
    dtype: str
    compiled: bool
    base_model: Any
    model: Any
    optimizers: list
    optimizer_muon: Any
    grad_accum_steps: int
    grad_scale: float

    @property
    def tokens_per_step(self) -> int:
        return (self.hp.train_batch_tokens // self.grad_accum_steps) * self.grad_accum_steps


def build(ref, hp, dtype: str = "fp32", compile: bool = True) -> Harness:
    """Model and optimizers as the reference's main() makes them, on CPU."""
    torch = _import_torch()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    grad_accum_steps = 8  # the reference's 8 // world_size, in one process
    local_tokens = hp.train_batch_tokens // grad_accum_steps
    if local_tokens <= 0 or local_tokens % hp.train_seq_len:
        raise ValueError(f"train_batch_tokens={hp.train_batch_tokens} / {grad_accum_steps} micro-batches "
                         f"is not a positive multiple of train_seq_len={hp.train_seq_len}")

    # main() rebinds the module-level name, which Muon.step looks up; keep the eager
    # original so that building again in one process does not compile twice.
    eager_ns = ref.__dict__.setdefault("_golfjax_eager_ns", ref.zeropower_via_newtonschulz5)
    ref.zeropower_via_newtonschulz5 = torch.compile(eager_ns) if compile else eager_ns

    torch.manual_seed(hp.seed)
    base_model = ref.GPT(
        vocab_size=hp.vocab_size, num_layers=hp.num_layers, model_dim=hp.model_dim,
        num_heads=hp.num_heads, num_kv_heads=hp.num_kv_heads, mlp_mult=hp.mlp_mult,
        tie_embeddings=hp.tie_embeddings, tied_embed_init_std=hp.tied_embed_init_std,
        logit_softcap=hp.logit_softcap, rope_base=hp.rope_base, qk_gain_init=hp.qk_gain_init,
    )
    if dtype == "bf16":  # main()'s casts
        base_model = base_model.bfloat16()
        for module in base_model.modules():
            if isinstance(module, ref.CastedLinear):
                module.float()
        ref.restore_low_dim_params_to_fp32(base_model)
    model = torch.compile(base_model, dynamic=False, fullgraph=True) if compile else base_model

    # The optimizer split of main().
    patterns = ref.CONTROL_TENSOR_NAME_PATTERNS
    block_named_params = list(base_model.blocks.named_parameters())
    matrix_params = [p for name, p in block_named_params
                     if p.ndim == 2 and not any(pat in name for pat in patterns)]
    scalar_params = [p for name, p in block_named_params
                     if p.ndim < 2 or any(pat in name for pat in patterns)]
    if base_model.skip_weights.numel() > 0:
        scalar_params.append(base_model.skip_weights)
    adam = dict(betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, fused=True)
    token_lr = hp.tied_embed_lr if hp.tie_embeddings else hp.embed_lr
    optimizer_tok = torch.optim.Adam([{"params": [base_model.tok_emb.weight], "lr": token_lr,
                                       "base_lr": token_lr}], **adam)
    optimizer_muon = ref.Muon(matrix_params, lr=hp.matrix_lr, momentum=hp.muon_momentum,
                              backend_steps=hp.muon_backend_steps)
    for group in optimizer_muon.param_groups:
        group["base_lr"] = hp.matrix_lr
    optimizer_scalar = torch.optim.Adam([{"params": scalar_params, "lr": hp.scalar_lr,
                                          "base_lr": hp.scalar_lr}], **adam)
    optimizers = [optimizer_tok, optimizer_muon, optimizer_scalar]
    if base_model.lm_head is not None:
        optimizers.insert(1, torch.optim.Adam([{"params": [base_model.lm_head.weight], "lr": hp.head_lr,
                                                "base_lr": hp.head_lr}], **adam))
    base_model.train()
    return Harness(ref, hp, dtype, compile, base_model, model, optimizers, optimizer_muon,
                   grad_accum_steps, 1.0 / grad_accum_steps)


def random_batches(h: Harness, seed: int = 0) -> list:
    """One step's micro-batches of uniform random tokens, shaped as the reference's loader shapes them."""
    torch = _import_torch()
    gen = torch.Generator().manual_seed(seed)
    local_tokens = h.hp.train_batch_tokens // h.grad_accum_steps
    batches = []
    for _ in range(h.grad_accum_steps):
        local = torch.randint(0, h.hp.vocab_size, (local_tokens + 1,), generator=gen, dtype=torch.int64)
        batches.append((local[:-1].reshape(-1, h.hp.train_seq_len), local[1:].reshape(-1, h.hp.train_seq_len)))
    return batches


def train_step(h: Harness, batches: list, step: int, lr_scale: float = 1.0) -> float:
    """One step of the reference's training loop; returns its train_loss (mean over micro-batches)."""
    torch = _import_torch()
    hp = h.hp

    def zero_grad_all() -> None:
        for opt in h.optimizers:
            opt.zero_grad(set_to_none=True)

    zero_grad_all()
    train_loss = torch.zeros(())
    for x, y in batches:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=h.dtype == "bf16"):
            loss = h.model(x, y)
        train_loss += loss.detach()
        (loss * h.grad_scale).backward()
    train_loss /= h.grad_accum_steps

    warmup = hp.muon_momentum_warmup_steps
    frac = min(step / warmup, 1.0) if warmup > 0 else 1.0
    for group in h.optimizer_muon.param_groups:
        group["momentum"] = (1 - frac) * hp.muon_momentum_warmup_start + frac * hp.muon_momentum
    for opt in h.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
    if hp.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(h.base_model.parameters(), hp.grad_clip_norm)
    for opt in h.optimizers:
        opt.step()
    zero_grad_all()
    return float(train_loss.item())


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}".strip()


def cpu() -> str:
    """The CPU's model name and its bf16 matmul flags, from /proc/cpuinfo (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    bf16 = [f for f in ("avx512_bf16", "amx_bf16", "avx512_fp16") if f in flags]
    return " ".join([name or "unknown", *bf16])


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def bench(reference: str | os.PathLike, dtype: str = "fp32", compile: bool = True, steps: int = 5,
          warmup: int = 2, threads: int = 2, train_batch_tokens: int | None = 8192,
          overrides: dict[str, Any] | None = None) -> dict:
    """Load, build, warm up, time; the JSON-ready result."""
    if steps < 1 or warmup < 1:
        raise ValueError(f"--steps and --warmup must be at least 1 (got {steps}, {warmup}): "
                         "the first step compiles")
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    ref = load_reference(reference)
    torch = _import_torch()
    torch.set_num_threads(threads)
    overrides = dict(overrides or {})
    if train_batch_tokens is not None:
        overrides["train_batch_tokens"] = train_batch_tokens
    hp = hyperparameters(ref, overrides)
    h = build(ref, hp, dtype=dtype, compile=compile)
    data = [random_batches(h, seed=i) for i in range(warmup + steps)]
    load_before = load_average()

    warmup_s = []
    losses = []
    for i in range(warmup):
        t0 = time.perf_counter()
        losses.append(train_step(h, data[i], step=i))
        warmup_s.append(time.perf_counter() - t0)
        _progress(f"warm-up step {i + 1}/{warmup}: {warmup_s[-1]:.1f} s, loss {losses[-1]:.4f}")
    times, cpu_times = [], []
    for i in range(warmup, warmup + steps):
        t0, c0 = time.perf_counter(), _cpu_s()
        losses.append(train_step(h, data[i], step=i))
        times.append(time.perf_counter() - t0)
        cpu_times.append(_cpu_s() - c0)
        _progress(f"step {i - warmup + 1}/{steps}: {times[-1]:.2f} s ({cpu_times[-1]:.2f} s CPU), "
                  f"loss {losses[-1]:.4f}")
    step_s = statistics.median(times)
    tokens = h.tokens_per_step
    return {
        "tokens_per_s": round(tokens / step_s, 1),
        "step_ms": round(1000 * step_s, 2),
        "step_ms_min": round(1000 * min(times), 2),
        "peak_rss_mb": peak_rss_mb(),
        "compile_s": round(warmup_s[0], 2),  # the first warm-up step: compilation + one step
        "warmup_ms": [round(1000 * s, 1) for s in warmup_s],
        "steps_ms": [round(1000 * s, 1) for s in times],
        # This process's user + system CPU time per step (median): on a busy machine the
        # wall time above is inflated by waiting; divided by the threads this bounds what
        # an idle machine would show (OpenMP spin-waiting counts as CPU time too).
        "step_cpu_ms": round(1000 * statistics.median(cpu_times), 2),
        "tokens_per_step": tokens,
        "steps": steps,
        "warmup_steps": warmup,
        "grad_accum_steps": h.grad_accum_steps,
        "loss_first": round(losses[0], 4),
        "loss": round(losses[-1], 4),
        "loss_finite": all(math.isfinite(v) for v in losses),
        "dtype": dtype,
        "compiled": compile,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": {k: getattr(hp, k) for k in ("num_layers", "model_dim", "num_heads", "num_kv_heads",
                                               "mlp_mult", "vocab_size", "train_seq_len")},
        "reference": str(reference),
        "reference_sha256": ref.__dict__["_golfjax_source_sha256"],
        "machine": machine(),
        "cpu": cpu(),
        "load_average": {"before": load_before, "after": load_average()},  # 1, 5, 15 min: a busy machine shows here
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, metavar="PATH",
                        help="your copy of the reference train_gpt.py (openai/parameter-golf)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32",
                        help="fp32: float32 params, no autocast; bf16: the reference's casts + bf16 autocast")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the model and Newton-Schulz as the reference does (default on)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--train-batch-tokens", type=int, default=8192,
                        help="tokens per step over the 8 micro-batches (replaces the reference's TRAIN_BATCH_TOKENS)")
    args = parser.parse_args()
    result = bench(args.reference, dtype=args.dtype, compile=args.compile, steps=args.steps,
                   warmup=args.warmup, threads=args.threads, train_batch_tokens=args.train_batch_tokens)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run_main(main)
