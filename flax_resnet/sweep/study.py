"""Runs a study: each trial an ordinary training run in ``<workdir>/trial_<n>/``, until N have finished.

The loop, run by every worker (one process per machine or accelerator, each the same command):

1. Mark trials whose heartbeat went stale FAIL; the storage's callback re-queues each as a
   WAITING trial with the same parameters (:mod:`flax_resnet.sweep.storage`).
2. Count finished trials (COMPLETE or PRUNED). N reached: stop. A WAITING trial, or fewer than
   N finished plus running: run one trial (a WAITING one first). Otherwise the missing ones are
   running elsewhere: wait and poll (a dead peer's trial goes stale and comes back as WAITING,
   which this worker then runs).
3. A trial draws its parameters with TPE (seeded with ``seed + trials so far``: one worker
   reproduces its sweep; workers racing for a trial still draw different points, and the
   constant liar steers them off each other's running trials), trains with
   :func:`~flax_resnet.training.train_and_evaluate`, reports each epoch's test top-1 to the
   pruner from ``on_epoch_end`` and raises ``TrialPruned`` there when the pruner says so. Its
   value is the run's best test top-1 (maximised).

A trial that finds N trials already finished, running or waiting before it (two workers
started the last one at once) is marked FAIL with the note ``surplus`` and trains nothing, so
exactly N trials finish. Rerunning the command continues the study (``load_if_exists``).

Retries resume: a re-queued trial copies its failed predecessor's run directory (checkpoints,
metrics.jsonl) into its own and the trainer resumes from the newest checkpoint there; its
reported epochs are inherited, so the pruner sees the whole curve. SIGTERM/SIGINT stop the
running trial at a step boundary with a checkpoint; the trial is marked FAIL, re-queued at once,
and the next run of the command resumes it. A run that diverges (NaN loss) is a poor trial,
recorded as PRUNED with the note ``diverged``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Callable

import ml_collections

from flax_resnet.errors import TrainingDivergedError, UserError
from flax_resnet.sweep import report
from flax_resnet.sweep.optional import require_optuna
from flax_resnet.sweep.space import apply_params, suggest
from flax_resnet.sweep.storage import open_storage, redact, requeue
from flax_resnet.training import train_and_evaluate

PRUNERS = ("median", "halving", "none")
STUDY_MARKER = "study.json"  # which study the workdir's trial runs belong to
# Config fields that may differ between the workers of one study (machine-local settings).
LOCAL_FIELDS = ("data_dir", "num_workers", "async_checkpointing", "log_every_steps")


@dataclasses.dataclass
class SweepResult:
    """What :func:`run_sweep` reports: the study, how many trials this call ran, the outputs."""

    study_name: str
    workdir: str
    finished: int
    ran_here: int
    preempted: bool
    best: dict | None  # {"number", "value", "params"} of the best complete trial
    table: str
    files: list[str]


class _Preempted(Exception):
    """The trial's training was stopped by SIGTERM/SIGINT after saving a checkpoint."""


class _Surplus(Exception):
    """Enough trials were already finished, running or waiting when this one started."""


def make_pruner(name: str, epochs: int = 1):
    """The pruner called ``name`` for trials of ``epochs`` epochs: median, halving, or none.

    median: a trial stops when its epoch's test top-1 is below the median of earlier trials at
    that epoch, once 3 trials have finished and from half-way through its epochs (early epochs,
    under warm-up and a high learning rate, rank trials close to at random). halving: successive
    halving from a quarter of the epochs, keeping the best third at each rung.
    """
    optuna = require_optuna()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, math.ceil(epochs / 2)))
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, math.ceil(epochs / 4)), reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"unknown pruner {name!r}; use one of {', '.join(PRUNERS)}")


def trial_epochs(config) -> int:
    """The epochs a trial of ``config`` trains (1 when it counts steps, whose epochs depend on the dataset)."""
    return int(config.num_epochs) if int(config.get("num_train_steps", -1)) <= 0 else 1


def make_sampler(seed: int, n_trials: int):
    """TPE, seeded; random for the first ``min(10, max(3, N // 3))`` trials, then model-based."""
    optuna = require_optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant_liar is marked experimental
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(3, n_trials // 3)),
                                          constant_liar=True)


def add_note(trial, text: str) -> None:
    """Appends to the trial's ``note`` (shown in the table): ``retry of 3 (resumed); pruned at epoch 2``."""
    note = trial.user_attrs.get("note")
    trial.set_user_attr("note", f"{note}; {text}" if note else text)


