"""params -> artifact -> params: the export and reload used by train, export and score.

The exporter quantizes the reference-named state dict (`golfjax.interop`), so a
golfjax model and a reference state take the same path and the int8 tensors
can be compared with the reference's bit for bit.

A *recipe* (:data:`SCHEMES`) names a quantization plan and a codec:

| name | quantization | codec |
|---|---|---|
| int8-zlib | the reference int8 exporter (bit-identical) | zlib 9 |
| int6-zstd | attn/MLP int6 per row, clip percentile searched per matrix (GPTQ-lite); embedding and other matrices int8 | zstd 22 |
| int6-brotli | as int6-zstd | byte shuffle + brotli 11 |
| gptq-int6-sdclip | full-Hessian GPTQ, attn/MLP int6 SDClip k=12.85, tied embedding int8 k=20 (output-side Hessian) | byte shuffle + brotli 11 |
| gptq-lqer-pergroup | gptq-int6-sdclip + LQER (rank 4 on the 3 worst matrices, asymmetric int2/int4, groups of 64) | per-group |
| int6-sdclip-brotli | gptq-int6-sdclip's scales with round-to-nearest (no calibration) | byte shuffle + brotli 11 |
| int6-sdclip-lqer-pergroup | int6-sdclip-brotli + LQER as above | per-group |
| custom | the quant_* fields of ExportConfig (``quant.plan_from_config``) | ExportConfig.codec |

``ExportConfig.codec`` (when set) replaces a recipe's codec. Quantizers other
than the reference live in quant.py / gptq.py / lqer.py / calibrate.py; a
recipe whose quantizer is not there fails with "not implemented yet".
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from golfjax import interop
from golfjax.config import Config, from_dict, to_dict
from golfjax.export import artifact
from golfjax.export import codec as codecs
from golfjax.export.quant import QuantizedState, dequantize_state, quantize_state_int8

INT8_CLIP_Q = 0.9999984  # the reference's int8 row clip, 99.99984th percentile


def _quant_api(*names: str) -> Any:
    """golfjax.export.quant, or "not implemented yet" naming what is missing."""
    quant = importlib.import_module("golfjax.export.quant")
    missing = [n for n in names if not hasattr(quant, n)]
    if missing:
        raise artifact.ArtifactError(f"not implemented yet: golfjax.export.quant.{', '.join(missing)} "
                                     "(int-k / GPTQ / LQER quantizers)")
    return quant


@dataclass(frozen=True)
class Recipe:
    """A named quantization plan + codec.

    ``rules``: role (attn, mlp, embed, other) -> QuantRule kwargs; None is the
    reference int8 exporter. ``plan_options``: QuantPlan fields (LQER).
    """

    name: str
    codec: str
    rules: Mapping[str, Mapping[str, Any]] | None = None
    plan_options: Mapping[str, Any] = field(default_factory=dict)
    from_config: bool = False  # "custom": the plan comes from ExportConfig's quant_* fields

    @property
    def needs_hessians(self) -> bool:
        return any(rule.get("gptq", False) for rule in (self.rules or {}).values())

    def plan(self, cfg: Config | None = None) -> Any:
        """The QuantPlan (quantx's), or None for the reference exporter."""
        if self.from_config:
            if cfg is None:
                raise artifact.ArtifactError("the custom export scheme needs the run config")
            return _quant_api("plan_from_config").plan_from_config(cfg.export)
        if self.rules is None:
            return None
        quant = _quant_api("QuantRule", "QuantPlan", "quantize_state", "plan_from_config")
        groups = {group: quant.QuantRule(**rule) for group, rule in self.rules.items()}
        # The recipe fixes the rules and LQER; the rest (passthrough threshold, gates,
        # GPTQ damping/blocks, bit packing) comes from the config's quant_* fields.
        base = quant.plan_from_config(cfg.export) if cfg is not None else quant.QuantPlan()
        return replace(base, **groups, **{"lqer_rank": 0, **self.plan_options})

    def quantize(self, state: Mapping[str, np.ndarray], hessians: Mapping[str, np.ndarray] | None = None,
                 cfg: Config | None = None) -> tuple[QuantizedState, dict]:
        """(quantized state, stats) of a reference-named state."""
        plan = self.plan(cfg)
        if plan is None:
            return quantize_state_int8(state)
        return _quant_api("quantize_state").quantize_state(state, plan, hessians)

    def __iter__(self) -> Iterator[Any]:
        # Older callers (golfjax.plan) unpack a scheme as (quantize(state), codec).
        yield self.quantize
        yield self.codec


_INT8_ROW = {"bits": 8, "clip": "percentile", "clip_q": INT8_CLIP_Q}
_INT6_SEARCH = {"bits": 6, "clip": "search"}
_GPTQ_INT6 = {"bits": 6, "clip": "sdclip", "sdclip_k": 12.85, "gptq": True}
_GPTQ_EMBED = {"bits": 8, "clip": "sdclip", "sdclip_k": 20.0, "gptq": True}
_SDCLIP_INT6 = {**_GPTQ_INT6, "gptq": False}
_SDCLIP_EMBED = {**_GPTQ_EMBED, "gptq": False}
_LQER = {"lqer_rank": 4, "lqer_top_k": 3, "lqer_asym": True, "lqer_group": 64}

SCHEMES: dict[str, Recipe] = {
    "int8-zlib": Recipe("int8-zlib", "zlib"),
    "int6-zstd": Recipe("int6-zstd", "zstd",
                        {"attn": _INT6_SEARCH, "mlp": _INT6_SEARCH, "embed": _INT8_ROW, "other": _INT8_ROW}),
    "int6-brotli": Recipe("int6-brotli", "shuffle2+brotli",
                          {"attn": _INT6_SEARCH, "mlp": _INT6_SEARCH, "embed": _INT8_ROW, "other": _INT8_ROW}),
    "gptq-int6-sdclip": Recipe("gptq-int6-sdclip", "shuffle2+brotli",
                               {"attn": _GPTQ_INT6, "mlp": _GPTQ_INT6, "embed": _GPTQ_EMBED, "other": _INT8_ROW}),
    "gptq-lqer-pergroup": Recipe("gptq-lqer-pergroup", artifact.PERGROUP,
                                 {"attn": _GPTQ_INT6, "mlp": _GPTQ_INT6, "embed": _GPTQ_EMBED, "other": _INT8_ROW},
                                 plan_options=_LQER),
    # Without calibration (no GPTQ): the SDClip scales with round-to-nearest.
    "int6-sdclip-brotli": Recipe("int6-sdclip-brotli", "shuffle2+brotli",
                                 {"attn": _SDCLIP_INT6, "mlp": _SDCLIP_INT6, "embed": _SDCLIP_EMBED,
                                  "other": _INT8_ROW}),
    "int6-sdclip-lqer-pergroup": Recipe("int6-sdclip-lqer-pergroup", artifact.PERGROUP,
                                        {"attn": _SDCLIP_INT6, "mlp": _SDCLIP_INT6, "embed": _SDCLIP_EMBED,
                                         "other": _INT8_ROW}, plan_options=_LQER),
    "custom": Recipe("custom", "zlib", from_config=True),
}


def get_recipe(name: str) -> Recipe:
    if name not in SCHEMES:
        raise artifact.ArtifactError(f"unknown export scheme {name!r}; known: {', '.join(SCHEMES)}")
    return SCHEMES[name]


def _hessians(params, cfg: Config, recipe: Recipe, plan: Any) -> Mapping[str, np.ndarray] | None:
    needs = recipe.needs_hessians or (plan is not None and any(
        getattr(getattr(plan, g, None), "gptq", False) for g in ("attn", "mlp", "embed", "other")))
    if not needs:
        return None
    try:
        calibrate = importlib.import_module("golfjax.export.calibrate")
    except ModuleNotFoundError:
        calibrate = None
    if calibrate is None or not hasattr(calibrate, "hessians_for_export"):
        raise artifact.ArtifactError(f"not implemented yet: GPTQ calibration (golfjax.export.calibrate."
                                     f"hessians_for_export), needed by export scheme {recipe.name!r}")
    return calibrate.hessians_for_export(params, cfg)


@dataclass(frozen=True)
class ExportReport:
    path: Path
    scheme: str
    codec: str
    model_bytes: int
    code_bytes: int
    total_bytes: int
    limit_bytes: int
    stats: dict
    size: dict
    streams: tuple[dict, ...] = ()
    quantize_seconds: float = 0.0
    write_seconds: float = 0.0

    def lines(self) -> list[str]:
        s = self.stats
        ratio = s["baseline_tensor_bytes"] / max(s["int8_payload_bytes"], 1)
        streams = " ".join(f"{t['name']}:{t['codec']}:{t['raw_bytes']}->{t['compressed_bytes']}"
                           for t in self.streams)
        return [
            f"artifact:{self.path} scheme:{self.scheme} codec:{self.codec} payload:{s['int8_payload_bytes']} "
            f"baseline_tensor_bytes:{s['baseline_tensor_bytes']} payload_ratio:{ratio:.2f}x",
            f"export_time quantize:{self.quantize_seconds:.2f}s compress_write:{self.write_seconds:.2f}s "
            f"streams: {streams}",
            *artifact.format_size_report(self.size, label=self.scheme.replace("-", "+")).splitlines(),
            "code_files: " + " ".join(self.size["code_files"]),
        ]

    def as_dict(self) -> dict:
        """What scripts/export.py prints as its last line."""
        return {"artifact": str(self.path), "scheme": self.scheme, "codec": self.codec,
                "model_bytes": self.model_bytes, "code_bytes": self.code_bytes, "total_bytes": self.total_bytes,
                "limit_bytes": self.limit_bytes, "code_bytes_mode": self.size["code_bytes_mode"],
                "quantize_seconds": round(self.quantize_seconds, 3), "write_seconds": round(self.write_seconds, 3),
                "streams": [{k: t[k] for k in ("name", "codec", "raw_bytes", "compressed_bytes")}
                            for t in self.streams]}


def resolve_codec(recipe: Recipe, cfg: Config) -> tuple[str, tuple[str, ...]]:
    """The codec to use (ExportConfig.codec wins over the recipe's) and the per-group candidates."""
    codec = cfg.export.codec or recipe.codec
    names = [c.strip() for c in cfg.export.pergroup_codecs.split(",") if c.strip()]
    candidates = tuple(names) or codecs.PERGROUP_CANDIDATES
    try:
        for spec in (*names, *(candidates if codec == artifact.PERGROUP else (codec,))):
            codecs.parse_spec(spec)
    except codecs.CodecError as exc:
        raise artifact.ArtifactError(f"export codec: {exc} (or {artifact.PERGROUP!r})") from exc
    return codec, candidates


def export_params(params, cfg: Config, out_path: str | Path, scheme: str | None = None) -> ExportReport:
    """Quantize, compress and write `params`; fail with a breakdown when over budget."""
    recipe = get_recipe(scheme or cfg.export.scheme)
    codec, candidates = resolve_codec(recipe, cfg)
    cfg = replace(cfg, export=replace(cfg.export, scheme=recipe.name))  # the artifact records what it is
    start = time.perf_counter()
    plan = recipe.plan(cfg)
    hessians = _hessians(params, cfg, recipe, plan)
    state_q, stats = recipe.quantize(interop.to_reference_state(jax.device_get(params)), hessians, cfg)
    quantized = time.perf_counter()
    info = artifact.write_artifact(out_path, state_q, to_dict(cfg), codec=codec, scheme=recipe.name,
                                   reorder=cfg.export.pergroup_reorder, candidates=candidates)
    written = time.perf_counter()
    size = artifact.size_report(info.total_bytes, artifact.code_files(), cfg.export.artifact_limit_bytes,
                                cfg.export.code_bytes_mode)
    artifact.check_budget(size, state_q)
    return ExportReport(info.path, recipe.name, codec, info.total_bytes, size["code_bytes"], size["total_bytes"],
                        size["limit_bytes"], stats, size, info.streams, quantized - start, written - quantized)


def load_artifact(path: str | Path) -> tuple[Config, dict, QuantizedState, dict]:
    """Verify and read an artifact: (config, dequantized float32 params, quantized state, header)."""
    config_dict, state_q, header = artifact.read_artifact(path)
    cfg = from_dict(config_dict)
    return cfg, interop.from_reference_state(dequantize_state(state_q), cfg.model), state_q, header


def load_artifact_params(path: str | Path) -> tuple[Config, dict]:
    """Verify and read an artifact; returns its config and dequantized float32 params."""
    cfg, params, _, _ = load_artifact(path)
    return cfg, params
