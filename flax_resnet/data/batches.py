"""What each batch is: shard readers and the Grain map functions (step -> this process's batch).

One batch is one Grain element (:mod:`flax_resnet.data.pipeline` runs them). *Global*
training batch ``k`` (``B`` examples, the per-process batch times the number of
processes) is a pure function of ``(seed, k, B)``, whatever the number of processes
that share it:

* epoch ``e`` visits the train split (``N`` examples) in the order
  ``np.random.default_rng([seed, e]).permutation(N)``, cut into
  ``steps_per_epoch = N // B`` global batches (the few examples past that are
  dropped for this epoch only);
* process ``p`` of ``n`` reads only rows ``[p*B/n, (p+1)*B/n)`` of each global batch,
  its disjoint slice, and the training loop assembles the global array from the
  slices (``jax.make_array_from_process_local_data``);
* augmentation: crop offsets and flips of fixed-size images are drawn for the whole
  global batch from ``np.random.default_rng([seed, k, 1])`` and sliced the same way;
  variable-size images draw from ``np.random.default_rng([seed, k, row, 1])`` (``row``
  in the global batch).

So 2 processes x 2 devices see exactly the batches of 1 process x 4 devices, a run
can resume on another number of processes, and the iterator's whole state is ``k``:
saving it and building a new iterator at ``k`` continues the identical stream, with
any number of Grain workers. Each process opens the whole split (records are read by
index, which array_record serves at random); fixed-size splits up to
``IN_MEMORY_LIMIT_BYTES`` are decoded once and kept in RAM by every process.

Images come out normalised float32, or with ``uint8=True`` as the augmented uint8 pixels
(what the trainer uses: its jitted steps normalise them on the device, with the same
constants, :func:`flax_resnet.data.augment.normalize_constants`).

Augmentation (:mod:`flax_resnet.data.augment`) runs in numpy (vectorised per batch)
or PIL (per image) inside the Grain map function:

* fixed-size datasets (digits, CIFAR, ...): zero-pad + random crop (+ horizontal
  flip for RGB), from an in-memory copy of the process's shard when it fits; with
  flips off the crop offsets are the same draws, only the mirroring goes;
* variable-size datasets (ImageNet, imagenette, image folders): Inception-style
  random-resized crop + flip for training, resize to ``size/0.875`` and centre crop
  for evaluation, decoded with PIL's JPEG draft mode so a crop is decoded at
  (at least) the resolution it is resized to.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from flax_resnet.data import sources
from flax_resnet.data.augment import (
    as_uint8_hwc,
    center_crop_box,
    crop_flip_draws,
    crop_resize,
    inception_crop_box,
    normalize,
    random_crop_flip,
)
from flax_resnet.data.info import Recipe
from flax_resnet.errors import UserError

IN_MEMORY_LIMIT_BYTES = 4 << 30  # fixed-size shards up to this are decoded once and kept in RAM
_AUG_STREAM = 1  # distinguishes augmentation randomness from the shuffle


class ShardReader:
    """Reads examples ``[lo, hi)`` of one split; picklable, reopens lazily in each process.

    Fixed-size datasets small enough are decoded once into a uint8 array (``array``
    mode); larger fixed-size ones are decoded per batch (``decode``); variable-size
    ones hand the encoded bytes to the map function (``raw``).
    """

    def __init__(self, recipe: Recipe, split: str, lo: int, hi: int, mode: str):
        self.recipe, self.split, self.lo, self.hi, self.mode = recipe, split, lo, hi, mode
        self.__setstate__({})

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_opened", "_images", "_labels", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._opened = self._images = self._labels = None
        self._lock = threading.RLock()  # Grain may call read() from several threads

    @property
    def opened(self) -> sources.OpenedDataset:
        with self._lock:  # opened once, not by each of Grain's threads at the same time
            if self._opened is None:
                self._opened = sources.open_dataset(self.recipe.name, self.recipe.data_dir)
            return self._opened

    def _load_all(self):
        o = self.opened
        n = self.hi - self.lo
        images = np.empty((n, *self.recipe.out_shape), np.uint8)
        labels = np.empty((n,), np.int32)
        for start in range(self.lo, self.hi, 1024):
            stop = min(start + 1024, self.hi)
            for pos, ex in enumerate(o.read(self.split, range(start, stop)), start - self.lo):
                images[pos] = as_uint8_hwc(ex[o.image_key], self.recipe.channels)
                labels[pos] = ex[o.label_key]
        self._images, self._labels = images, labels

    def read(self, indices: np.ndarray) -> tuple[Any, np.ndarray]:
        """Images (uint8 array, or a list of encoded images in ``raw`` mode) and int32 labels."""
        if self.mode == "array":
            with self._lock:
                if self._images is None:
                    self._load_all()
            local = indices - self.lo
            return self._images[local], self._labels[local]
        o = self.opened
        examples = o.read(self.split, indices, raw_images=self.mode == "raw")
        labels = np.asarray([ex[o.label_key] for ex in examples], np.int32)
        if self.mode == "raw":
            return [ex[o.image_key] for ex in examples], labels
        return np.stack([as_uint8_hwc(ex[o.image_key], self.recipe.channels) for ex in examples]), labels


def reader_mode(recipe: Recipe, n: int) -> str:
    """How a :class:`ShardReader` of ``n`` training examples reads: ``raw``, ``array`` or ``decode``."""
    if not recipe.fixed_size:
        return "raw"
    return "array" if n * math.prod(recipe.out_shape) <= IN_MEMORY_LIMIT_BYTES else "decode"


def shard_bounds(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Process ``process_index``'s examples ``[lo, hi)`` of ``n``; validates the index."""
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in [0, {process_count}): pass 0 <= index < count")
    return process_index * n // process_count, (process_index + 1) * n // process_count


