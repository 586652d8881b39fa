"""The planner: what a config costs before anything is trained.

For a config it reports, on a CPU and without allocating the training state:

- parameters by optimizer group (golfjax.optim.build.param_labels) of the
  abstract (jax.eval_shape) init;
- the estimated artifact bytes under the config's export scheme: the weights
  (a Gaussian-filled init, or a given checkpoint) are quantized by the
  scheme's quantizer and each stored array is costed at its order-0 byte
  entropy (what an ideal entropy coder needs for i.i.d. symbols), plus the
  container's header and the code bytes (counted by export.code_bytes_mode);
  `measure_codec` also writes the real artifact and reports its size;
- XLA's FLOP and byte counts of the full-size train step, lowered on abstract
  shapes (`jax.jit(step).trace(ShapeDtypeStruct...).lower()` and
  `Lowered.cost_analysis()`; no compile unless asked). XLA counts the body of
  a rolled loop (lax.scan) once, so the planner also counts the matmul FLOPs
  of the traced jaxpr with every scan body multiplied by its length and adds
  what XLA missed (see :func:`dot_flops`; scans that jax unrolls are seen whole);
- the projected step time on GPUs (default 8xH100 SXM) at a stated MFU, the
  steps that fit in 600 s and the tokens they see.

Peak numbers: NVIDIA H100 SXM5 datasheet (H100 Tensor Core GPU, "SXM" column):
989.4 TFLOP/s dense BF16/FP16 tensor core (1,979 with 2:4 sparsity, not used
here), 494.7 TFLOP/s dense TF32, 3.35 TB/s HBM3, 900 GB/s NVLink (total,
both directions). The default MFU (25%) is what the reference baseline
achieves by this FLOP count: docs/PLANNER.md.

The step is planned as it runs on the GPUs: compute_dtype "auto" becomes
bfloat16 and attention_impl "auto" becomes "xla" (cuDNN cannot be lowered on
a CPU; both do the same FLOPs up to the causal half that a fused kernel
skips). The global batch is lowered as one micro-batch: gradient accumulation
does not change a step's FLOPs.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from golfjax.config import Config

H100_SXM = {
    "name": "H100 SXM5",
    "bf16_dense_flops": 989.4e12,
    "tf32_dense_flops": 494.7e12,
    "hbm_bytes_per_s": 3.35e12,
    "nvlink_bytes_per_s_per_direction": 450e9,
    "source": "NVIDIA H100 Tensor Core GPU datasheet, SXM column (dense, without sparsity)",
}
DEFAULT_GPUS = 8
# The reference baseline's measured 43.54 ms/step on 8xH100 is 24.5% of the bf16
# dense peak by this planner's FLOP count (docs/PLANNER.md); rounded.
DEFAULT_MFU = 0.25
REFERENCE_BASELINE_STEP_MS = 43.54
CHALLENGE_SECONDS = 600.0


class PlanError(ValueError):
    """A plan that cannot be made (with the reason)."""


# ---------------------------------------------------------------- shapes and FLOPs


def planning_config(cfg: Config) -> Config:
    """The config as the GPUs run it: bf16 compute, XLA attention and matmuls where the config says "auto"."""
    m = cfg.model
    dtype = "bfloat16" if m.compute_dtype == "auto" else m.compute_dtype
    attn = "xla" if m.attention_impl in ("auto", "cudnn") else m.attention_impl
    matmul = "xla" if m.matmul_impl == "auto" else m.matmul_impl
    return replace(cfg, model=replace(m, compute_dtype=dtype, attention_impl=attn, matmul_impl=matmul))


def abstract_params(cfg: Config):
    import jax

    from golfjax.model import gpt

    return jax.eval_shape(lambda: gpt.init_params(cfg.model, jax.random.PRNGKey(0)))


def params_by_group(params, tie_embeddings: bool) -> dict[str, dict[str, int]]:
    """{group: {"params": n, "tensors": k}} by the optimizer's grouping rule."""
    import jax

    from golfjax.optim.build import param_labels

    labels = param_labels(params, tie_embeddings)
    groups: dict[str, dict[str, int]] = {}
    for label, leaf in zip(jax.tree.leaves(labels), jax.tree.leaves(params)):
        g = groups.setdefault(label, {"params": 0, "tensors": 0})
        g["params"] += int(np.prod(leaf.shape))
        g["tensors"] += 1
    return dict(sorted(groups.items()))


