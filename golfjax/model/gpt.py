"""The GPT of the reference and its record-stack options: embedding (+ BigramHash,
SmearGate, value embeddings), U-Net block stack, tied head, softcap.

Blocks are stacked `(L, ...)` params run by `lax.scan` over a *layer schedule*:
a tuple of physical layer indices, one per virtual layer. The first half of the
virtual layers is the encoder (each pushes its output as a skip), the second
half the decoder (its i-th layer first adds `skip_weights[i] * skips.pop()`).
The baseline schedule is `range(num_layers)`; depth recurrence repeats the
indices recur_first..recur_last in the same schedule, so there is one code path
for every stack. Runs of virtual layers that are built alike (same role, XSA,
residual mode, value embedding) are one scan each.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from golfjax.config import ModelConfig, parse_layer_list
from golfjax.model import cpu_ops, fused_attention
from golfjax.model.layers import (GPTJ, GRAM_SUFFIX, GRAMS, LANES, SERIAL, Block, input_gram, kernel_init,
                                  document_segments, resolve_matmul_impl, rms_norm, scale_channels)
from golfjax.model.naming import is_control_tensor

Array = jax.Array
Params = dict


@dataclass(frozen=True)
class Schedule:
    """Which physical block runs at each virtual layer, split for the U-Net skips."""

    layers: tuple[int, ...]

    @property
    def num_encoder(self) -> int:
        return len(self.layers) // 2

    @property
    def num_skips(self) -> int:
        return min(self.num_encoder, len(self.layers) - self.num_encoder)

    @property
    def encoder(self) -> tuple[int, ...]:
        return self.layers[: self.num_encoder]

    @property
    def decoder_with_skip(self) -> tuple[int, ...]:
        return self.layers[self.num_encoder : self.num_encoder + self.num_skips]

    @property
    def decoder_tail(self) -> tuple[int, ...]:
        return self.layers[self.num_encoder + self.num_skips :]

    def role(self, v: int) -> str:
        """'enc' (pushes a skip), 'skip' (pops one first) or 'dec' of virtual layer v."""
        if v < self.num_encoder:
            return "enc"
        return "skip" if v < self.num_encoder + self.num_skips else "dec"


def layer_schedule(cfg: ModelConfig, recurrent: bool = True) -> Schedule:
    """range(num_layers), with recur_first..recur_last repeated recur_loops extra times
    when the model has recurrence and `recurrent` is on."""
    layers = list(range(cfg.num_layers))
    if recurrent and cfg.recur_loops > 0:
        a, b = cfg.recur_first, cfg.recur_last
        layers = layers[:a] + layers[a : b + 1] * (cfg.recur_loops + 1) + layers[b + 1 :]
    return Schedule(tuple(layers))


def num_skip_params(cfg: ModelConfig) -> int:
    """Skip weights/gates are sized for the longest (recurrent) schedule; shorter ones use a prefix."""
    return layer_schedule(cfg, recurrent=True).num_skips


def ve_layers(cfg: ModelConfig) -> tuple[int, ...]:
    return parse_layer_list(cfg.ve_layers) if cfg.ve_dim > 0 else ()


def layer_mode(cfg: ModelConfig, layer: int) -> str:
    if cfg.two_lane_start >= 0 and layer >= cfg.two_lane_start:
        return LANES
    if cfg.parallel_start >= 0 and layer >= cfg.parallel_start:
        return GPTJ
    return SERIAL


def layer_xsa(cfg: ModelConfig, layer: int) -> bool:
    return cfg.xsa_last_n > 0 and layer >= cfg.num_layers - cfg.xsa_last_n


def resolve_compute_dtype(name: str) -> jnp.dtype:
    """'auto' means bfloat16 on accelerators and float32 on CPU."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def resolve_attention_impl(name: str, dtype) -> str | None:
    """cuDNN fused attention needs a GPU and 16-bit inputs; on CPU golfjax's fused
    kernel on one device where the CPU can run it (golfjax.model.fused_attention: AMX
    for bf16, AVX-512 for float32), else its causal-blocked XLA attention (about 2x
    faster there than XLA's masked full square); XLA everywhere else. An explicit
    "fused" that cannot run is an error."""
    if name == "auto":
        backend = jax.default_backend()
        if backend == "cpu":
            # Several devices partition the batch with GSPMD, which would gather a custom call's operands.
            return "fused" if jax.device_count() == 1 and fused_attention.available(dtype) else "blocked"
        use_cudnn = backend == "gpu" and jnp.dtype(dtype).itemsize == 2
        return "cudnn" if use_cudnn else "xla"
    if name == "fused":
        reason = fused_attention.unavailable_reason(dtype)
        if reason is not None:
            raise fused_attention.KernelUnavailable(f"model.attention_impl='fused' cannot run here: {reason}")
    return name