def epoch_reporter(trial, say: Callable[[str], None]):
    """The ``on_epoch_end`` callback of one trial: reports test top-1, raises ``TrialPruned`` when told."""
    optuna = require_optuna()

    def on_epoch_end(epoch: int, metrics: dict) -> None:
        top1 = float(metrics["test_top1"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a resumed retry re-reports inherited epochs: ignored
            trial.report(top1, epoch)
        say(f"trial {trial.number} epoch {epoch}: test top-1 {100 * top1:.2f}% (best {100 * metrics['best_top1']:.2f}%)")
        if trial.should_prune():
            add_note(trial, f"pruned at epoch {epoch}")
            raise optuna.TrialPruned(f"pruned at epoch {epoch} with test top-1 {100 * top1:.2f}%")

    return on_epoch_end


def _comparable(config_dict: dict) -> dict:
    return {k: v for k, v in json.loads(json.dumps(config_dict)).items() if k not in LOCAL_FIELDS}


def _open_study(optuna, storage, study_name, config, space, sampler, pruner):
    """Creates the study or loads it, refusing one started with another space or config."""
    try:
        study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction="maximize", load_if_exists=True)
    except ValueError as e:  # e.g. an existing study of another direction
        raise UserError(f"study {study_name!r} cannot be loaded ({e}); pass another --study") from None
    space_json = {f: optuna.distributions.distribution_to_json(d) for f, d in space.items()}
    config_json = _comparable(config.to_dict())
    saved_space, saved_config = study.user_attrs.get("space"), study.user_attrs.get("config")
    if saved_space is None:
        study.set_user_attr("space", space_json)
        study.set_user_attr("config", config_json)
    elif saved_space != space_json:
        raise UserError(f"study {study_name!r} was started with another search space; rerun with the same "
                        f"--space file or start a new study with --study NAME")
    elif saved_config is not None and saved_config != config_json:
        diff = sorted(k for k in set(saved_config) | set(config_json) if saved_config.get(k) != config_json.get(k))
        raise UserError(f"study {study_name!r} was started with other config values ({', '.join(diff)}); rerun "
                        f"with the same --config and overrides or start a new study with --study NAME")
    return study


def _claim_workdir(workdir: Path, study_name: str, storage_url: str | None) -> None:
    """Records which study a workdir's ``trial_<n>/`` runs belong to; refuses a workdir of another study."""
    marker = workdir / STUDY_MARKER
    mine = {"study": study_name, "storage": redact(storage_url) if storage_url else None}
    if marker.is_file():
        theirs = json.loads(marker.read_text())
        if theirs != mine:
            where = f" in {theirs['storage']}" if theirs.get("storage") else ""
            raise UserError(f"{workdir} holds the trials of study {theirs.get('study')!r}{where}; pass another "
                            f"--workdir for this study, or that study's --study and --storage to continue it")
    elif any(workdir.glob("trial_*")):
        raise UserError(f"{workdir} holds trial runs of an unknown study; pass an empty or new --workdir")
    else:
        tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(mine) + "\n")
        tmp.replace(marker)


def _counts(optuna, study) -> tuple[int, int, int]:
    """(finished: COMPLETE or PRUNED, RUNNING, WAITING) trials."""
    S = optuna.trial.TrialState
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return (sum(s in (S.COMPLETE, S.PRUNED) for s in states), states.count(S.RUNNING), states.count(S.WAITING))


def _fail_stale(optuna, study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)


def _resume_source(history: list[int], workdir: Path) -> Path | None:
    """For a re-queued trial, the run directory of the latest failed attempt that holds checkpoints."""
    for number in reversed(history):
        src = workdir / f"trial_{number}"
        if (src / "checkpoints").is_dir():
            return src
    return None


