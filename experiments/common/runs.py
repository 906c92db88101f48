"""Runs: what a number was measured on, which dataset and recipe, training a recipe and reading it back.

:func:`run_recipe` trains through the library's ``train_and_evaluate`` (there is no second
training loop here) and returns what the run logged in ``metrics.jsonl`` as a
:class:`RunResult`, which turns the records into error curves and table rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from flax_resnet import data
from flax_resnet.checkpoint import Checkpointer
from flax_resnet.configs import load_config
from flax_resnet.errors import DatasetNotPreparedError, TrainingDivergedError, UserError
from flax_resnet.models import count_params, create_model
from flax_resnet.training import create_learning_rate_fn, train_and_evaluate

from .cmdline import as_overrides

PrintFn = Callable[..., None]

# Which recipe trains on which dataset, for experiments that follow "the recipe of the dataset".
DATASET_RECIPES = {"cifar10": "cifar10_resnet20", "digits": "digits_resnet20"}
# The run's log: one JSON record a line, with a "kind" ("train", "eval", "resume"); see
# flax_resnet.training.logging for the fields.
METRICS_FILE = "metrics.jsonl"


# --------------------------------------------------------------------------- environment and dataset
def machine() -> str:
    """One line naming what a number was measured on: CPU, cores, accelerators, load."""
    devs = jax.devices()
    kind = devs[0].device_kind if devs else "?"
    try:
        load = f", load average {os.getloadavg()[0]:.1f}"
    except OSError:
        load = ""
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores{load}; "
            f"jax {jax.__version__} on {len(devs)} x {devs[0].platform if devs else '?'} ({kind})")


def dataset_available(name: str, data_dir: str | None = None) -> bool:
    """True when ``name`` is prepared in ``data_dir`` (never downloads or prepares anything)."""
    try:
        data.get_dataset_info(name, data_dir)
    except DatasetNotPreparedError:
        return False
    return True


def choose_dataset(requested: str | None = None, *, preferred: str = "cifar10", fallback: str = "digits",
                   data_dir: str | None = None) -> tuple[str, str | None]:
    """The dataset an experiment runs on, and a note to print when it is not the preferred one.

    ``requested`` (``"auto"`` or ``None`` means: ``preferred`` if prepared, else ``fallback``)
    must be prepared; a missing one raises the data layer's error with its prepare command.
    """
    if requested not in (None, "", "auto"):
        data.get_dataset_info(requested, data_dir)  # fails at once, with the prepare command
        return requested, None
    if dataset_available(preferred, data_dir):
        return preferred, None
    note = (f"note: {preferred} is not prepared (run `{data.prepare_command(preferred, data_dir)}`); "
            f"running on the embedded '{fallback}' dataset instead. Numbers are NOT comparable to "
            f"the published {preferred} results.")
    return fallback, note


def experiment_dataset(args) -> tuple[str, str | None]:
    """:func:`choose_dataset` for a script's ``--dataset``/``--data-dir``; prints the fallback note."""
    dataset, note = choose_dataset(args.dataset, data_dir=args.data_dir)
    if note:
        print(note)
    return dataset, note


def recipe_for(dataset: str, default: str = "digits_resnet20") -> str:
    """The recipe whose hyper-parameters suit ``dataset`` (see :data:`DATASET_RECIPES`)."""
    return DATASET_RECIPES.get(dataset, default)