def mlp_hidden(cfg: ModelConfig) -> int:
    return int(cfg.mlp_mult * cfg.model_dim)


def make_block(cfg: ModelConfig) -> Block:
    dtype = resolve_compute_dtype(cfg.compute_dtype)
    return Block(cfg=cfg, dtype=dtype, attention_impl=resolve_attention_impl(cfg.attention_impl, dtype))


@partial(jax.jit, static_argnums=0)
def init_params(cfg: ModelConfig, key: Array) -> Params:
    """Fresh float32 params with the reference's initialisation (and the records' for options).

    One compiled program per config (eager Flax init dispatches every op on its
    own: ~6 s at the baseline's size against ~1 s). The layers are initialised
    one at a time (`lax.map`, not `vmap`): a batched QR of the orthogonal init is
    a LAPACK kernel that waits on XLA:CPU's thread pool for its batch items, and
    two of them running at once on a 2-thread pool wait on each other forever."""
    k_emb, k_blocks, k_head, k_extra = jax.random.split(key, 4)
    block = make_block(cfg)
    dummy = jnp.zeros((1, 2, cfg.model_dim), jnp.float32)
    init_one = lambda k: block.init(k, dummy, dummy)["params"]
    blocks = jax.lax.map(init_one, jax.random.split(k_blocks, cfg.num_layers))
    emb_std = cfg.tied_embed_init_std if cfg.tie_embeddings else 1.0
    d = cfg.model_dim
    num_skips = num_skip_params(cfg)
    params = {
        "tok_emb": {"embedding": emb_std * jax.random.normal(k_emb, (cfg.vocab_size, d), jnp.float32)},
        "blocks": blocks,
        "skip_weights": jnp.ones((num_skips, d), jnp.float32),
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": jnp.zeros((d, cfg.vocab_size), jnp.float32)}
    params.update(_extra_params(cfg, k_extra))
    return params


def _proj_init(cfg: ModelConfig, key: Array, shape: tuple[int, int]) -> Array:
    """The records' init of the bigram/value-embedding projections: orthogonal (they
    are >= 64x64 and not zero-initialised), scaled by 1/sqrt(2L) like every `.proj`."""
    w = kernel_init(ortho_init=True)(key, shape)
    return w / np.sqrt(2 * cfg.num_layers) if cfg.ortho_init else w


def _extra_params(cfg: ModelConfig, key: Array) -> Params:
    """Params of the options, each present only when its option is on. Learned scalars
    have shape (1,), as torch's `nn.Parameter(torch.ones(1))` (artifacts keep them so)."""
    d = cfg.model_dim
    kv_dim = cfg.num_kv_heads * (d // cfg.num_heads)
    ks = jax.random.split(key, 4)
    out: Params = {}
    if cfg.skip_gates:
        out["skip_gates"] = jnp.zeros((num_skip_params(cfg), d), jnp.float32)
    if cfg.bigram_buckets:
        out["bigram"] = {
            "embed": {"embedding": jnp.zeros((cfg.bigram_buckets, cfg.bigram_dim), jnp.float32)},
            "proj": {"kernel": _proj_init(cfg, ks[0], (cfg.bigram_dim, d))},
            "scale": jnp.full((1,), cfg.bigram_scale_init, jnp.float32),
        }
    if cfg.smear == "v1":
        out["smear"] = {"gate": jnp.zeros((d,), jnp.float32)}
    if cfg.smear == "v2":
        out["smear_gate"] = {"kernel": jnp.zeros((cfg.smear_window, 1), jnp.float32)}
        out["smear_lambda"] = jnp.zeros((1,), jnp.float32)
    if cfg.ve_dim:
        out["ve_shared"] = {
            "embed": {"embedding": 0.01 * jax.random.normal(ks[1], (cfg.vocab_size, cfg.ve_dim), jnp.float32)},
            "proj": {"kernel": _proj_init(cfg, ks[2], (cfg.ve_dim, kv_dim))},
            "scale": jnp.full((1,), cfg.ve_scale_init, jnp.float32),
        }
        out["ve_layer_scales"] = jnp.ones((len(ve_layers(cfg)),), jnp.float32)
    if cfg.two_lane_start >= 0:
        out["parallel_post_lambdas"] = jnp.ones((cfg.num_layers, 2, 2), jnp.float32)
        out["parallel_resid_lambdas"] = jnp.full((cfg.num_layers, 2), 1.1, jnp.float32)
    return out


# Optional params entry: block params per *virtual* layer (leading axis = the layer
# schedule's length), merged into the physical block's params at each visit; the
# per-document LoRA TTT puts its adapters there (golfjax.eval.ttt_lora).
VIRTUAL_BLOCKS = "virtual_blocks"

# Stacks up to this many virtual layers are unrolled (faster on CPU; compile time
# grows with the unrolled length, so long recurrent schedules stay rolled).
MAX_UNROLLED_LAYERS = 16


# ----------------------------------------------------------------------------- late QAT


def fake_quantize(w: Array, bits: int) -> Array:
    """Straight-through int-`bits` fake quantization, one scale per output row.

    Kernels are (..., in, out), so a reference row is a column here: scale =
    max|w| over `in` / (2^(bits-1) - 1), values clamped to [-2^(bits-1), 2^(bits-1) - 1].
    The forward sees the quantized value, the gradient passes straight through."""
    qmax = 2 ** (bits - 1) - 1
    scale = jnp.maximum(jnp.max(jnp.abs(w), axis=-2, keepdims=True) / qmax, jnp.finfo(w.dtype).tiny)
    q = jnp.clip(jnp.round(w / scale), -qmax - 1, qmax) * scale
    return w + jax.lax.stop_gradient(q - w)


def is_qat_matrix(name: str, leaf) -> bool:
    """Block matrices that QAT (and GPTQ) quantize: 2-D per layer and not control tensors."""
    return name.startswith("blocks/") and jnp.ndim(leaf) == 3 and not is_control_tensor(name.replace("/", "."))


def qat_blocks(blocks: Params, cfg: ModelConfig, qat) -> Params:
    """The block params as the forward sees them: fake-quantized where `qat` is on.

    `qat` may be a Python bool or a traced 0-d array; a traced switch is a
    jnp.where, so both paths are in the compiled program."""
    if cfg.qat_bits <= 0 or (isinstance(qat, bool) and not qat):
        return blocks
    on = jnp.asarray(qat, bool)

    def one(path, w):
        name = "blocks/" + "/".join(str(getattr(k, "key", k)) for k in path)
        if not is_qat_matrix(name, w):
            return w
        return jnp.where(on, fake_quantize(w, cfg.qat_bits), w)

    return jax.tree_util.tree_map_with_path(one, blocks)


# ----------------------------------------------------------------------------- embeddings


def bigram_buckets(tokens: Array, buckets: int) -> Array:
    """(36313*t_i XOR 27191*t_{i-1}) mod (B-1) for i >= 1; position 0 -> bucket B-1."""
    t = tokens.astype(jnp.int32)
    h = jnp.bitwise_xor(36313 * t[..., 1:], 27191 * t[..., :-1]) % (buckets - 1)
    first = jnp.full(t[..., :1].shape, buckets - 1, jnp.int32)
    return jnp.concatenate([first, h], axis=-1)


def _prev(x: Array, keep: Array | None) -> Array:
    """x shifted one position right (zero at position 0), zeroed where keep is False."""
    prev = jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
    return prev if keep is None else prev * keep[..., None].astype(x.dtype)


def embed(params: Params, cfg: ModelConfig, tokens: Array, grams: dict | None = None) -> Array:
    """x0: token embedding (+ bigram, smear v2), RMSNorm, (smear v1), in float32."""
    e = jnp.take(params["tok_emb"]["embedding"], tokens, axis=0)
    if cfg.bigram_buckets:
        p = params["bigram"]
        look = jnp.take(p["embed"]["embedding"], bigram_buckets(tokens, cfg.bigram_buckets), axis=0)
        _add_gram(grams, "bigram/proj/kernel", look)
        e = e + p["scale"] * (look @ p["proj"]["kernel"])
    not_bos = (tokens != cfg.doc_bos_id) if cfg.smear_bos_fix else None
    if cfg.smear == "v2":
        xw = e[..., : cfg.smear_window]
        _add_gram(grams, "smear_gate/kernel", xw)
        g = params["smear_lambda"] * jax.nn.sigmoid(xw @ params["smear_gate"]["kernel"])
        e = e + g * _prev(e, not_bos)
    x = rms_norm(e)
    if cfg.smear == "v1":
        s = jax.nn.sigmoid(params["smear"]["gate"])
        x = (1 - s) * x + s * _prev(x, not_bos)
    return x


def value_embedding(params: Params, cfg: ModelConfig, tokens: Array, grams: dict | None = None) -> Array:
    """The shared value embedding (B, T, kv_dim) before its per-layer scale."""
    p = params["ve_shared"]
    look = jnp.take(p["embed"]["embedding"], tokens, axis=0)
    _add_gram(grams, "ve_shared/proj/kernel", look)
    return p["scale"] * (look @ p["proj"]["kernel"])


def _add_gram(grams: dict | None, key: str, x: Array) -> None:
    if grams is not None:
        grams[key] = grams.get(key, 0.0) + input_gram(x)


# ----------------------------------------------------------------------------- block stack


@dataclass(frozen=True)
class _Kind:
    role: str
    xsa: bool
    mode: str
    ve: int  # index into ve_layer_scales, -1 for none


def _kind(cfg: ModelConfig, sched: Schedule, v: int) -> _Kind:
    layer = sched.layers[v]
    ve = ve_layers(cfg)
    return _Kind(sched.role(v), layer_xsa(cfg, layer), layer_mode(cfg, layer), ve.index(layer) if layer in ve else -1)


def _segments(cfg: ModelConfig, sched: Schedule) -> list[tuple[int, int, _Kind]]:
    """Maximal runs [start, stop) of virtual layers of the same kind (the VE scale may differ)."""
    runs: list[tuple[int, int, _Kind]] = []
    for v in range(len(sched.layers)):
        k = _kind(cfg, sched, v)
        same = runs and runs[-1][2].role == k.role and runs[-1][2].xsa == k.xsa and runs[-1][2].mode == k.mode \
            and (runs[-1][2].ve >= 0) == (k.ve >= 0)
        if same:
            runs[-1] = (runs[-1][0], v + 1, runs[-1][2])
        else:
            runs.append((v, v + 1, k))
    return runs


def _collapse(h):
    return 0.5 * (h[0] + h[1]) if isinstance(h, tuple) else h


def _gram_key(path: tuple[str, ...]) -> str:
    *mods, leaf = path
    return "/".join(("blocks", *mods, leaf[: -len(GRAM_SUFFIX)], "kernel"))


def _flatten_sown(tree: dict, prefix: tuple[str, ...] = ()) -> dict[str, Array]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten_sown(v, prefix + (k,)))
        else:
            out[_gram_key(prefix + (k,))] = sum(v)
    return out


def _merge(base: Params, extra: Params) -> Params:
    """base with the leaves of `extra` added (nested dicts; extra's keys win)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _unstack(blocks: Params, num_layers: int) -> list[Params]:
    """The stacked (L, ...) block params as L per-layer trees, split once.

    The backward of a split is one concatenate; indexing the stack layer by layer
    instead transposes to a zero-padded full-size stack per layer, summed: L^2 work
    that was 13% of the baseline's bf16 forward+backward outside attention."""
    leaves, treedef = jax.tree.flatten(blocks)
    parts = [jnp.split(a, num_layers) for a in leaves]
    return [treedef.unflatten([p[j][0] for p in parts]) for j in range(num_layers)]


def _run_segment(block: Block, blocks: Params, layers: tuple[int, ...], kind: _Kind, h, x0: Array,
                 ctx: dict, skips=None, acc: dict | None = None, per_visit: Params | None = None,
                 per_layer: list[Params] | None = None):
    """Scan the virtual layers `layers` (physical indices) of one kind over the state h.
    `per_visit`: extra block params with a leading axis over these virtual layers, merged
    into the physical block's params at each visit. `per_layer` (the blocks split by
    `_unstack`): run the layers as a Python loop over it instead of a scan.

    Returns (h, per-layer outputs (the encoder's skips), gram accumulator)."""
    idx = jnp.asarray(np.asarray(layers, dtype=np.int32))
    xs = {"idx": idx}
    if per_visit is not None:
        xs["per_visit"] = per_visit
    if skips is not None:
        xs["skip"], xs["skip_w"] = skips["skip"], skips["w"]
        if "g" in skips:
            xs["skip_g"] = skips["g"]
    if kind.ve >= 0:
        xs["ve_scale"] = ctx["ve_scales"]

    def body(carry, inp):
        h, acc = carry
        i = inp["idx"]
        if "skip" in inp:
            lane = h[0] if isinstance(h, tuple) else h
            if "skip_g" in inp:
                sk = scale_channels(inp["skip_w"], inp["skip"], block.cfg.matmul_impl)
                lane = sk + jax.nn.sigmoid(inp["skip_g"]).astype(lane.dtype) * (lane - sk)
            else:
                lane = lane + scale_channels(inp["skip_w"], inp["skip"], block.cfg.matmul_impl)
            h = (lane, h[1]) if isinstance(h, tuple) else lane
        if per_layer is not None:
            p = per_layer[i]
        else:
            p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), blocks)
        if "per_visit" in inp:
            p = _merge(p, inp["per_visit"])
        kwargs = dict(xsa=kind.xsa, mode=kind.mode, segments=ctx.get("segments"))
        if kind.ve >= 0:
            kwargs["ve"] = inp["ve_scale"].astype(x0.dtype) * ctx["ve"]
        if kind.mode == LANES:
            kwargs["lane_lambdas"] = tuple(jax.lax.dynamic_index_in_dim(a, i, keepdims=False)
                                           for a in (ctx["lane_resid"], ctx["lane_post"]))
        if acc is None:
            h = block.apply({"params": p}, h, x0, i, **kwargs)
        else:
            h, sown = block.apply({"params": p}, h, x0, i, mutable=[GRAMS], **kwargs)
            acc = {k: a.at[i].add(_flatten_sown(sown[GRAMS])[k]) for k, a in acc.items()}
        return (h, acc), (_collapse(h) if kind.role == "enc" else None)

    if per_layer is None:
        (h, acc), ys = jax.lax.scan(body, (h, acc), xs)
        return h, ys, acc
    # Unrolled: the layer index of each step is a Python constant, and each layer's
    # residuals stay in their own buffers (no dynamic-update-slicing into scan stacks).
    outs = []
    for k, layer in enumerate(layers):
        inp = {name: jax.tree.map(lambda a: a[k], v) for name, v in xs.items() if name != "idx"}
        inp["idx"] = layer
        (h, acc), y = body((h, acc), inp)
        outs.append(y)
    return h, (jnp.stack(outs) if kind.role == "enc" else None), acc