def _dot_general_flops(eqn) -> int:
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    prod = lambda shape, dims: int(np.prod([shape[d] for d in dims], dtype=np.int64)) if dims else 1
    lfree = [d for d in range(len(lhs.shape)) if d not in lc and d not in lb]
    rfree = [d for d in range(len(rhs.shape)) if d not in rc and d not in rb]
    return 2 * prod(lhs.shape, lb) * prod(lhs.shape, lc) * prod(lhs.shape, lfree) * prod(rhs.shape, rfree)


def dot_flops(jaxpr, multiply_loops: bool = True) -> int:
    """Matmul FLOPs (2 per multiply-add of every dot_general) of a (closed) jaxpr.

    With `multiply_loops` a scan body counts `length` times (what runs);
    without, once (what XLA's cost analysis sees). A cond counts its most
    expensive branch; a while loop (unknown trip count) its body once.
    """
    import jax.extend as jex

    inner = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in inner.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_general_flops(eqn)
            continue
        subs = list(jex.core.jaxprs_in_params(eqn.params))
        if not subs:
            continue
        costs = [dot_flops(s, multiply_loops) for s in subs]
        if name == "cond":
            total += max(costs)
        elif name == "scan":
            length = int(eqn.params["length"])
            total += (length if multiply_loops else _scan_copies_seen_by_xla(length, eqn.params.get("unroll", 1))) \
                * sum(costs)
        else:
            total += sum(costs)
    return total


def _scan_copies_seen_by_xla(length: int, unroll) -> int:
    """How many copies of a scan body the lowered program holds (XLA's cost analysis counts each once).

    jax lowers scan(unroll=u) to a while loop over a body of u copies plus
    `length % u` copies after it; unroll=True unrolls it completely.
    """
    if unroll is True or (isinstance(unroll, int) and unroll >= length):
        return length
    u = max(int(unroll), 1)
    return min(length, u + length % u)


def batch_shape(cfg: Config) -> tuple[int, int, int]:
    """(1, sequences, seq_len) of the global batch, planned as one micro-batch."""
    t = cfg.train
    if t.train_batch_tokens % t.train_seq_len:
        raise PlanError(f"train_batch_tokens={t.train_batch_tokens} is not a multiple of train_seq_len={t.train_seq_len}")
    return 1, t.train_batch_tokens // t.train_seq_len, t.train_seq_len


def trace_train_step(cfg: Config):
    """The jitted train step traced on abstract shapes: (traced, abstract params). Nothing is allocated."""
    import jax
    import jax.numpy as jnp

    from golfjax.optim.build import build_optimizer
    from golfjax.train.step import init_state, train_step

    params = abstract_params(cfg)
    tx = build_optimizer(params, cfg.optim, cfg.model.tie_embeddings)
    state = jax.eval_shape(lambda p: init_state(cfg, p, tx), params)
    batch = jax.ShapeDtypeStruct(batch_shape(cfg), jnp.int32)
    lr = jax.ShapeDtypeStruct((), jnp.float32)
    step = jax.jit(lambda s, x, y, lr_mul: train_step(s, x, y, lr_mul, cfg, tx))
    return step.trace(state, batch, batch, lr), params


