"""Preemption: SIGTERM/SIGINT set a flag that the training loop checks between steps; it then saves
at the current step, waits for the write and exits (every process at the same step)."""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax

from flax_resnet import parallel


class PreemptionGuard:
    """Turns SIGTERM and SIGINT into a request to stop at the next step boundary.

    Use as a context manager around the training loop; call :meth:`should_stop` between
    steps. A second SIGINT (Ctrl-C twice) raises ``KeyboardInterrupt`` at once. Handlers
    are only installed from the main thread (elsewhere the guard never fires), and the
    previous handlers are restored on exit.

    Args:
      sync_every: with several processes, the stop decision is agreed through
        :func:`flax_resnet.parallel.any_process` (a collective) every this many steps
        only; a single process checks its flag at every step for free.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, sync_every: int = 1):
        self.sync_every = max(int(sync_every), 1)
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived in this process."""
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def should_stop(self, step: int) -> bool:
        """Whether every process should stop now (at ``step``): the hook for multi-host agreement."""
        if jax.process_count() == 1:
            return self.requested
        if step % self.sync_every:
            return False
        return parallel.any_process(self.requested)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