def _stack(params: Params, cfg: ModelConfig, x: Array, ctx: dict, recurrent: bool, acc: dict | None):
    block = make_block(cfg)
    sched = layer_schedule(cfg, recurrent)
    blocks = params["blocks"]
    per_visit = params.get(VIRTUAL_BLOCKS)
    if per_visit is not None:
        n_visits = {a.shape[0] for a in jax.tree.leaves(per_visit)}
        if n_visits != {len(sched.layers)}:
            raise ValueError(f"params[{VIRTUAL_BLOCKS!r}] must have one row per virtual layer "
                             f"({len(sched.layers)}), got {sorted(n_visits)}")
    # Short schedules run unrolled (faster on CPU; compile time grows with the length).
    per_layer = _unstack(blocks, cfg.num_layers) if len(sched.layers) <= MAX_UNROLLED_LAYERS else None
    x0, h = x, x
    enc_outs: list[Array] = []
    skips = None
    for start, stop, kind in _segments(cfg, sched):
        if kind.mode == LANES and not isinstance(h, tuple):
            h = (h, h)
        elif kind.mode != LANES and isinstance(h, tuple):
            h = _collapse(h)
        seg_skips = None
        if kind.role == "skip":
            if skips is None:
                n = sched.num_skips
                skips = {"skip": jnp.concatenate(enc_outs)[::-1][:n], "w": params["skip_weights"][:n]}
                if cfg.skip_gates:
                    skips["g"] = params["skip_gates"][:n]
            j0, j1 = start - sched.num_encoder, stop - sched.num_encoder
            seg_skips = {k: v[j0:j1] for k, v in skips.items()}
        if kind.ve >= 0:
            ve_idx = [ve_layers(cfg).index(layer) for layer in sched.layers[start:stop]]
            ctx["ve_scales"] = params["ve_layer_scales"][np.asarray(ve_idx)]
        visit = None if per_visit is None else jax.tree.map(lambda a: a[start:stop], per_visit)
        h, ys, acc = _run_segment(block, blocks, sched.layers[start:stop], kind, h, x0, ctx, seg_skips, acc, visit,
                                  per_layer)
        if kind.role == "enc":
            enc_outs.append(ys)
    return _collapse(h), acc