def analytic_model_flops_per_token(cfg: Config) -> float:
    """6 x (matmul params per token, head included) + 6 x layers x seq_len x dim (causal attention).

    The same model-FLOPs convention as scripts/bench.py, over the virtual
    layers of the layer schedule.
    """
    from golfjax.model.gpt import layer_schedule, mlp_hidden

    m = cfg.model
    head_dim = m.model_dim // m.num_heads
    kv = m.num_kv_heads * head_dim
    per_layer = m.model_dim * (2 * m.model_dim + 2 * kv) + 2 * m.model_dim * mlp_hidden(m)
    layers = len(layer_schedule(m).layers)
    matmul_params = layers * per_layer + m.model_dim * m.vocab_size
    return 6.0 * matmul_params + 6.0 * layers * cfg.train.train_seq_len * m.model_dim


# ---------------------------------------------------------------- artifact bytes


def byte_entropy_bits(array: np.ndarray) -> float:
    """Order-0 entropy of an array's bytes, in bits for the whole array."""
    raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
    if raw.size == 0:
        return 0.0
    counts = np.bincount(raw, minlength=256).astype(np.float64)
    p = counts[counts > 0] / raw.size
    return float(-(p * np.log2(p)).sum() * raw.size)


def planning_weights(cfg: Config, seed: int = 0, weight_std: float = 1.0) -> dict[str, np.ndarray]:
    """A reference-named state that costs like a trained one: every float tensor i.i.d. N(0, weight_std^2).

    The init is no guide to the trained artifact: the reference zero-initialises
    its output projections (they would cost nothing), its other inits are
    smaller than what training leaves, and trained norms, gains and mixes are
    no longer constants. So every float tensor is drawn Gaussian (only its
    shape comes from the model, through jax.eval_shape; nothing is
    initialised). Per-row int8 scales each row by its clip / 127 but never
    below 1/127 (the reference's floor), so rows whose largest weight is under
    1 get fewer distinct codes and cost less: the default std 1 keeps every
    row above the floor, the upper end for Gaussian-shaped weights.
    docs/PLANNER.md checks this against trained artifacts; pass a checkpoint
    (--checkpoint) for its own number.
    """
    import jax

    from golfjax import interop

    if weight_std <= 0:
        raise PlanError(f"weight_std must be positive, got {weight_std}")
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(cfg))
    state = interop.to_reference_state(zeros)
    rng = np.random.default_rng(seed)
    for name, t in state.items():
        if np.issubdtype(t.dtype, np.floating):
            state[name] = (weight_std * rng.standard_normal(t.shape, dtype=np.float32)).astype(t.dtype)
    return state


def checkpoint_weights(cfg: Config, directory: str | Path) -> dict[str, np.ndarray]:
    """The reference-named state of a params checkpoint, which must be the config's model."""
    from golfjax import checkpoint, interop

    saved = checkpoint.load_config(directory)
    if saved.model != cfg.model:
        diff = {k: (getattr(saved.model, k), v) for k, v in asdict(cfg.model).items() if getattr(saved.model, k) != v}
        raise PlanError(f"checkpoint {directory} is another model than the config: (checkpoint, config) {diff}")
    return interop.to_reference_state(checkpoint.load_params(directory, saved))


