"""``sweep``: hyperparameter search over a recipe with Optuna."""

from __future__ import annotations

SUBCOMMANDS: list = []
