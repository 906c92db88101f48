"""How many steps a loop keeps in flight on XLA:CPU, and the window that keeps to it.

XLA:CPU takes a step's temporaries from host memory when the step is *dispatched*, not when it
starts to run. With JAX's async dispatch a loop queues steps behind the running one, each
holding its own temporaries: ResNet-50 b16's train step (about 2 GB of them) grew the process
from 3.0 to 7.0 GB resident with three steps queued, and paid for the growth in page faults
(3-5 s of system time a step while it lasted; docs/performance.md, "Steps in flight"). So on
CPU a loop bounds the steps dispatched but unfinished:

* one (each dispatch waits for the previous step) where a step's temporaries are large, or
  unknown;
* two (the running step and one queued behind it) where they are at most
  :data:`QUEUE_TEMP_BYTES`: the next dispatch, a few milliseconds of Python, then overlaps the
  running step (ResNet-20 b64: 2-4% of the step in paired A/Bs, at the edge of the noise), for
  one more small block of memory.

Off CPU (GPU, TPU) there is no bound: device memory is planned by the runtime.
"""

from __future__ import annotations

import collections
from typing import Any

import jax

QUEUE_TEMP_BYTES = 512 * 2**20  # a step with at most this much temporary memory may have one queued behind it


def temp_bytes(compiled: Any) -> int | None:
    """The temporary memory XLA planned for ``compiled`` (a ``jax.stages.Compiled``), or None if unknown."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a jitted function (not compiled) or a backend without the analysis
        return None
    size = getattr(analysis, "temp_size_in_bytes", None)
    return None if size is None else int(size)


def steps_in_flight(compiled: Any = None) -> int:
    """The bound a loop keeps on steps dispatched but unfinished: 0 (none) off XLA:CPU; on it 2
    if ``compiled``'s temporaries are at most :data:`QUEUE_TEMP_BYTES`, else (or unknown) 1."""
    if jax.default_backend() != "cpu":
        return 0
    size = temp_bytes(compiled) if compiled is not None else None
    return 2 if size is not None and size <= QUEUE_TEMP_BYTES else 1


class StepWindow:
    """Keeps at most ``limit`` steps in flight (0: no bound).

    Call :meth:`wait` just before dispatching a step (after its batch is fetched, so the fetch
    overlaps the running step) and :meth:`add` with the step's outputs after. Hand :meth:`add`
    outputs that are never donated to a later step (metrics, not the train state): waiting on
    them means the step that made them has finished.
    """

    def __init__(self, limit: int):
        self.limit = int(limit)
        self._outputs: collections.deque = collections.deque()

    def wait(self) -> None:
        while self.limit and len(self._outputs) >= self.limit:
            jax.block_until_ready(self._outputs.popleft())

    def add(self, outputs: Any) -> None:
        if self.limit:
            self._outputs.append(outputs)