def estimate_artifact(cfg: Config, state: dict[str, np.ndarray], measure_codec: bool = False) -> dict[str, Any]:
    """Entropy-estimated artifact bytes of `state` under cfg.export (and optionally the real size)."""
    from golfjax.config import to_dict
    from golfjax.export import artifact
    from golfjax.export.pipeline import SCHEMES

    scheme = cfg.export.scheme
    if scheme not in SCHEMES:
        raise PlanError(f"unknown export scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    recipe = SCHEMES[scheme]
    codec = cfg.export.codec or recipe.codec
    plan = recipe.plan(cfg)
    gptq_as_rtn = False
    if plan is None:
        state_q, _ = recipe.quantize(state)
    else:
        # No calibration data here: GPTQ rules are costed as round-to-nearest with the
        # same bits and clip (GPTQ moves codes, not the alphabet they come from).
        from golfjax.export.quant import quantize_state

        groups = ("attn", "mlp", "embed", "other")
        gptq_as_rtn = any(getattr(plan, g).gptq for g in groups)
        plan = replace(plan, **{g: replace(getattr(plan, g), gptq=False) for g in groups})
        state_q, _ = quantize_state(state, plan, None)
    payload_bits = 0.0
    raw_bytes = 0
    by_scheme: dict[str, int] = {}
    for qt in state_q.tensors.values():
        bits = sum(byte_entropy_bits(a) for a in qt.arrays.values())
        payload_bits += bits
        raw_bytes += sum(int(a.nbytes) for a in qt.arrays.values())
        by_scheme[qt.scheme] = by_scheme.get(qt.scheme, 0) + int(round(bits / 8))
    with tempfile.TemporaryDirectory() as tmp:
        # the container's prefix + JSON header, exactly (written uncompressed: cheap)
        info = artifact.write_artifact(Path(tmp) / "plan.golf", state_q, to_dict(cfg), codec="none", scheme=scheme)
        overhead = info.total_bytes - info.payload_bytes
        measured = None
        if measure_codec:
            measured = artifact.write_artifact(Path(tmp) / "plan.golf", state_q, to_dict(cfg), codec=codec,
                                               scheme=scheme).total_bytes
    files = artifact.code_files()
    code = artifact.code_bytes(files, cfg.export.code_bytes_mode)
    model = overhead + int(math.ceil(payload_bits / 8))
    return {
        "scheme": scheme,
        "codec": codec,
        "gptq_costed_as_round_to_nearest": gptq_as_rtn,
        "payload_raw_bytes": raw_bytes,
        "payload_entropy_bytes": int(math.ceil(payload_bits / 8)),
        "entropy_bytes_by_scheme": by_scheme,
        "container_overhead_bytes": overhead,
        "est_model_bytes": model,
        "code_bytes": code,
        "code_bytes_mode": cfg.export.code_bytes_mode,
        "est_artifact_bytes": model + code,
        "measured_model_bytes": measured,
        "measured_artifact_bytes": None if measured is None else measured + code,
        "limit_bytes": cfg.export.artifact_limit_bytes,
    }


# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    config: str
    params: int
    params_by_group: dict
    tokens_per_step: int
    compute_dtype: str
    attention_impl: str
    flops_per_step: float  # XLA's count, plus the matmul FLOPs of loop iterations it missed
    xla_flops: float  # Lowered/Compiled.cost_analysis()["flops"] as reported
    xla_bytes_accessed: float
    xla_cost_source: str
    dot_flops_per_step: int  # matmul FLOPs of the jaxpr, loops multiplied
    dot_flops_loops_once: int  # the same with each loop body once (XLA's view)
    model_flops_per_step: float  # 6N + attention convention (bench.py)
    artifact: dict
    weights: str
    gpus: int
    gpu: str
    peak_flops_per_gpu: float
    mfu: float
    projected_step_ms_8xh100: float
    projected_steps_600s: int
    projected_tokens_600s: int
    hbm_bound_step_ms: float
    allreduce_ms: float
    est_artifact_bytes: int
    fits_budget: bool
    seconds: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def as_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False)


def is_reference_baseline_shape(cfg: Config) -> bool:
    base = Config()
    return (replace(cfg.model, compute_dtype="auto", attention_impl="auto", matmul_impl="auto") == base.model
            and cfg.train.train_batch_tokens == base.train.train_batch_tokens
            and cfg.train.train_seq_len == base.train.train_seq_len)