def _hidden(params: Params, cfg: ModelConfig, tokens: Array, qat, recurrent: bool, collect: bool):
    dtype = resolve_compute_dtype(cfg.compute_dtype)
    grams: dict | None = {} if collect else None
    x = embed(params, cfg, tokens, grams).astype(dtype)
    ctx: dict = {}
    if cfg.doc_mask:
        ctx["segments"] = document_segments(tokens, cfg.doc_bos_id)
    if cfg.ve_dim:
        ctx["ve"] = value_embedding(params, cfg, tokens, grams).astype(dtype)
    if cfg.two_lane_start >= 0:
        ctx["lane_resid"], ctx["lane_post"] = params["parallel_resid_lambdas"], params["parallel_post_lambdas"]
    p = dict(params, blocks=qat_blocks(params["blocks"], cfg, qat))
    acc = None
    if collect:
        acc = {
            "/".join(("blocks",) + tuple(str(getattr(k, "key", k)) for k in path)): jnp.zeros(
                (leaf.shape[0], leaf.shape[1], leaf.shape[1]), jnp.float32)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params["blocks"])[0]
            if getattr(path[-1], "key", None) == "kernel"
        }
    h, acc = _stack(p, cfg, x, ctx, recurrent, acc)
    h = rms_norm(h)
    if collect:
        grams.update(acc)
        grams["tok_emb/embedding" if cfg.tie_embeddings else "lm_head/kernel"] = input_gram(h)
    return h, grams