# --------------------------------------------------------------------------- results
@dataclasses.dataclass
class RunResult:
    """One finished recipe run: its summary and its ``metrics.jsonl`` records."""

    name: str
    workdir: str
    config: dict[str, Any]
    summary: Any  # flax_resnet.training.TrainSummary, or None (read back, or diverged)
    train: list[dict[str, Any]]  # kind == "train" records (every log_every_steps)
    eval: list[dict[str, Any]]  # kind == "eval" records (every epoch)
    diverged_step: int | None = None  # the loss became NaN/inf at this step (the run stopped there)

    def training_error_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, training error %)``: 100 x (1 - mean top-1) over each log interval.

        The top-1 is measured on the augmented training batches in train mode, as the
        step computes it (the paper's Figure 6 plots the same kind of training error).
        """
        rows = _last_per_step(self.train)
        return (np.array([r["step"] for r in rows], np.int64),
                np.array([100.0 * (1.0 - r["top1"]) for r in rows], np.float64))

    def test_error_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, test error %)`` at the end of every epoch."""
        rows = _last_per_step(self.eval)
        return (np.array([r["step"] for r in rows], np.int64),
                np.array([100.0 * (1.0 - r["test_top1"]) for r in rows], np.float64))

    def epoch_rows(self) -> list[dict[str, Any]]:
        """One record per epoch: ``epoch, step, train_loss, train_error, test_loss, test_error`` (errors in %)."""
        by_epoch = {r["epoch"]: r for r in self.eval}
        return [{"model": self.config.get("model"), "epoch": e, "step": by_epoch[e]["step"],
                 "train_loss": by_epoch[e].get("train_loss"),
                 "train_error": _pct_error(by_epoch[e].get("train_top1")),
                 "test_loss": by_epoch[e]["test_loss"], "test_error": _pct_error(by_epoch[e]["test_top1"])}
                for e in sorted(by_epoch)]

    def summary_row(self) -> dict[str, Any]:
        """The run in one record: model, dataset, steps, final/best test error (%), time.

        From the ``TrainSummary`` when this process ran it to the end, else from
        ``metrics.jsonl``.
        """
        row = {"model": self.config.get("model"), "dataset": self.config.get("dataset"),
               "diverged_step": self.diverged_step}
        s = self.summary
        if s is not None:
            return {**row, "steps": s.steps, "epochs": s.epochs, "final_train_error": self.final_training_error(),
                    "final_test_error": _pct_error(s.final_top1), "best_test_error": _pct_error(s.best_top1),
                    "best_epoch": s.best_epoch, "compile_s": round(s.compile_s, 1), "wall_s": round(s.wall_s, 1),
                    "images_per_sec": round(s.images_per_sec, 1)}
        epochs = self.epoch_rows()
        best = min(epochs, key=lambda e: e["test_error"]) if epochs else {}
        return {**row, "steps": epochs[-1]["step"] if epochs else 0, "epochs": len(epochs),
                "final_train_error": self.final_training_error(),
                "final_test_error": epochs[-1]["test_error"] if epochs else float("nan"),
                "best_test_error": best.get("test_error", float("nan")), "best_epoch": best.get("epoch"),
                "wall_s": round(self.eval[-1].get("elapsed_s", float("nan")), 1) if self.eval else None}

    def final_training_error(self, fraction: float = 0.25) -> float:
        """Mean training error (%) over the last ``fraction`` of the logged intervals."""
        _, err = self.training_error_curve()
        if not len(err):
            return float("nan")
        n = max(1, int(round(len(err) * fraction)))
        return float(err[-n:].mean())


def _pct_error(top1: float | None) -> float | None:
    return None if top1 is None else 100.0 * (1.0 - float(top1))


def _last_per_step(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records sorted by step, keeping the last one of each step (a resumed run may repeat some)."""
    by_step = {r["step"]: r for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def read_metrics(workdir: str | Path, kind: str) -> list[dict[str, Any]]:
    """The records of one ``kind`` in ``workdir/metrics.jsonl`` (none when the file is missing)."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [r for r in rows if r.get("kind") == kind]


# --------------------------------------------------------------------------- running and reading runs
def run_recipe(recipe: str, workdir: str | Path, overrides: Mapping[str, Any] | Sequence[str] = (), *,
               name: str | None = None, extra_overrides: Sequence[str] = (), fresh: bool = False,
               print_fn: PrintFn = print, verbose: bool = False) -> RunResult:
    """Trains ``recipe`` with overrides in ``workdir`` and returns what it logged.

    Args:
      recipe: a recipe name or path (see :mod:`flax_resnet.configs`).
      workdir: the run directory. A run already there resumes (or, when finished, is only
        re-evaluated), so an interrupted full-mode experiment continues where it stopped.
      overrides: the experiment's own config changes (a dict, or ``--config.x=y`` strings).
      extra_overrides: the user's ``--config.x=y`` strings, applied after ``overrides``.
      fresh: delete a previous run in ``workdir`` first (only a directory that looks like
        one; anything else is a ``UserError``, see :func:`remove_run`).
      print_fn: where the run's lines go, prefixed with ``[name]``.
      verbose: also print the run's config header.

    A run whose loss becomes NaN/inf is returned with ``diverged_step`` set and
    ``summary=None`` (what it logged before stays in ``train``/``eval``).
    """
    workdir = Path(workdir)
    name = name or workdir.name
    if fresh:
        remove_run(workdir)
    config = load_config(recipe, [*as_overrides(overrides), *extra_overrides])

    def say(*args, **kwargs):
        text = " ".join(str(a) for a in args)
        if verbose or not text.startswith("config:"):  # the config dump is one multi-line call
            print_fn(f"[{name}] {text}", **kwargs)

    summary, diverged = None, None
    try:
        summary = train_and_evaluate(config, workdir, print_fn=say)
    except TrainingDivergedError as e:  # a result, not a crash: deep plain nets can blow up
        diverged = int(getattr(e, "step", -1))
        print_fn(f"[{name}] diverged: {e}")
    return RunResult(name=name, workdir=str(workdir), config=config.to_dict(), summary=summary,
                     train=read_metrics(workdir, "train"), eval=read_metrics(workdir, "eval"),
                     diverged_step=diverged)


def read_run(workdir: str | Path, name: str | None = None) -> RunResult:
    """A finished run directory (``metrics.jsonl`` and the saved config) as a :class:`RunResult`
    with ``summary=None``: for runs started by another entry point, e.g. ``flax-resnet finetune``."""
    workdir = Path(workdir)
    config: dict[str, Any] = {}
    try:
        with Checkpointer(workdir, read_only=True) as ckpt:
            _, config, _ = ckpt.restore_config("latest")
    except Exception:  # noqa: BLE001 - the metrics alone still make a table
        pass
    return RunResult(name=name or workdir.name, workdir=str(workdir), config=dict(config), summary=None,
                     train=read_metrics(workdir, "train"), eval=read_metrics(workdir, "eval"))


def remove_run(workdir: str | Path) -> None:
    """Deletes a run directory (``metrics.jsonl``, ``checkpoints/`` or TensorBoard events in it, or
    empty); refuses any other directory with a ``UserError``."""
    workdir = Path(workdir)
    if not workdir.exists():
        return
    looks_like_run = ((workdir / METRICS_FILE).exists() or (workdir / "checkpoints").is_dir()
                      or any(workdir.glob("events.out.tfevents.*")) or not any(workdir.iterdir()))
    if not looks_like_run:
        raise UserError(f"{workdir} exists but holds no run (no {METRICS_FILE} or checkpoints/); "
                        "pick another --outdir or remove it yourself")
    shutil.rmtree(workdir)


def recipe_plan(recipe: str, train_size: int, *, num_classes: int, in_channels: int = 3,
                overrides: Sequence[str] = (), points: int = 101) -> dict[str, Any]:
    """What a recipe would do on a dataset of ``train_size`` images, without data or training.

    Builds the model abstractly (no allocation, no compile) for its parameter count and
    evaluates the learning-rate schedule. Returns ``model``, ``params``, ``batch_size``,
    ``steps_per_epoch``, ``total_steps``, ``epochs``, ``peak_lr``, ``final_lr`` and
    ``schedule`` (``points`` pairs ``(epoch, lr)``).
    """
    config = load_config(recipe, overrides)
    steps_per_epoch = train_size // config.batch_size
    total = int(config.num_train_steps) if config.num_train_steps > 0 else int(config.num_epochs) * steps_per_epoch
    lr_fn = create_learning_rate_fn(config, steps_per_epoch, total)
    at = np.linspace(0, total - 1, points).round().astype(int)
    lrs = [float(lr_fn(int(s))) for s in at]
    kwargs = dict(config.get("model_kwargs", {}) or {})
    model = nnx.eval_shape(lambda: create_model(config.model, num_classes, in_channels=in_channels, **kwargs))
    return {"recipe": recipe, "model": config.model, "params": count_params(model), "batch_size": config.batch_size,
            "steps_per_epoch": steps_per_epoch, "total_steps": total, "epochs": total / steps_per_epoch,
            "peak_lr": max(lrs), "final_lr": lrs[-1],
            "schedule": [(float(s) / steps_per_epoch, lr) for s, lr in zip(at, lrs)]}
