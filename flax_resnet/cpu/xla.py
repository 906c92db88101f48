"""XLA:CPU compiler options for the CPU backend's steps."""

from __future__ import annotations

import os

import jax

_YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"


def ynn_fusion_options(*kinds: str) -> dict[str, str]:
    """Compiler options that hand XLA:CPU's YNNPACK exactly these fusion kinds (e.g. "REDUCE")."""
    return {_YNN_FLAG: ",".join(f"LIBRARY_FUSION_TYPE_{kind}" for kind in kinds)}


# YNNPACK for individual matmuls and for reductions (BatchNorm's statistics), not for
# convolutions (XLA's own, or the native kernels, are faster) nor elementwise fusions
# (slower in ResNet-20): docs/performance.md, `experiments/cpu_probes.py fusions`.
COMPILER_OPTIONS = ynn_fusion_options("INDIVIDUAL_DOT", "REDUCE")


def compiler_options() -> dict[str, str]:
    """:data:`COMPILER_OPTIONS` on the CPU backend; empty elsewhere, or when ``XLA_FLAGS`` sets the
    YNNPACK fusions itself (yours wins). Their rounding depends on the per-device batch, which is
    why the plain models keep XLA's defaults."""
    if jax.default_backend() != "cpu" or _YNN_FLAG in os.environ.get("XLA_FLAGS", ""):
        return {}
    return dict(COMPILER_OPTIONS)
