"""The training loop's checkpoint saves, started on a worker thread so the next epoch need not wait.

An Orbax asynchronous save still blocks its caller for its set-up: the arrays' host copies,
directories, metadata, its threads' start (about 0.1 s per save of a ResNet-20 state on a
2-core machine). :class:`SaveQueue` hands each save to one worker thread, in order, with its own
copy of the state (the train step donates the state it is given), so the loop goes straight on
to the next step; the write itself is Orbax's, as before. A best checkpoint of a step queued for
``checkpoints/`` is copied from its directory (:meth:`Checkpointer.save_best`): no copy of the
state for it. A failure in the worker (a full disk: :class:`DiskFullError`)
is raised on the loop's thread at the next save, :meth:`SaveQueue.wait` or query, as a
failure in Orbax's own threads is; nothing already on disk is touched.

Only with ``async_checkpointing`` on a single process: several processes keep the saves on
the loop's thread, where Orbax's cross-process barriers come in the same order everywhere.
"""

from __future__ import annotations

import concurrent.futures

import jax
import jax.numpy as jnp

from flax_resnet.checkpoint import Checkpointer


@jax.jit
def _own_copy(tree):
    """``tree`` with its arrays in fresh buffers (one program, not one dispatch per leaf): the next
    train step donates (frees) the originals."""
    return jax.tree.map(jnp.copy, tree)


class SaveQueue:
    """:class:`Checkpointer`'s ``save``/``save_best``/``wait`` for the loop, on a worker thread
    when ``background`` (else called directly)."""

    def __init__(self, ckpt: Checkpointer, *, background: bool):
        self.ckpt = ckpt
        self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flax_resnet_save")
                      if background else None)
        self._pending: list[concurrent.futures.Future] = []
        self._queued_latest: set[int] = set()

    def _settle(self, *, block: bool) -> None:
        """Raises the first failure among finished saves; with ``block``, waits for all first."""
        if block:
            concurrent.futures.wait(self._pending)
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for f in done:
            f.result()

    def _submit(self, fn, *args, **kwargs) -> None:
        if self._pool is None:
            fn(*args, **kwargs)
            return
        self._settle(block=False)
        self._pending.append(self._pool.submit(fn, *args, **kwargs))

    def is_saved(self, step: int) -> bool:
        """Whether ``checkpoints/`` holds ``step`` or a save of it is queued."""
        if step in self._queued_latest:
            return True
        self._settle(block=True)
        return self.ckpt.is_saved(step)

    def save(self, step: int, state, data_state, config: dict, meta: dict | None = None, *, force: bool = False):
        if self._pool is not None:
            state = _own_copy(state)
            if force or self.ckpt.should_save(step):
                self._queued_latest.add(step)
        self._submit(self.ckpt.save, step, state, data_state, config, meta, force=force)

    def save_best(self, step: int, state, data_state, config: dict, meta: dict | None, test_top1: float):
        if self._pool is not None and step not in self._queued_latest:  # else only its size is read
            state = _own_copy(state)
        self._submit(self.ckpt.save_best, step, state, data_state, config, meta, test_top1)

    def latest_step(self) -> int | None:
        """The newest step on disk once queued saves have run (their failures are left to :meth:`wait`)."""
        concurrent.futures.wait(self._pending)
        return self.ckpt.latest_step()

    def wait(self) -> None:
        """Every queued save started and on disk; raises the first failure among them."""
        self._settle(block=True)
        self.ckpt.wait()

    def close(self) -> None:
        """Lets queued saves finish (their failures are the caller's to have seen through :meth:`wait`)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
