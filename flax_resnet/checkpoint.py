"""Orbax checkpointing: the one place that reads and writes checkpoints, and handles preemption.

Layout under a run's workdir::

    checkpoints/<step>/{state,data,config,meta}       newest ``max_to_keep`` (periodic + epoch ends)
    checkpoints_best/<step>/{state,data,config,meta}  the best by test top-1 (one kept), with
                                                      its metrics (``metrics/metrics``)
    checkpoints*/<name>.corrupt                        a bad checkpoint set aside (see below)

Each checkpoint is an ``ocp.args.Composite`` of

* ``state``  the :class:`~flax_resnet.training.state.TrainState` pytree (params, batch_stats,
  opt_state, step, rng), Orbax's PyTree format (:func:`~flax_resnet.checkpoint_files.state_handler`);
* ``data``   the data iterator's JSON state (so a resumed run continues the same stream);
* ``config`` the run's config as JSON (so ``evaluate``/``predict`` rebuild the model);
* ``meta``   a JSON dict of facts about the run (dataset info: classes, image shape, class names;
  epoch and test top-1 at the time of the save).

Saves are asynchronous: ``save`` returns once arrays are copied off the devices, and the write
finishes in the background (:meth:`Checkpointer.wait` / :meth:`close`). A best checkpoint of a step
``checkpoints/`` holds is a copy of that finished directory (:mod:`flax_resnet.checkpoint_files`).
Restores take an *abstract* target (``jax.ShapeDtypeStruct`` with shardings), so a run
saved on 8 devices restores on 1 and vice versa.

Fault tolerance (:meth:`Checkpointer.resume`): a step is written into
``<step>.orbax-checkpoint-tmp-*`` and renamed when complete, so a save cut short (SIGKILL, power
loss) is never mistaken for a checkpoint. Resume checks each finalised step's structure, then
restores it, newest first of either kind; the bad ones are renamed ``<name>.corrupt`` (never
deleted) once a good one is found. Only damage counts, and a full disk is one error
(:mod:`flax_resnet.checkpoint_checks`).

Preemption (SIGTERM/SIGINT -> save and stop) is :mod:`flax_resnet.training.preemption`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Literal

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from flax_resnet import checkpoint_checks as checks
from flax_resnet import checkpoint_files as files
from flax_resnet.checkpoint_checks import (ITEMS, CheckpointReadError, DiskFullError,  # noqa: F401
                                           UnreadableCheckpointError, structural_problem)
from flax_resnet.checkpoint_files import BEST_DIR, LATEST_DIR, has_checkpoint  # noqa: F401
from flax_resnet.errors import UserError

BEST_METRIC = "test_top1"

Which = Literal["latest", "best"]
WarnFn = Callable[[str], None]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_absl(enabled: bool):
    logger = logging.getLogger("absl")
    level = logger.level
    if enabled:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _options(max_to_keep, *, best=False, async_=True, read_only=False) -> ocp.CheckpointManagerOptions:
    return ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep,
        save_interval_steps=0 if read_only else 1,  # the interval is applied in Checkpointer.should_save
        best_fn=(lambda m: m[BEST_METRIC]) if best else None,
        best_mode="max",
        keep_checkpoints_without_metrics=not best,
        enable_async_checkpointing=async_,
        create=not read_only,
        read_only=read_only,
        # Do not read every step's metadata when opening: a damaged metrics file must not
        # stop the manager from opening (resume() checks and sets such steps aside).
        lightweight_initialize=True,
        # Both managers save at the same step at an epoch end; with several processes their
        # barriers (named after the step) would collide ("Barrier ... is already ongoing").
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=BEST_DIR if best else LATEST_DIR),
    )


@dataclasses.dataclass
class Restored:
    """What :meth:`Checkpointer.resume` found: the newest good checkpoint, restored."""

    step: int
    which: str  # "latest" or "best"
    path: Path
    state: Any
    data_state: dict
    config: dict
    meta: dict


class Checkpointer:
    """Saves and restores a run's checkpoints (newest and best) under ``workdir``.

    Args:
      workdir: the run directory.
      save_every_steps: periodic saves every this many steps (0: only when forced,
        e.g. at epoch ends).
      max_to_keep: newest checkpoints kept in ``checkpoints/``.
      async_save: write in a background thread.
      read_only: open for restoring only (evaluate/predict); creates and renames nothing.
      warn: where warnings go (default: this module's logger).
    """

    def __init__(self, workdir: str | Path, *, save_every_steps: int = 0, max_to_keep: int = 3,
                 async_save: bool = True, read_only: bool = False, warn: WarnFn | None = None):
        self.workdir = Path(workdir).absolute()
        self.save_every_steps = int(save_every_steps or 0)
        self.read_only = read_only
        self._warn = warn or log.warning
        latest_opts = _options(max_to_keep, async_=async_save, read_only=read_only)
        best_opts = _options(1, best=True, async_=async_save, read_only=read_only)
        with _quiet_absl(read_only):  # orbax warns that a read-only directory is read-only
            self._latest, self._best = (
                ocp.CheckpointManager(self.workdir / d, options=o, item_names=ITEMS,
                                      item_handlers={"state": files.state_handler()})
                for d, o in ((LATEST_DIR, latest_opts), (BEST_DIR, best_opts)))
        self._best_value = self._read_best_metric()
        self._saving: dict[str, int] = {}  # manager -> bytes of the state it is writing
        self._disk_full: DiskFullError | None = None
        self._log_filter = checks.DropDiskFullReports()
        logging.getLogger("absl").addFilter(self._log_filter)

    # ------------------------------------------------------------------ queries
    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def best_step(self) -> int | None:
        return self._best.latest_step()

    def best_metric(self) -> float | None:
        """Test top-1 of the best checkpoint so far (including a save still in flight)."""
        return self._best_value

    def _read_best_metric(self) -> float | None:
        step = self._best.latest_step()
        try:
            metrics = self._best.metrics(step) if step is not None else None
        except Exception:  # a damaged metrics file: resume() sets the step aside
            return None
        return None if not metrics else float(metrics[BEST_METRIC])

    def _manager(self, which: Which):
        if which not in ("latest", "best"):
            raise UserError(f"unknown checkpoint {which!r}; choose 'latest' or 'best'")
        return self._latest if which == "latest" else self._best

    def step_for(self, which: Which = "latest") -> int | None:
        """Newest step of ``which``; falls back to the other kind when that one is empty."""
        step = self._manager(which).latest_step()
        if step is None:
            step = self._manager("best" if which == "latest" else "latest").latest_step()
        return step

    def step_dir(self, which: Which, step: int) -> Path:
        return self.workdir / (LATEST_DIR if which == "latest" else BEST_DIR) / str(step)

    # ------------------------------------------------------------------ saving
    @staticmethod
    def _args(state, data_state: dict | None, config: dict, meta: dict | None):
        return ocp.args.Composite(
            state=files.save_args(state),
            data=ocp.args.JsonSave(data_state or {}),
            config=ocp.args.JsonSave(config),
            meta=ocp.args.JsonSave(meta or {}),
        )

    def should_save(self, step: int) -> bool:
        """True on the periodic save steps (``save_every_steps`` > 0)."""
        return bool(self.save_every_steps) and step % self.save_every_steps == 0

    def is_saved(self, step: int) -> bool:
        """Whether ``checkpoints/`` already holds (or is writing) ``step``."""
        return step in self._latest.all_steps()

    def save(self, step: int, state, data_state: dict | None, config: dict, meta: dict | None = None, *,
             force: bool = False) -> bool:
        """Saves to ``checkpoints/`` on a periodic step, or always with ``force`` (epoch end, preemption).

        A step that is already saved is skipped. Returns whether a save started.
        """
        if self.is_saved(step):
            return False
        if not force and not self.should_save(step):
            return False
        with self._space_checked(LATEST_DIR, state):
            return self._latest.save(step, args=self._args(state, data_state, config, meta), force=True)

    def save_best(self, step: int, state, data_state: dict | None, config: dict, meta: dict | None,
                  test_top1: float) -> bool:
        """Saves to ``checkpoints_best/`` when ``test_top1`` beats the best so far.

        Where ``checkpoints/`` holds ``step`` (the epoch end saved this same state first), the best
        is a copy of that directory once it is finished, and the other arguments are not written again.
        """
        best = self.best_metric()
        if (best is not None and test_top1 <= best) or step in self._best.all_steps():
            return False
        metrics = {BEST_METRIC: float(test_top1)}
        with self._space_checked(BEST_DIR, state):
            if self.is_saved(step):
                self._copy_to_best(step, metrics)
                started = True
            else:
                started = self._best.save(step, args=self._args(state, data_state, config, meta), metrics=metrics,
                                          force=True)
        if started:
            self._best_value = float(test_top1)
        return started

    def _copy_to_best(self, step: int, metrics: dict) -> None:
        """``checkpoints/<step>`` copied to ``checkpoints_best/<step>`` once written; the older best
        removed (one kept, as the best manager keeps one). Process 0 copies, every process waits."""
        self._latest.wait_until_finished()
        self._best.wait_until_finished()
        if jax.process_index() == 0:
            files.copy_step(self.step_dir("latest", step), self.step_dir("best", step), metrics)
            for old in set(self._best.all_steps()) - {step}:
                shutil.rmtree(self.step_dir("best", old))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"flax_resnet:best_copied_{step}")
        self._best.reload()

    @contextlib.contextmanager
    def _space_checked(self, kind: str | None, state=None):
        """Raises one :class:`DiskFullError` for a save that cannot fit or failed for lack of space.

        Before a save of ``state`` into ``kind`` (a directory name) starts, the free space must
        hold it and any save still in flight: a save that runs out of space fails in Orbax's
        threads, which report it noisily while the run goes on. A failure there anyway (the
        disk filled meanwhile) is raised here by Orbax at the next save or wait.
        """
        if self._disk_full is not None:
            raise self._disk_full
        if kind is not None and state is not None:
            size = sum(int(x.nbytes) for x in jax.tree.leaves(state) if hasattr(x, "nbytes")) + checks.METADATA_BYTES
            in_flight = sum(n for k, n in self._saving.items() if self._manager(k).is_saving_in_progress())
            free = checks.free_bytes(self.workdir)
            if free is not None and free < size + in_flight:
                self._disk_full = self._full_error(size + in_flight, free)
                raise self._disk_full
        try:
            yield
        except Exception as e:
            if not checks.is_disk_full(e):
                raise
            self._disk_full = self._full_error(max(self._saving.values(), default=0), checks.free_bytes(self.workdir) or 0)
            raise self._disk_full from e
        if kind is not None and state is not None:
            self._saving["latest" if kind == LATEST_DIR else "best"] = size

    def _full_error(self, need: int, free: int) -> DiskFullError:
        good = self._latest.latest_step()
        return DiskFullError(
            f"no space left for a checkpoint in {self.workdir}: it needs about {need / 2**20:.1f} MiB and "
            f"{free / 2**20:.1f} MiB are free; free some space (or move the run to a larger disk) and rerun the same "
            "command to resume" + (f" from step {good}, the last complete checkpoint" if good is not None else ""))

    # ------------------------------------------------------------------ restoring
    def restore_config(self, which: Which = "latest", step: int | None = None) -> tuple[int, dict, dict]:
        """``(step, config dict, meta dict)`` of a checkpoint, without reading arrays."""
        mngr, step = self._resolve(which, step)
        try:
            out = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                             meta=ocp.args.JsonRestore()))
        except Exception as e:
            if checks.passing_read_error(e):
                raise CheckpointReadError(checks.read_error_message(mngr.directory / str(step), e)) from e
            raise UnreadableCheckpointError(
                f"checkpoint {mngr.directory / str(step)} has an unreadable config ({checks.first_line(e)}); "
                f"use another checkpoint (--checkpoint best/latest) or retrain"
            ) from e
        return step, dict(out["config"]), dict(out["meta"] or {})

    def restore(self, abstract_state, which: Which = "latest", step: int | None = None
                ) -> tuple[Any, dict, dict, dict]:
        """Restores ``(state, data_state, config, meta)``, placing arrays as ``abstract_state`` says.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings (see
        :func:`flax_resnet.training.state.abstract_train_state`).

        Raises:
          UnreadableCheckpointError: the files are damaged or do not fit ``abstract_state``
            (a checkpoint of another model).
        """
        mngr, step = self._resolve(which, step)
        try:
            out = mngr.restore(step, args=ocp.args.Composite(
                state=files.restore_args(abstract_state), data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        except Exception as e:
            if checks.passing_read_error(e):
                raise CheckpointReadError(checks.read_error_message(mngr.directory / str(step), e)) from e
            raise UnreadableCheckpointError(
                f"cannot restore checkpoint {mngr.directory / str(step)}: it is damaged or was saved by "
                f"an incompatible model ({checks.first_line(e)}); use a checkpoint of this model, or retrain"
            ) from e
        return out["state"], dict(out["data"] or {}), dict(out["config"]), dict(out["meta"] or {})

    def _resolve(self, which: Which, step: int | None):
        mngr = self._manager(which)
        if step is None:
            step = mngr.latest_step()
            if step is None:  # e.g. "best" before any eval: use the other one
                other = self._manager("best" if which == "latest" else "latest")
                if other.latest_step() is not None:
                    mngr, step = other, other.latest_step()
        if step is None:
            raise UserError(
                f"no checkpoint in {self.workdir}; train first with: flax-resnet train --workdir {self.workdir}"
            )
        if step not in mngr.all_steps():
            raise UserError(f"no checkpoint at step {step} in {mngr.directory}; available: {list(mngr.all_steps())}")
        return mngr, step

    # ------------------------------------------------------------------ resuming
    def incomplete_dirs(self) -> list[Path]:
        """Temporary directories of saves that never finished (ignored by Orbax)."""
        return files.incomplete_dirs(self.workdir / d for d in (LATEST_DIR, BEST_DIR))

    def resume(self, abstract_state, check: Callable[[dict, dict], None] | None = None) -> Restored | None:
        """Restores the newest *good* checkpoint of either kind, or ``None`` when there is none.

        Candidates are tried newest first (``checkpoints/`` before ``checkpoints_best/`` at
        the same step): a structural check, then ``check(config, meta)`` (which raises a
        :class:`UserError` on a config mismatch: that stops the resume and renames
        nothing), then the restore itself. Bad candidates and incomplete saves are renamed
        ``<name>.corrupt`` with a warning, but only once a good checkpoint has been found;
        if none is, a :class:`UserError` lists the problems and nothing is renamed.
        """
        if self.read_only:
            raise ValueError("resume() needs a writable Checkpointer")
        incomplete = [(p, "incomplete save (interrupted before it finished)") for p in self.incomplete_dirs()]
        bad: list[tuple[Path, str]] = []
        candidates = sorted(((step, which) for which in ("latest", "best") for step in self._manager(which).all_steps()),
                            key=lambda c: (-c[0], c[1] != "latest"))
        for step, which in candidates:
            path = self.step_dir(which, step)
            problem = structural_problem(path, best=which == "best")
            if problem is None:
                try:
                    _, config, meta = self.restore_config(which, step)
                except UnreadableCheckpointError as e:
                    problem = f"unreadable config ({checks.first_line(e.__cause__ or e)})"
            if problem is None:
                if check is not None:
                    check(config, meta)
                try:
                    state, data_state, config, meta = self.restore(abstract_state, which, step)
                except UnreadableCheckpointError as e:
                    problem = f"cannot restore it ({checks.first_line(e.__cause__ or e)})"
            if problem is not None:
                bad.append((path, problem))
                continue
            self._set_aside(bad + incomplete, resumed=path)
            return Restored(step, which, path, state, data_state, config, meta)
        if bad:  # finalised checkpoints exist but none is readable: touch nothing
            listing = "; ".join(f"{p.parent.name}/{p.name}: {why}" for p, why in bad)
            raise UserError(f"no readable checkpoint in {self.workdir} ({listing}); move the damaged ones away "
                            f"or pass a fresh --workdir")
        self._set_aside(incomplete, resumed=None)  # only interrupted first saves: start afresh
        return None

    def _set_aside(self, bad: list[tuple[Path, str]], resumed: Path | None) -> None:
        if not bad:
            return
        for path, why in bad:
            target = files.set_aside(path, rename=jax.process_index() == 0)
            where = f"resuming from {resumed.parent.name}/{resumed.name}" if resumed else "starting afresh"
            self._warn(f"bad checkpoint {path}: {why}; moved it to {target.name}, {where}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("flax_resnet:checkpoints_set_aside")
        self._latest.reload()
        self._best.reload()
        self._best_value = self._read_best_metric()

    # ------------------------------------------------------------------ lifecycle
    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk (:class:`DiskFullError` if one could not be)."""
        with self._space_checked(None):
            self._latest.wait_until_finished()
            self._best.wait_until_finished()

    def close(self) -> None:
        try:
            for mngr in (self._latest, self._best):
                try:
                    mngr.close()
                except Exception as e:  # a full disk was reported already (or is reported by the caller's wait)
                    if not checks.is_disk_full(e):
                        raise
        finally:
            logging.getLogger("absl").removeFilter(self._log_filter)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

