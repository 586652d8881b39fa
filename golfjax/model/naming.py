"""Names with meaning across modules: which parameters are control tensors.

The reference's CONTROL_TENSOR_NAME_PATTERNS, matched as substrings of a
reference parameter name: such tensors go to the scalar Adam group even when
they are matrices (resid_mix), and the int8 exporter keeps them in float32.
Names are dotted param paths ("blocks.attn.attn_gate.kernel", "smear_gate.kernel").
Every small parameter golfjax.model adds for an option is listed here.
"""

from __future__ import annotations

CONTROL_TENSOR_PATTERNS: tuple[str, ...] = (
    "attn_scale",
    "attn_scales",
    "mlp_scale",
    "mlp_scales",
    "resid_mix",
    "resid_mixes",
    "q_gain",
    "skip_weight",
    "skip_weights",
    # record-stack options (golfjax.model): small gates, scales and routing lambdas
    "skip_gates",
    "attn_gate",
    "smear",
    "bigram.scale",
    "ve_shared.scale",
    "ve_layer_scales",
    "parallel_post_lambdas",
    "parallel_resid_lambdas",
)


def is_control_tensor(name: str) -> bool:
    return any(pattern in name for pattern in CONTROL_TENSOR_PATTERNS)
