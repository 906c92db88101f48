"""``config.profile_steps``: a ``jax.profiler`` trace of a few train steps, for TensorBoard; :class:`PhaseTimes`.

``"A,B"`` traces the steps that take the state from step ``A`` to step ``B`` (global step
numbers, as in metrics.jsonl); ``"N"`` traces ``N`` steps starting one step after the run
(re)starts, so the first step's compilation stays out of the trace. The trace goes to
``<workdir>/profile/`` (``plugins/profile/<run>/*.xplane.pb``): open it with
``tensorboard --logdir <workdir>/profile`` and the Profile tab (``tensorboard-plugin-profile``).
Each step is marked with ``jax.profiler.StepTraceAnnotation`` so the step view lines up.
"""

from __future__ import annotations

import collections
import contextlib
import time
from pathlib import Path

import jax

from flax_resnet.configs.validate import parse_profile_steps


class StepProfiler:
    """Starts a trace before step ``first`` and stops it once step ``end`` is reached (see module docstring)."""

    def __init__(self, profile_steps, logdir: str | Path, start_step: int = 0):
        self.window = parse_profile_steps(profile_steps, start_step)
        self.logdir = Path(logdir)
        self.active = False

    def step(self, step: int):
        """A context around the step that takes the state from ``step`` to ``step + 1``."""
        if self.window is None:
            return contextlib.nullcontext()
        if not self.active and step == self.window[0]:
            self.logdir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.logdir))
            self.active = True
        if self.active:
            return jax.profiler.StepTraceAnnotation("train", step_num=step)
        return contextlib.nullcontext()

    def after(self, step: int, state) -> None:
        """Stops the trace once the state reached ``end``, after its computations have finished."""
        if self.active and step >= self.window[1]:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()


class PhaseTimes(collections.defaultdict):
    """Seconds spent in each named phase of a run (``eval``, ``checkpoints``): ``with times("eval"): ...``."""

    def __init__(self):
        super().__init__(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] += time.perf_counter() - t0