def hidden_states(params: Params, cfg: ModelConfig, tokens: Array, *, qat=False, recurrent: bool = True) -> Array:
    """Final-normed hidden states (B, T, D) of the U-Net block stack."""
    return _hidden(params, cfg, tokens, qat, recurrent, collect=False)[0]


def logits_from_hidden(params: Params, cfg: ModelConfig, h: Array) -> Array:
    """Head projection (tied or untied) and softcap, returned in float32."""
    if cfg.tie_embeddings:
        w = params["tok_emb"]["embedding"].astype(h.dtype).T
    else:
        w = params["lm_head"]["kernel"].astype(h.dtype)
    z = (h @ w).astype(jnp.float32)
    return cfg.logit_softcap * jnp.tanh(z / cfg.logit_softcap)


def forward(params: Params, cfg: ModelConfig, tokens: Array, *, qat=False, recurrent: bool = True) -> Array:
    """Soft-capped float32 logits (B, T, V) for int tokens (B, T).

    qat: Python bool or traced 0-d bool, fake-quantized block matrices when on
    (only if cfg.qat_bits > 0). recurrent: static; False runs the schedule
    without the extra loops (training before recur_start_frac)."""
    return logits_from_hidden(params, cfg, hidden_states(params, cfg, tokens, qat=qat, recurrent=recurrent))


