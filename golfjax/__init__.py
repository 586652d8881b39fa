"""golfjax: the Parameter Golf training stack in JAX/Flax."""

import os

__version__ = "0.1.0"

# XLA:CPU's YNNPACK reduce fusions make the backward pass's column reductions
# (gradients of per-channel scales, softmax row sums) several times slower than
# XLA's own emitter: fwd+bwd of the baseline ran ~1.3x faster without them
# (docs/BENCHMARKS.md). Only CPU reads this flag; a user's own choice in
# XLA_FLAGS wins, and GOLFJAX_XLA_DEFAULTS=0 leaves XLA_FLAGS untouched. It must
# be set before jax starts its backend, hence here.
CPU_XLA_DEFAULTS = ("--xla_cpu_experimental_ynn_fusion_type=-reduce",)


def _apply_cpu_xla_defaults() -> None:
    if os.environ.get("GOLFJAX_XLA_DEFAULTS", "1") == "0":
        return
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in CPU_XLA_DEFAULTS if f.split("=")[0] not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


_apply_cpu_xla_defaults()
