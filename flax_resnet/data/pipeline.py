"""Grain iterators: training batches with a saveable position, and one eval pass.

The batches themselves (order, sharding over processes, augmentation) are defined
in :mod:`flax_resnet.data.batches`; this module runs them through Grain, in threads
or worker processes, and keeps the training iterator's position.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import weakref
from collections.abc import Iterator

import grain
import numpy as np

from flax_resnet.data import sources
from flax_resnet.data.batches import EvalBatch, ShardReader, TrainBatch, reader_mode, shard_bounds
from flax_resnet.data.info import Recipe, make_recipe
from flax_resnet.errors import UserError


# ----------------------------------------------------------------------------- grain plumbing
def enable_worker_processes(*_) -> None:
    """Lets this process start Grain worker processes (``num_workers > 0``).

    Grain reads its absl flags while it starts and runs its workers, which fails unless the
    flags were parsed. This marks them parsed (with their defaults) for the rest of the
    process, so it is opt-in: the ``flax-resnet`` command calls it, a script run under
    ``absl.app.run`` does not need it, and a notebook calls it once before training with
    workers. (Grain's workers run it too, in their own processes.)
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def auto_workers(num_workers: int) -> int:
    """``num_workers``, with -1 meaning one Grain worker per CPU core this process may use but one
    (that one runs the training loop and feeds the devices)."""
    if num_workers >= 0:
        return num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def _check_worker_processes(num_workers: int) -> None:
    from absl import flags

    if num_workers > 0 and not flags.FLAGS.is_parsed():
        raise UserError(
            f"num_workers={num_workers} starts Grain worker processes, which read absl flags this process has "
            "not parsed: call flax_resnet.data.enable_worker_processes() once first (the CLI does), or use "
            "num_workers=0")


@contextlib.contextmanager
def _spawn_without_main():
    """Starts Grain's (spawned) workers without re-running the user's ``__main__``.

    The workers only run flax_resnet code, so an unguarded script (no
    ``if __name__ == "__main__":``) must not be re-imported in them.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    if main is not None:
        main.__dict__.pop("__file__", None)  # spawn re-imports __main__ from __file__ or __spec__.name
        main.__spec__ = None
    try:
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


def _grain_iterator(fn, start: int, stop: int, *, num_threads: int, num_workers: int, buffer: int):
    ds = grain.MapDataset.range(start, stop).map(fn)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=buffer))
    if num_workers > 0:
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2),
            worker_init_fn=enable_worker_processes,
        )
    return iter(it_ds)


def _own(batch: dict) -> dict:
    """Plain numpy arrays (batches from Grain workers live in shared memory Grain frees later)."""
    return {k: v if type(v) is np.ndarray else np.array(v) for k, v in batch.items()}


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_iterators():
    """Stop Grain threads/workers before interpreter teardown (avoids noisy __del__ errors)."""
    for it in list(_LIVE):
        with contextlib.suppress(Exception):
            it.close()


def _default_threads(recipe: Recipe, num_workers: int) -> int:
    if recipe.fixed_size:
        return 1  # numpy gather + crop: one thread keeps ahead of the model
    return 1 if num_workers else max(1, min(4, os.cpu_count() or 1))


# ----------------------------------------------------------------------------- train
class TrainIterator:
    """Infinite iterator of training batches; its state is the number of batches taken.

    ``next(it)`` -> ``{"image": float32 [B, H, W, C], "label": int32 [B]}`` (uint8 images with
    ``uint8=True``; plus ``"index"``, the record indices, with ``with_index=True``).
    """

    _STATE_KEYS = ("dataset", "seed", "global_batch_size")  # what the stream depends on

    def __init__(self, batch_fn: TrainBatch, recipe: Recipe, *, num_threads: int, num_workers: int, prefetch: int):
        self._fn = batch_fn
        self._recipe = recipe
        self._num_threads, self._num_workers, self._prefetch = num_threads, num_workers, prefetch
        self.steps_per_epoch: int = batch_fn.steps_per_epoch
        self.batch_size: int = batch_fn.batch_size
        self._step = 0
        self._it = None

    # position
    @property
    def step(self) -> int:
        """Batches returned so far (the global step if the iterator started at 0)."""
        return self._step

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._step // self.steps_per_epoch

    def _identity(self) -> dict:
        f = self._fn
        return {
            "dataset": self._recipe.name,
            "seed": int(f.seed),
            "global_batch_size": int(f.global_batch_size),
            "batch_size": int(f.batch_size),
            "process_index": int(f.process_index),
            "process_count": int(f.process_count),
        }

    def get_state(self) -> dict:
        """JSON-serialisable position: ``{"step", "epoch", "batch_in_epoch", ...identity}``."""
        return {
            "step": self._step,
            "epoch": self.epoch,
            "batch_in_epoch": self._step % self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            **self._identity(),
        }

    def set_state(self, state: dict) -> None:
        """Continues exactly after the batch at which ``state`` was taken."""
        mine = self._identity()
        diff = {k: (state.get(k), mine[k]) for k in self._STATE_KEYS if k in state and state[k] != mine[k]}
        if diff:
            what = ", ".join(f"{k} {a!r} (now {b!r})" for k, (a, b) in diff.items())
            raise UserError(
                f"data iterator state was saved with {what}: resume with the same dataset, seed and global batch "
                "size (per-process batch x processes), or start a fresh run"
            )
        self.close()
        self._step = int(state["step"])

    # iteration
    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            with _spawn_without_main():
                self._it = _grain_iterator(
                    self._fn,
                    self._step,
                    sys.maxsize,
                    num_threads=self._num_threads,
                    num_workers=self._num_workers,
                    buffer=self._prefetch,
                )
                batch = next(self._it)
            _LIVE.add(self._it)
        else:
            batch = next(self._it)
        self._step += 1
        return _own(batch)

    def batch_indices(self, step: int) -> np.ndarray:
        """Record indices of batch ``step`` (no I/O)."""
        return self._fn.indices(step)

    def close(self) -> None:
        """Stops background threads/processes (a later ``next`` restarts them at the same position)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:  # no module globals here: at interpreter exit they may already be None
            self.close()
        except Exception:  # noqa: BLE001 - a finaliser must not raise
            pass


def train_iterator(
    name: str,
    *,
    batch_size: int,
    seed: int,
    data_dir: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
    augment: bool = True,
    num_workers: int = 0,
    image_size: int | None = None,
    num_threads: int | None = None,
    prefetch: int = 4,
    with_index: bool = False,
    flip: bool = True,
    normalize: bool = True,
    uint8: bool = False,
) -> TrainIterator:
    """This process's slices of the global training batches (defined in :mod:`flax_resnet.data.batches`).

    Args:
      name: dataset name (see :mod:`flax_resnet.data.sources`).
      batch_size: per-process batch size; the global batch is ``batch_size * process_count``.
      seed: shuffle and augmentation seed.
      data_dir: TFDS data directory.
      process_index: this process (``jax.process_index()``).
      process_count: number of processes (``jax.process_count()``).
      augment: random crop/flip (off: images only resized/normalised as for eval).
      num_workers: Grain worker processes (0: threads in this process; -1: one per core but
        one, :func:`auto_workers`). Output is identical for any value.
      image_size: output side for variable-size datasets (default 224).
      num_threads: Grain threads per process (default: 1 for fixed-size data, up to
        4 for decoded JPEGs).
      prefetch: batches buffered ahead.
      with_index: add ``"index"`` (int64 record indices) to each batch.
      flip: horizontal flips where the dataset gets them (never on digits); False keeps
        the crops (the same draws) and drops only the mirroring.
      normalize: per-channel normalisation; False: images are ``pixel / 255``.
      uint8: images as uint8 pixels, not normalised: the consumer normalises them (the
        trainer does so on the device, :func:`flax_resnet.training.steps.prepare_images`),
        a quarter of float32's host work and transfer. The pixels and stream are the same.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    num_workers = auto_workers(num_workers)
    _check_worker_processes(num_workers)
    opened = sources.open_dataset(name, data_dir)
    recipe = make_recipe(opened, data_dir, image_size, flip=flip, normalize=normalize)
    n = opened.split_size(opened.train_split)
    shard_bounds(n, process_index, process_count)  # validates the process index
    steps = n // (batch_size * process_count)
    if steps == 0:
        raise UserError(
            f"batch size {batch_size} x {process_count} process(es) exceeds the {n} training examples of "
            f"'{name}': use a smaller batch size"
        )
    reader = ShardReader(recipe, opened.train_split, 0, n, reader_mode(recipe, n))
    fn = TrainBatch(
        reader,
        recipe,
        seed=int(seed),
        batch_size=int(batch_size),
        steps_per_epoch=steps,
        process_index=int(process_index),
        process_count=int(process_count),
        augment=augment,
        with_index=with_index,
        uint8=uint8,
    )
    threads = num_threads if num_threads is not None else _default_threads(recipe, num_workers)
    return TrainIterator(fn, recipe, num_threads=threads, num_workers=num_workers, prefetch=prefetch)


# ----------------------------------------------------------------------------- eval
def num_eval_batches(eval_size: int, batch_size: int, process_count: int = 1) -> int:
    """Batches every process yields in one eval pass (the largest shard, rounded up)."""
    largest_shard = -(-eval_size // process_count)
    return -(-largest_shard // batch_size)


def eval_batches(
    name: str,
    *,
    batch_size: int,
    data_dir: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
    split: str | None = None,
    image_size: int | None = None,
    num_workers: int = 0,
    num_threads: int | None = None,
    with_index: bool = False,
    normalize: bool = True,
    uint8: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the eval split: ``{"image", "label", "mask"}`` batches.

    Process ``p`` of ``n`` reads examples ``[p*N//n, (p+1)*N//n)`` in order; every
    process yields :func:`num_eval_batches` batches, the last ones padded with zero
    images and ``mask`` (float32 [B]) 0, so each example counts exactly once. Never
    augmented; ``normalize=False``: images are ``pixel / 255``, as in training; ``uint8``: the
    pixels, not normalised (as :func:`train_iterator`'s; padding is zeros).
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    num_workers = auto_workers(num_workers)
    _check_worker_processes(num_workers)
    opened = sources.open_dataset(name, data_dir)
    recipe = make_recipe(opened, data_dir, image_size, normalize=normalize)
    split = split or opened.eval_split
    n = opened.split_size(split)
    lo, hi = shard_bounds(n, process_index, process_count)
    reader = ShardReader(recipe, split, lo, hi, "raw" if not recipe.fixed_size else "decode")
    fn = EvalBatch(reader, recipe, batch_size, with_index, uint8)
    threads = num_threads if num_threads is not None else _default_threads(recipe, num_workers)
    total = num_eval_batches(n, batch_size, process_count)

    def generate():
        if total == 0:
            return
        with _spawn_without_main():
            it = _grain_iterator(fn, 0, total, num_threads=threads, num_workers=num_workers, buffer=4)
            first = next(it)
        _LIVE.add(it)
        try:
            yield _own(first)
            for batch in it:
                yield _own(batch)
        finally:
            if hasattr(it, "close"):
                it.close()

    return generate()
