"""params -> artifact -> params: the export and reload used by train, export and score.

The exporter quantizes the reference-named state dict (`golfjax.interop`), so a
golfjax model and a reference state take the same path and the int8 tensors
can be compared with the reference's bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax

from golfjax import interop
from golfjax.config import Config, from_dict, to_dict
from golfjax.export import artifact
from golfjax.export.quant import dequantize_state, quantize_state_int8

# scheme name -> (quantizer, codec). Later schemes (int6, GPTQ, ...) add entries.
SCHEMES = {
    "int8-zlib": (quantize_state_int8, "zlib"),
}


@dataclass(frozen=True)
class ExportReport:
    path: Path
    scheme: str
    model_bytes: int
    code_bytes: int
    total_bytes: int
    limit_bytes: int
    stats: dict
    size: dict

    def lines(self) -> list[str]:
        s = self.stats
        ratio = s["baseline_tensor_bytes"] / max(s["int8_payload_bytes"], 1)
        return [
            f"artifact:{self.path} scheme:{self.scheme} payload:{s['int8_payload_bytes']} "
            f"baseline_tensor_bytes:{s['baseline_tensor_bytes']} payload_ratio:{ratio:.2f}x",
            *artifact.format_size_report(self.size, label=self.scheme.replace("-", "+")).splitlines(),
            "code_files: " + " ".join(self.size["code_files"]),
        ]


def export_params(params, cfg: Config, out_path: str | Path, scheme: str | None = None) -> ExportReport:
    """Quantize, compress and write `params`; fail with a breakdown when over budget."""
    scheme = scheme or cfg.export.scheme
    if scheme not in SCHEMES:
        raise artifact.ArtifactError(f"unknown export scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    quantize, codec = SCHEMES[scheme]
    state_q, stats = quantize(interop.to_reference_state(jax.device_get(params)))
    info = artifact.write_artifact(out_path, state_q, to_dict(cfg), codec=codec, scheme=scheme)
    size = artifact.size_report(info.total_bytes, artifact.code_files(), cfg.export.artifact_limit_bytes,
                                cfg.export.code_bytes_mode)
    artifact.check_budget(size, state_q)
    return ExportReport(info.path, scheme, info.total_bytes, size["code_bytes"], size["total_bytes"],
                        size["limit_bytes"], stats, size)


def load_artifact_params(path: str | Path) -> tuple[Config, dict]:
    """Verify and read an artifact; returns its config and dequantized float32 params."""
    config_dict, state_q, _ = artifact.read_artifact(path)
    cfg = from_dict(config_dict)
    return cfg, interop.from_reference_state(dequantize_state(state_q), cfg.model)