class TrainBatch:
    """Grain map function: global step ``k`` -> this process's slice of global training batch ``k``."""

    def __init__(self, reader, recipe, *, seed, batch_size, steps_per_epoch, process_index, process_count, augment,
                 with_index, uint8=False):
        self.reader, self.recipe, self.uint8 = reader, recipe, uint8
        self.seed, self.batch_size, self.steps_per_epoch = seed, batch_size, steps_per_epoch
        self.process_index, self.process_count = process_index, process_count
        self.global_batch_size = batch_size * process_count
        self.augment, self.with_index = augment, with_index
        self._perm = None

    def __getstate__(self):
        return {**self.__dict__, "_perm": None}

    def permutation(self, epoch: int) -> np.ndarray:
        cached = self._perm
        if cached is not None and cached[0] == epoch:
            return cached[1]
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.reader.hi - self.reader.lo)
        self._perm = (epoch, perm)
        return perm

    def _rows(self) -> slice:
        """This process's rows of a global batch."""
        return slice(self.process_index * self.batch_size, (self.process_index + 1) * self.batch_size)

    def indices(self, step: int) -> np.ndarray:
        epoch, j = divmod(step, self.steps_per_epoch)
        batch = self.permutation(epoch)[j * self.global_batch_size : (j + 1) * self.global_batch_size]
        return self.reader.lo + batch[self._rows()]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        idx = self.indices(step)
        images, labels = self.reader.read(idx)
        r = self.recipe
        size = r.out_shape[0]
        if r.fixed_size:
            if self.augment and (r.pad or r.flip):
                rng = np.random.default_rng([self.seed, step, _AUG_STREAM])
                oy, ox, mirrored = crop_flip_draws(rng, self.global_batch_size, r.pad, r.flip)
                rows = self._rows()
                draws = (oy[rows], ox[rows], None if mirrored is None else mirrored[rows])
                images = random_crop_flip(images, rng, r.pad, r.flip, draws=draws)
        elif self.augment:
            first = self._rows().start
            out = []
            for i, im in enumerate(images):
                rng = np.random.default_rng([self.seed, step, first + i, _AUG_STREAM])
                crop = crop_resize(im, lambda w, h, rng=rng: inception_crop_box(w, h, rng), size, r.channels)
                out.append(crop[:, ::-1] if r.flip and rng.random() < 0.5 else crop)
            images = np.stack(out)
        else:
            images = np.stack([crop_resize(im, center_crop_box, size, r.channels) for im in images])
        batch = {"image": np.ascontiguousarray(images) if self.uint8 else normalize(images, r.mean, r.std),
                 "label": labels}
        if self.with_index:
            batch["index"] = idx.astype(np.int64)
        return batch


class EvalBatch:
    """Grain map function: batch ``j`` of this process's eval shard, padded, with a mask."""

    def __init__(self, reader, recipe, batch_size, with_index, uint8=False):
        self.reader, self.recipe, self.batch_size, self.with_index = reader, recipe, batch_size, with_index
        self.uint8 = uint8

    def __call__(self, j: int) -> dict[str, np.ndarray]:
        r, b = self.recipe, self.batch_size
        idx = np.arange(self.reader.lo + j * b, min(self.reader.lo + (j + 1) * b, self.reader.hi))
        image = np.zeros((b, *r.out_shape), np.uint8 if self.uint8 else np.float32)
        label = np.zeros((b,), np.int32)
        mask = np.zeros((b,), np.float32)
        if len(idx):
            images, labels = self.reader.read(idx)
            if not r.fixed_size:
                images = np.stack([crop_resize(im, center_crop_box, r.out_shape[0], r.channels) for im in images])
            image[: len(idx)] = images if self.uint8 else normalize(images, r.mean, r.std)
            label[: len(idx)] = labels
            mask[: len(idx)] = 1.0
        batch = {"image": image, "label": label, "mask": mask}
        if self.with_index:
            full = np.full((b,), -1, np.int64)
            full[: len(idx)] = idx
            batch["index"] = full
        return batch
