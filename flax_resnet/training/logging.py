"""Run outputs: ``metrics.jsonl``, TensorBoard events, a PNG of the curves, progress bars.

Only process 0 writes or prints; on other processes every method is a no-op.

``metrics.jsonl`` holds one JSON object per line, with a ``kind``:

* ``"train"`` every ``log_every_steps``: ``step, epoch, loss, top1, [top5], lr, grad_norm, images_per_sec``
  (means over the steps since the previous line);
* ``"eval"`` once per epoch: ``step, epoch, train_loss, train_top1, test_loss, test_top1,
  [test_top5], test_count, elapsed_s``;
* ``"resume"`` when a run restarts from a checkpoint: ``step, checkpoint``. The file is only
  ever appended to: records after a ``resume`` at step ``s`` supersede earlier records with a
  step above ``s`` (steps redone after a crash). In ``train`` records of a resumed epoch, the
  epoch's ``train_loss`` in ``eval`` covers only the steps run since the resume.
"""

from __future__ import annotations

import errno
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import jax

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


def is_main_process() -> bool:
    return jax.process_index() == 0


def _plain(v: Any) -> Any:
    try:
        return v.item()  # numpy / jax scalars
    except AttributeError:
        return v


def _summary_writer_class():
    """tensorboardX's ``SummaryWriter``, imported without PyTorch.

    Where torch is installed, importing tensorboardX imports it (seconds of start-up) only so
    that torch tensors may be logged in place of arrays; we log floats and text. Unless torch
    or tensorboardX is loaded already, ``import torch`` fails for the duration of the import.
    """
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # an ImportError for `import torch` (the import system's own convention)
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", False) is None:
            del sys.modules["torch"]
    return SummaryWriter


class RunLogger:
    """Appends records to ``workdir/metrics.jsonl`` and mirrors scalars to TensorBoard.

    TensorBoard event files go straight into ``workdir`` (``tensorboard --logdir WORKDIR``),
    scalars tagged ``train/<name>`` and ``eval/<name>``.
    """

    def __init__(self, workdir: str | Path, *, enabled: bool | None = None, tensorboard: bool = True):
        self.workdir = Path(workdir)
        self.enabled = is_main_process() if enabled is None else enabled
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.workdir / METRICS_FILE, "a", buffering=1)
        if tensorboard:
            self._tb = _summary_writer_class()(logdir=str(self.workdir), flush_secs=10)

    def log(self, kind: str, step: int, record: dict[str, Any]) -> None:
        """Writes one record; numeric fields also go to TensorBoard as ``kind/name``."""
        if not self.enabled:
            return
        row = {"kind": kind, "step": int(step), **{k: _plain(v) for k, v in record.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, int(step))

    def log_text(self, tag: str, text: str) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, 0)

    def close(self) -> None:
        """Flushes and closes both files. A full disk here is not reported again: the checkpoint
        that needed the space has said so in one line already (or will, as the run stops)."""
        try:
            if self._file is not None:
                self._file, f = None, self._file
                f.close()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
        finally:
            if self._tb is not None:
                self._tb, tb = None, self._tb
                try:
                    tb.close()
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(workdir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of ``workdir/metrics.jsonl`` (optionally only one ``kind``)."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]


def _import_plotting() -> None:
    from matplotlib.backends import backend_agg  # noqa: F401
    from matplotlib import figure  # noqa: F401


def warm_plotting() -> None:
    """Imports what :func:`plot_curves` needs on a daemon thread (about 0.5 s of Python on a 2-core
    machine): started while the last epoch's steps run on XLA's threads, the import is done by the
    time the curves are drawn instead of following the last epoch."""
    if is_main_process():
        threading.Thread(target=_import_plotting, name="flax_resnet_import_matplotlib", daemon=True).start()


def plot_curves(workdir: str | Path, title: str = "") -> Path | None:
    """Draws train/test loss and top-1 per epoch from ``metrics.jsonl`` into ``curves.png``."""
    if not is_main_process():
        return None
    rows = read_metrics(workdir, "eval")
    if not rows:
        return None
    # A resumed run may repeat an epoch: keep the last record of each.
    by_epoch = {r["epoch"]: r for r in rows}
    rows = [by_epoch[e] for e in sorted(by_epoch)]
    # matplotlib's object API, not pyplot: pyplot's import (its backend machinery) is skipped
    # and no global figure registry is touched, so nothing needs closing.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    # Fixed margins: tight_layout measures every tick label's extent, half the time of drawing.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.84 if title else 0.9, wspace=0.22)
    for key, label in (("train_loss", "train"), ("test_loss", "test")):
        ax_loss.plot(epochs, [r.get(key) for r in rows], marker="o", ms=3, label=label)
    for key, label in (("train_top1", "train"), ("test_top1", "test")):
        ax_acc.plot(epochs, [100.0 * r[key] if r.get(key) is not None else None for r in rows],
                    marker="o", ms=3, label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    out = Path(workdir) / CURVES_FILE
    fig.savefig(out, dpi=100)
    return out


class Progress:
    """A per-epoch progress bar (tqdm on stderr), silent on processes other than 0."""

    def __init__(self, total: int, *, initial: int = 0, desc: str = "", enabled: bool | None = None):
        self.enabled = is_main_process() if enabled is None else enabled
        self._bar = None
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr,
                             dynamic_ncols=True, leave=True, mininterval=0.5)

    def update(self, n: int = 1, **postfix) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Throughput:
    """Images per second between calls of :meth:`mark` (which follow a device sync)."""

    def __init__(self):
        self._t = time.perf_counter()
        self._n = 0

    def add(self, images: int) -> None:
        self._n += images

    def mark(self) -> float:
        now = time.perf_counter()
        rate = self._n / max(now - self._t, 1e-9)
        self._t, self._n = now, 0
        return rate


def mean_metrics(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Means of each key over a list of fetched scalar metric dicts."""
    rows = list(rows)
    if not rows:
        return {}
    return {k: float(sum(float(r[k]) for r in rows) / len(rows)) for k in rows[0]}