def plan_config(
    cfg: Config,
    *,
    name: str = "",
    mfu: float = DEFAULT_MFU,
    gpus: int = DEFAULT_GPUS,
    checkpoint: str | Path | None = None,
    measure_codec: bool = False,
    compile: bool = False,
    seed: int = 0,
    weight_std: float = 1.0,
) -> Plan:
    import jax.numpy as jnp

    if not 0 < mfu <= 1:
        raise PlanError(f"mfu must be in (0, 1], got {mfu}")
    if gpus <= 0:
        raise PlanError(f"gpus must be positive, got {gpus}")
    seconds = {}
    notes = []
    pcfg = planning_config(cfg)
    t0 = time.perf_counter()
    traced, params = trace_train_step(pcfg)
    dots = dot_flops(traced.jaxpr, multiply_loops=True)
    dots_once = dot_flops(traced.jaxpr, multiply_loops=False)
    seconds["trace"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lowered = traced.lower()
    seconds["lower"] = time.perf_counter() - t0
    if compile:
        t0 = time.perf_counter()
        cost = lowered.compile().cost_analysis()
        seconds["compile"] = time.perf_counter() - t0
        source = "Compiled.cost_analysis() (XLA:CPU, after fusion)"
    else:
        cost = lowered.cost_analysis()
        source = "Lowered.cost_analysis() (HLO before optimisation: bytes are unfused, an upper bound)"
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per device program
        cost = cost[0]
    xla_flops = float(cost.get("flops", 0.0))
    xla_bytes = float(cost.get("bytes accessed", 0.0))
    flops = xla_flops + float(dots - dots_once)
    if dots > dots_once:
        notes.append(f"XLA counts a rolled loop body once; added {dots - dots_once:.3e} matmul FLOPs of the "
                     "iterations it did not see (elementwise work inside those loops is still counted once)")
    if flops <= 0:
        raise PlanError("XLA reported no FLOPs for the train step")

    t0 = time.perf_counter()
    if checkpoint:
        state, weights = checkpoint_weights(cfg, checkpoint), f"checkpoint {checkpoint}"
    else:
        state = planning_weights(cfg, seed, weight_std)
        weights = f"every float tensor i.i.d. N(0, {weight_std:g}^2) (seed {seed})"
    art = estimate_artifact(cfg, state, measure_codec)
    seconds["artifact"] = time.perf_counter() - t0

    sixteen_bit = jnp.dtype(pcfg.model.compute_dtype).itemsize == 2
    peak = H100_SXM["bf16_dense_flops"] if sixteen_bit else H100_SXM["tf32_dense_flops"]
    step_ms = 1000.0 * flops / (gpus * peak * mfu)
    steps = min(cfg.train.iterations, int(CHALLENGE_SECONDS * 1000.0 // step_ms))
    param_count = int(sum(g["params"] for g in params_by_group(params, cfg.model.tie_embeddings).values()))
    grad_bytes = 4 * param_count  # float32 gradients, ring all-reduce
    allreduce_ms = 0.0 if gpus == 1 else 1000.0 * 2 * (gpus - 1) / gpus * grad_bytes / H100_SXM[
        "nvlink_bytes_per_s_per_direction"]
    if is_reference_baseline_shape(cfg):
        implied = flops / (gpus * peak * REFERENCE_BASELINE_STEP_MS / 1000.0)
        notes.append(f"the reference baseline measured {REFERENCE_BASELINE_STEP_MS} ms/step on 8xH100: "
                     f"projection {step_ms:.2f} ms is {100 * (step_ms / REFERENCE_BASELINE_STEP_MS - 1):+.1f}%; "
                     f"the measurement is {100 * implied:.1f}% MFU by this FLOP count")
    tokens = cfg.train.train_batch_tokens
    return Plan(
        config=name,
        params=param_count,
        params_by_group=params_by_group(params, cfg.model.tie_embeddings),
        tokens_per_step=tokens,
        compute_dtype=pcfg.model.compute_dtype,
        attention_impl=pcfg.model.attention_impl,
        flops_per_step=flops,
        xla_flops=xla_flops,
        xla_bytes_accessed=xla_bytes,
        xla_cost_source=source,
        dot_flops_per_step=int(dots),
        dot_flops_loops_once=int(dots_once),
        model_flops_per_step=analytic_model_flops_per_token(cfg) * tokens,
        artifact=art,
        weights=weights,
        gpus=gpus,
        gpu=H100_SXM["name"],
        peak_flops_per_gpu=peak,
        mfu=mfu,
        projected_step_ms_8xh100=step_ms,
        projected_steps_600s=steps,
        projected_tokens_600s=steps * tokens,
        hbm_bound_step_ms=1000.0 * xla_bytes / (gpus * H100_SXM["hbm_bytes_per_s"]),
        allreduce_ms=allreduce_ms,
        est_artifact_bytes=int(art["est_artifact_bytes"]),
        fits_budget=art["est_artifact_bytes"] <= art["limit_bytes"],
        seconds={k: round(v, 2) for k, v in seconds.items()},
        notes=notes,
    )


def format_plan(p: Plan) -> str:
    a = p.artifact
    rows = [
        ("config", p.config or "(given)"),
        ("parameters", f"{p.params:,}"),
        *((f"  group {g}", f"{v['params']:,} in {v['tensors']} tensors") for g, v in p.params_by_group.items()),
        ("tokens per step", f"{p.tokens_per_step:,}"),
        ("planned as", f"compute {p.compute_dtype}, attention {p.attention_impl}, global batch as one micro-batch"),
        ("FLOPs per step", f"{p.flops_per_step:.4e}"),
        ("  XLA flops", f"{p.xla_flops:.4e}  [{p.xla_cost_source}]"),
        ("  XLA bytes accessed", f"{p.xla_bytes_accessed:.4e}"),
        ("  matmul FLOPs (jaxpr)", f"{p.dot_flops_per_step:.4e} (loop bodies once: {p.dot_flops_loops_once:.4e})"),
        ("  model FLOPs (6N+attn)", f"{p.model_flops_per_step:.4e} (XLA / model = "
                                    f"{p.flops_per_step / p.model_flops_per_step:.2f})"),
        ("artifact (estimated)", f"{p.est_artifact_bytes:,} bytes of {a['limit_bytes']:,} "
                                 f"({'fits' if p.fits_budget else 'OVER BUDGET'})"),
        ("  model", f"{a['est_model_bytes']:,} = {a['payload_entropy_bytes']:,} entropy-coded payload "
                    f"(raw {a['payload_raw_bytes']:,}) + {a['container_overhead_bytes']:,} header; "
                    f"scheme {a['scheme']}"),
        ("  by stored scheme", ", ".join(f"{k} {v:,}" for k, v in a["entropy_bytes_by_scheme"].items())),
        ("  code", f"{a['code_bytes']:,} bytes (code_bytes_mode={a['code_bytes_mode']})"),
        ("  weights costed", p.weights),
    ]
    if a["measured_model_bytes"] is not None:
        rows.append(("  measured with " + a["codec"], f"model {a['measured_model_bytes']:,}, "
                                                       f"artifact {a['measured_artifact_bytes']:,} bytes"))
    rows += [
        (f"projection ({p.gpus}x {p.gpu})", f"peak {p.peak_flops_per_gpu / 1e12:.1f} TFLOP/s per GPU "
                                             f"({H100_SXM['source']}), MFU {100 * p.mfu:.0f}%"),
        ("  step time", f"{p.projected_step_ms_8xh100:.2f} ms"),
        ("  steps in 600 s", f"{p.projected_steps_600s:,}"),
        ("  tokens in 600 s", f"{p.projected_tokens_600s:,}"),
        ("  HBM time of XLA bytes", f"{p.hbm_bound_step_ms:.2f} ms (bytes / 3.35 TB/s; unfused bytes overstate "
                                    "the traffic of fused GPU kernels, so read it as a ceiling, not a bound)"),
        ("  grad all-reduce", f"{p.allreduce_ms:.2f} ms (fp32 ring over NVLink; overlappable, not included)"),
        ("planner seconds", ", ".join(f"{k} {v}" for k, v in p.seconds.items())),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
