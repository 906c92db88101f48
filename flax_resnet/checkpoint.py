"""Orbax checkpointing: the one place that reads and writes checkpoints.

Layout under a run's workdir::

    checkpoints/<step>/{state,data,config,meta}       newest ``max_to_keep`` (periodic + epoch ends)
    checkpoints_best/<step>/{state,data,config,meta}  the best by test top-1 (one kept)

Each checkpoint is an ``ocp.args.Composite`` of

* ``state``  the :class:`~flax_resnet.training.state.TrainState` pytree (params,
  batch_stats, opt_state, step, rng) via ``StandardSave``;
* ``data``   the data iterator's JSON state (so a resumed run continues the same stream);
* ``config`` the run's config as JSON (so ``evaluate``/``predict`` rebuild the model);
* ``meta``   a JSON dict of facts about the run (dataset info: classes, image shape, class
  names; epoch and test top-1 at the time of the save).

Saves are asynchronous: ``save`` returns once arrays are copied off the devices, and the
write finishes in the background (call :meth:`Checkpointer.wait` / :meth:`close`).
Restores take an *abstract* target (``jax.ShapeDtypeStruct`` with shardings), so a run
saved on 8 devices restores on 1 and vice versa.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Literal

import orbax.checkpoint as ocp

from flax_resnet.errors import UserError

LATEST_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"
BEST_METRIC = "test_top1"

Which = Literal["latest", "best"]


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
    )


class Checkpointer:
    """Saves and restores a run's checkpoints (newest and best) under ``workdir``.

    Args:
      workdir: the run directory.
      save_every_steps: periodic saves every this many steps (0: only when forced,
        e.g. at epoch ends).
      max_to_keep: newest checkpoints kept in ``checkpoints/``.
      async_save: write in a background thread.
      read_only: open for restoring only (evaluate/predict); creates nothing.
    """

    def __init__(self, workdir: str | Path, *, save_every_steps: int = 0, max_to_keep: int = 3,
                 async_save: bool = True, read_only: bool = False):
        self.workdir = Path(workdir).absolute()
        self.save_every_steps = int(save_every_steps or 0)
        names = ("state", "data", "config", "meta")
        latest_opts = _options(max_to_keep, async_=async_save, read_only=read_only)
        best_opts = _options(1, best=True, async_=async_save, read_only=read_only)
        with _quiet_absl(read_only):  # orbax warns that a read-only directory is read-only
            self._latest = ocp.CheckpointManager(self.workdir / LATEST_DIR, options=latest_opts, item_names=names)
            self._best = ocp.CheckpointManager(self.workdir / BEST_DIR, options=best_opts, item_names=names)
        self._best_value = self._read_best_metric()

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
        metrics = self._best.metrics(step) if step is not None else None
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

    # ------------------------------------------------------------------ saving
    @staticmethod
    def _args(state, data_state: dict | None, config: dict, meta: dict | None):
        return ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            config=ocp.args.JsonSave(config),
            meta=ocp.args.JsonSave(meta or {}),
        )

    def should_save(self, step: int) -> bool:
        """True on the periodic save steps (``save_every_steps`` > 0)."""
        return bool(self.save_every_steps) and step % self.save_every_steps == 0

    def save(self, step: int, state, data_state: dict | None, config: dict, meta: dict | None = None, *,
             force: bool = False) -> bool:
        """Saves to ``checkpoints/`` on a periodic step, or always with ``force`` (epoch end).

        A step that is already saved is skipped. Returns whether a save started.
        """
        if step in self._latest.all_steps():
            return False
        if not force and not self.should_save(step):
            return False
        return self._latest.save(step, args=self._args(state, data_state, config, meta), force=True)

    def save_best(self, step: int, state, data_state: dict | None, config: dict, meta: dict | None,
                  test_top1: float) -> bool:
        """Saves to ``checkpoints_best/`` when ``test_top1`` beats the best so far."""
        best = self.best_metric()
        if (best is not None and test_top1 <= best) or step in self._best.all_steps():
            return False
        started = self._best.save(
            step, args=self._args(state, data_state, config, meta), metrics={BEST_METRIC: float(test_top1)}, force=True
        )
        if started:
            self._best_value = float(test_top1)
        return started

    # ------------------------------------------------------------------ restoring
    def restore_config(self, which: Which = "latest", step: int | None = None) -> tuple[int, dict, dict]:
        """``(step, config dict, meta dict)`` of a checkpoint, without reading arrays."""
        mngr, step = self._resolve(which, step)
        out = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                         meta=ocp.args.JsonRestore()))
        return step, dict(out["config"]), dict(out["meta"] or {})

    def restore(self, abstract_state, which: Which = "latest", step: int | None = None
                ) -> tuple[Any, dict, dict, dict]:
        """Restores ``(state, data_state, config, meta)``, placing arrays as ``abstract_state`` says.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings (see
        :func:`flax_resnet.training.state.abstract_train_state`).
        """
        mngr, step = self._resolve(which, step)
        out = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
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

    # ------------------------------------------------------------------ lifecycle
    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self._latest.close()
        self._best.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def has_checkpoint(workdir: str | Path) -> bool:
    """Whether ``workdir`` holds any finished checkpoint (without opening a manager)."""
    root = Path(workdir)
    return any(
        p.is_dir() and p.name.isdigit()
        for d in (root / LATEST_DIR, root / BEST_DIR) if d.is_dir() for p in d.iterdir()
    )