def token_nll(params: Params, cfg: ModelConfig, x: Array, y: Array, *, qat=False, recurrent: bool = True) -> Array:
    """Per-token negative log-likelihood in nats, float32, shape (B, T)."""
    if resolve_matmul_impl(cfg.matmul_impl) == "cpu":  # head + loss as one op (golfjax.model.cpu_ops)
        h = hidden_states(params, cfg, x, qat=qat, recurrent=recurrent)
        w = params["tok_emb"]["embedding"] if cfg.tie_embeddings else params["lm_head"]["kernel"].T
        return cpu_ops.softcapped_nll(h, w.astype(h.dtype), y, cfg.logit_softcap)
    logits = forward(params, cfg, x, qat=qat, recurrent=recurrent)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, y[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return logz - picked


def loss(params: Params, cfg: ModelConfig, x: Array, y: Array, *, qat=False, recurrent: bool = True) -> Array:
    """Mean cross-entropy over all tokens, as the reference's training loss."""
    return jnp.mean(token_nll(params, cfg, x, y, qat=qat, recurrent=recurrent))


def matrix_input_grams(params: Params, cfg: ModelConfig, tokens: Array, *, qat=False,
                       recurrent: bool = True) -> dict[str, Array]:
    """Sum over tokens (and over every virtual-layer visit) of x^T x of each matrix's input, float32.

    Keys are '/'-joined param paths of the 2-D weights the forward multiplies
    by: block kernels stacked over physical layers, shape (L, in, in); the
    head's input gram under 'tok_emb/embedding' (tied) or 'lm_head/kernel';
    and, when present, 'bigram/proj/kernel', 've_shared/proj/kernel',
    'smear_gate/kernel'. The Hessian proxy of GPTQ."""
    return _hidden(params, cfg, tokens, qat, recurrent, collect=True)[1]


def count_params(params: Params) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))