def _objective(optuna, study, config, space, workdir: Path, n_trials: int, say, ran: list, stopped: list):
    """The objective; appends each trial it trains to ``ran``, and one a signal stopped to ``stopped``."""
    S = optuna.trial.TrialState

    def objective(trial) -> float:
        if trial.user_attrs.get("note"):
            trial.set_user_attr("note", "")  # a retry starts with its failed predecessor's attributes
        before = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number
                  and t.state in (S.COMPLETE, S.PRUNED, S.RUNNING, S.WAITING)]
        if len(before) >= n_trials:
            add_note(trial, "surplus")
            raise _Surplus()
        params = suggest(trial, space)
        trial_config = apply_params(config, params)
        run_dir = workdir / f"trial_{trial.number}"
        trial.set_user_attr("workdir", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        history = _trial_numbered(study, trial.number).system_attrs.get("retry_history", [])
        source = _resume_source(history, workdir)
        if run_dir.exists():  # trial numbers are never reused: a leftover of some other study
            raise UserError(f"{run_dir} already exists, but trial {trial.number} is new; move it away or pass "
                            f"another --workdir")
        if source is not None:
            shutil.copytree(source, run_dir)
        if history:
            add_note(trial, f"retry of {history[-1]}" + (" (resumed)" if source is not None else ""))
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        say(f"trial {trial.number}: {shown} in {run_dir}" + (f" (resuming trial {source.name})" if source else ""))
        ran.append(trial.number)
        run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(run_dir / "train.log", "a") as log:
            try:
                summary = train_and_evaluate(trial_config, run_dir, on_epoch_end=epoch_reporter(trial, say),
                                             print_fn=lambda *a, **k: print(*a, **{**k, "file": log, "flush": True}))
            except TrainingDivergedError as e:
                add_note(trial, f"diverged at step {e.step}")
                raise optuna.TrialPruned(str(e)) from None
            finally:
                trial.set_user_attr("train_s", round(time.perf_counter() - t0, 1))
        if summary.preempted:
            add_note(trial, "preempted")
            stopped.append(trial.number)
            raise _Preempted()
        return float(summary.best_top1)

    return objective


def run_sweep(config: ml_collections.ConfigDict, space: dict, *, n_trials: int, workdir: str | Path,
              study_name: str, storage_url: str | None = None, pruner: str = "median", seed: int = 0,
              heartbeat_interval: int = 30, grace_period: int = 120, base_config: str | None = None,
              say: Callable[[str], None] = print) -> SweepResult:
    """Runs trials of ``space`` over ``config`` until ``n_trials`` have finished, then writes the report.

    Args:
      config: the base recipe, overrides applied; each trial sets the space's fields on a copy.
      space: ``{field: optuna distribution}`` (:func:`flax_resnet.sweep.space.load_space`).
      n_trials: finished trials (COMPLETE + PRUNED) the study should hold; trials finished by
        earlier runs and by other workers count.
      workdir: holds ``trial_<n>/`` run directories, the report and (by default) ``study.db``.
      study_name, storage_url: the study and its storage (default SQLite in ``workdir``).
      pruner: median, halving or none (:func:`make_pruner`). seed: the TPE sampler's seed.
      heartbeat_interval, grace_period: seconds between a trial's heartbeats, and without one
        before its trial is failed and re-queued.
      base_config: the recipe name or path ``config`` came from, for ``best_config.py``.
      say: where progress lines go.

    Raises:
      UserError: optuna missing, storage unreachable, a study started with another space or
        config, or a trial's config refused by the trainer.
    """
    optuna = require_optuna()
    if n_trials < 1:
        raise UserError(f"--trials {n_trials}: give at least 1")
    if heartbeat_interval < 1 or grace_period <= heartbeat_interval:
        raise UserError(f"--heartbeat-interval {heartbeat_interval} --grace-period {grace_period}: give an interval "
                        f"of at least 1 s and a longer grace period (a few intervals: defaults 30 and 120)")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # we print our own line per trial
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create sweep workdir {workdir} ({e.strerror or e}); pass a writable --workdir") from None
    storage = open_storage(storage_url, workdir, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    study = _open_study(optuna, storage, study_name, config, space, make_sampler(seed, n_trials), make_pruner(pruner, trial_epochs(config)))
    _claim_workdir(workdir, study_name, storage_url)
    ran: list[int] = []
    stopped: list[int] = []
    objective = _objective(optuna, study, config, space, workdir, n_trials, say, ran, stopped)
    poll_s = max(1.0, min(10.0, heartbeat_interval / 2))
    waiting = preempted = False
    while True:
        _fail_stale(optuna, study)
        finished, running, queued = _counts(optuna, study)
        if finished >= n_trials:
            break
        if not queued and finished + running >= n_trials:  # the rest are running elsewhere
            if not waiting:
                say(f"{finished} of {n_trials} trials finished, {running} running elsewhere: waiting for them")
                waiting = True
            time.sleep(poll_s)
            continue
        waiting = False
        study.sampler = make_sampler(seed + len(study.get_trials(deepcopy=False)), n_trials)
        count = len(ran)
        study.optimize(objective, n_trials=1, catch=(_Preempted, _Surplus))
        if len(ran) == count:  # a surplus trial: nothing trained
            continue
        done = _trial_numbered(study, ran[-1])
        say(report.trial_line(done))
        if stopped:
            requeue(study, done)
            preempted = True
            break
    rows = report.trial_rows(study)
    table, files = report.write_report(study, rows, workdir, n_trials=n_trials, base_config=base_config,
                                       config=config, say=say)
    best = None
    completed = [r for r in rows if r["state"] == "COMPLETE"]
    if completed:
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": dict(b.params)}
    finished = _counts(optuna, study)[0]
    return SweepResult(study_name, str(workdir), finished, len(ran), preempted, best, table, files)


def _trial_numbered(study, number: int):
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)
