"""Hyperparameter search with Optuna: each trial an ordinary training run, pruned per epoch, resumable.

``load_space`` reads and checks a YAML search space; ``run_sweep`` runs trials (TPE sampling,
median or successive-halving pruning on each epoch's test top-1) until the study holds N
finished ones, in a SQLite file or any database Optuna accepts, with heartbeats so a killed
worker's trial is failed and retried; the report (trials table, plots, ``best_config.py``) is
written at the end. optuna and PyYAML are the ``[sweep]`` extra, imported on use.
"""

from flax_resnet.sweep.best_config import write_best_config
from flax_resnet.sweep.optional import INSTALL_HINT, require_optuna
from flax_resnet.sweep.report import format_table, trial_rows, write_report
from flax_resnet.sweep.space import apply_params, load_space, parse_space
from flax_resnet.sweep.storage import default_url, open_storage
from flax_resnet.sweep.study import PRUNERS, SweepResult, epoch_reporter, make_pruner, run_sweep

__all__ = [
    "INSTALL_HINT", "PRUNERS", "SweepResult", "apply_params", "default_url", "epoch_reporter", "format_table",
    "load_space", "make_pruner", "open_storage", "parse_space", "require_optuna", "run_sweep", "trial_rows",
    "write_best_config", "write_report",
]
