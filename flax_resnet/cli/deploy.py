"""After training: ``export`` (ONNX, StableHLO) and ``explain`` (Grad-CAM)."""

from __future__ import annotations

SUBCOMMANDS: list = []
