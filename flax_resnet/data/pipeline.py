"""The input pipeline: prepared dataset -> Grain -> host-local numpy batches.

One batch is one Grain element. *Global* training batch ``k`` (``B`` examples, the
per-process batch times the number of processes) is a pure function of
``(seed, k, B)``, whatever the number of processes that share it:

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

Augmentation runs in numpy (vectorised per batch) or PIL (per image) inside the
Grain map function:

* fixed-size datasets (digits, CIFAR, ...): zero-pad + random crop (+ horizontal
  flip for RGB), from an in-memory copy of the process's shard when it fits;
* variable-size datasets (ImageNet, imagenette, image folders): Inception-style
  random-resized crop + flip for training, resize to ``size/0.875`` and centre crop
  for evaluation, decoded with PIL's JPEG draft mode so a crop is decoded at
  (at least) the resolution it is resized to.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import io
import math
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from flax_resnet.data import sources
from flax_resnet.errors import UserError

# ----------------------------------------------------------------------------- constants
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-channel mean/std of the *train* split, on the 0-1 scale.
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": (IMAGENET_MEAN, IMAGENET_STD),
    "imagenette": (IMAGENET_MEAN, IMAGENET_STD),
    "folder": (IMAGENET_MEAN, IMAGENET_STD),  # folders are for fine-tuning ImageNet models
    "digits": ((0.3061,), (0.3240,)),  # computed from the digits train split (tests check it)
}
DEFAULT_IMAGE_SIZE = 224  # variable-size datasets
EVAL_CROP_FRACTION = 0.875  # 224 / 256
IN_MEMORY_LIMIT_BYTES = 4 << 30  # fixed-size shards up to this are decoded once and kept in RAM
_AUG_STREAM = 1  # distinguishes augmentation randomness from the shuffle


# ----------------------------------------------------------------------------- info
@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the training loop need to know about a dataset."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C) of the batches fed to the model
    train_size: int
    eval_size: int
    eval_split: str
    class_names: tuple[str, ...]
    mean: tuple[float, ...] = ()  # per-channel normalisation (0-1 scale)
    std: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """How to turn stored examples of one dataset into model batches."""

    name: str
    data_dir: str
    fixed_size: bool  # stored images all have out_shape: numpy crop/flip
    out_shape: tuple[int, int, int]
    pad: int  # fixed-size: translation range (pixels each side)
    flip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return self.out_shape[2]


def _normalization(name: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    base = sources.base_name(name)
    if base in NORMALIZATION:
        return NORMALIZATION[base]
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * channels, (0.25,) * channels


def _recipe(opened: sources.OpenedDataset, data_dir: str | None, image_size: int | None) -> _Recipe:
    h, w, c = opened.image_feature_shape
    c = c or 3
    mean, std = _normalization(opened.name, c)
    fixed = h is not None and w is not None and (image_size is None or (image_size == h == w))
    if fixed:
        base = sources.base_name(opened.name)
        pad = {"digits": 2}.get(base, max(1, round(min(h, w) / 8)))
        flip = base != "digits" and c == 3  # digits/characters are not mirror-symmetric
        return _Recipe(opened.name, sources.resolve_data_dir(data_dir), True, (h, w, c), pad, flip, mean, std)
    size = image_size or DEFAULT_IMAGE_SIZE
    return _Recipe(opened.name, sources.resolve_data_dir(data_dir), False, (size, size, c), 0, True, mean, std)


def get_dataset_info(name: str, data_dir: str | None = None, *, image_size: int | None = None) -> DatasetInfo:
    """Describes a prepared dataset; fast, never downloads.

    Args:
      name: TFDS name (``cifar10``, ``imagenet2012``, ...), ``digits`` or ``folder:PATH``.
      data_dir: TFDS data directory (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      image_size: output side for variable-size datasets (default 224).

    Raises:
      DatasetNotPreparedError: with the ``flax-resnet prepare`` command to run.
    """
    opened = sources.open_dataset(name, data_dir)
    recipe = _recipe(opened, data_dir, image_size)
    return DatasetInfo(
        name=name,
        num_classes=opened.num_classes,
        image_shape=recipe.out_shape,
        train_size=opened.split_size(opened.train_split),
        eval_size=opened.split_size(opened.eval_split),
        eval_split=opened.eval_split,
        class_names=opened.class_names,
        mean=tuple(recipe.mean),
        std=tuple(recipe.std),
    )


# ----------------------------------------------------------------------------- augmentation
def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [..., C] -> float32 ``(x/255 - mean) / std``."""
    std = np.asarray(std, np.float32)
    scale = 1.0 / (255.0 * std)
    bias = -np.asarray(mean, np.float32) / std
    out = np.empty(images.shape, np.float32)
    np.multiply(images, scale, out=out)
    out += bias
    return out


def crop_flip_draws(rng: np.random.Generator, n: int, pad: int, flip: bool):
    """The random numbers of :func:`random_crop_flip` for ``n`` images: ``(oy, ox, mirrored or None)``."""
    oy = rng.integers(0, 2 * pad + 1, size=n)
    ox = rng.integers(0, 2 * pad + 1, size=n)
    mirrored = rng.random(n) < 0.5 if flip else None
    return oy, ox, mirrored


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int, flip: bool, *,
                     draws: tuple | None = None) -> np.ndarray:
    """Zero-pad each side by ``pad``, take a random crop of the original size, maybe mirror.

    Vectorised over the batch: uint8 [B, H, W, C] -> uint8 [B, H, W, C]. ``draws``
    (from :func:`crop_flip_draws`, one row per image) replaces the draws from ``rng``.
    """
    b, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oy, ox, mirrored = draws if draws is not None else crop_flip_draws(rng, b, pad, flip)
    cols = ox[:, None] + np.arange(w)[None, :]
    if flip:
        cols = np.where(mirrored[:, None], cols[:, ::-1], cols)
    rows = oy[:, None] + np.arange(h)[None, :]
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def inception_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """A random (x, y, w, h) box covering ``scale`` of the area with aspect in ``ratio``.

    Same sampling as torchvision's ``RandomResizedCrop``; after ``attempts`` misses,
    the largest centred box within ``ratio``.
    """
    area = width * height
    targets = area * rng.uniform(scale[0], scale[1], size=attempts)
    aspects = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=attempts))
    cws = np.rint(np.sqrt(targets * aspects)).astype(int)
    chs = np.rint(np.sqrt(targets / aspects)).astype(int)
    offsets = rng.random((attempts, 2))
    for cw, ch, (u, v) in zip(cws, chs, offsets):
        if 0 < cw <= width and 0 < ch <= height:
            return int(u * (width - cw + 1)), int(v * (height - ch + 1)), int(cw), int(ch)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        cw, ch = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        cw, ch = int(round(height * ratio[1])), height
    else:
        cw, ch = width, height
    return (width - cw) // 2, (height - ch) // 2, cw, ch


def center_crop_box(width: int, height: int, fraction: float = EVAL_CROP_FRACTION) -> tuple[float, float, float, float]:
    """The centred square that ``Resize(short/fraction)`` + ``CenterCrop`` keeps."""
    side = min(width, height) * fraction
    return (width - side) / 2, (height - side) / 2, side, side


def crop_resize(image: Any, box_fn: Callable[[int, int], tuple], size: int, channels: int) -> np.ndarray:
    """Decodes ``image`` (encoded bytes or an array), crops ``box_fn(w, h)``, resizes to ``size``.

    Encoded JPEGs are decoded with PIL's draft mode at the smallest DCT scale that
    keeps the crop at least ``size`` pixels wide and high.
    """
    from PIL import Image

    mode = "RGB" if channels == 3 else "L"
    if isinstance(image, (bytes, np.bytes_)):
        im = Image.open(io.BytesIO(image))
        w, h = im.size
        x, y, cw, ch = box_fn(w, h)
        if im.format == "JPEG":
            im.draft(mode, (max(1, math.ceil(w * size / cw)), max(1, math.ceil(h * size / ch))))
    else:
        arr = sources.as_uint8_hwc(image, channels)
        im = Image.fromarray(arr[:, :, 0] if channels == 1 else arr)
        w, h = im.size
        x, y, cw, ch = box_fn(w, h)
    sx, sy = im.size[0] / w, im.size[1] / h
    if im.mode != mode:
        im = im.convert(mode)
    im = im.resize((size, size), Image.BILINEAR, box=(x * sx, y * sy, (x + cw) * sx, (y + ch) * sy))
    out = np.asarray(im, dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


def preprocess_for_eval(image: Any, info: DatasetInfo) -> np.ndarray:
    """One image (encoded bytes, PIL image or uint8 array) -> the float32 [H, W, C] the model sees at eval."""
    h, w, c = info.image_shape
    if not isinstance(image, (bytes, np.bytes_, np.ndarray)):  # PIL image
        image = np.asarray(image.convert("RGB" if c == 3 else "L"))
    if isinstance(image, np.ndarray):
        arr = sources.as_uint8_hwc(image, c)
        if arr.shape == (h, w, c):
            return normalize(arr, info.mean, info.std)
        image = arr
    return normalize(crop_resize(image, center_crop_box, h, c), info.mean, info.std)


# ----------------------------------------------------------------------------- reading
class _ShardReader:
    """Reads examples ``[lo, hi)`` of one split; picklable, reopens lazily in each process.

    Fixed-size datasets small enough are decoded once into a uint8 array (``array``
    mode); larger fixed-size ones are decoded per batch (``decode``); variable-size
    ones hand the encoded bytes to the map function (``raw``).
    """

    def __init__(self, recipe: _Recipe, split: str, lo: int, hi: int, mode: str):
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
                images[pos] = sources.as_uint8_hwc(ex[o.image_key], self.recipe.channels)
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
        return np.stack([sources.as_uint8_hwc(ex[o.image_key], self.recipe.channels) for ex in examples]), labels


def _reader_mode(recipe: _Recipe, n: int) -> str:
    if not recipe.fixed_size:
        return "raw"
    return "array" if n * math.prod(recipe.out_shape) <= IN_MEMORY_LIMIT_BYTES else "decode"


def _shard_bounds(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in [0, {process_count}): pass 0 <= index < count")
    return process_index * n // process_count, (process_index + 1) * n // process_count


class _TrainBatch:
    """Grain map function: global step ``k`` -> this process's slice of global training batch ``k``."""

    def __init__(self, reader, recipe, *, seed, batch_size, steps_per_epoch, process_index, process_count, augment, with_index):
        self.reader, self.recipe = reader, recipe
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
                out.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
            images = np.stack(out)
        else:
            images = np.stack([crop_resize(im, center_crop_box, size, r.channels) for im in images])
        batch = {"image": normalize(images, r.mean, r.std), "label": labels}
        if self.with_index:
            batch["index"] = idx.astype(np.int64)
        return batch


class _EvalBatch:
    """Grain map function: batch ``j`` of this process's eval shard, padded, with a mask."""

    def __init__(self, reader, recipe, batch_size, with_index):
        self.reader, self.recipe, self.batch_size, self.with_index = reader, recipe, batch_size, with_index

    def __call__(self, j: int) -> dict[str, np.ndarray]:
        r, b = self.recipe, self.batch_size
        idx = np.arange(self.reader.lo + j * b, min(self.reader.lo + (j + 1) * b, self.reader.hi))
        image = np.zeros((b, *r.out_shape), np.float32)
        label = np.zeros((b,), np.int32)
        mask = np.zeros((b,), np.float32)
        if len(idx):
            images, labels = self.reader.read(idx)
            if not r.fixed_size:
                images = np.stack([crop_resize(im, center_crop_box, r.out_shape[0], r.channels) for im in images])
            image[: len(idx)] = normalize(images, r.mean, r.std)
            label[: len(idx)] = labels
            mask[: len(idx)] = 1.0
        batch = {"image": image, "label": label, "mask": mask}
        if self.with_index:
            full = np.full((b,), -1, np.int64)
            full[: len(idx)] = idx
            batch["index"] = full
        return batch


# ----------------------------------------------------------------------------- grain plumbing
def _mark_flags_parsed(*_):
    """Grain reads absl flags; a script that never parsed them would crash, so mark them parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


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
        _mark_flags_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2),
            worker_init_fn=_mark_flags_parsed,
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


def _default_threads(recipe: _Recipe, num_workers: int) -> int:
    if recipe.fixed_size:
        return 1  # numpy gather + crop: one thread keeps ahead of the model
    return 1 if num_workers else max(1, min(4, os.cpu_count() or 1))


# ----------------------------------------------------------------------------- train
class TrainIterator:
    """Infinite iterator of training batches; its state is the number of batches taken.

    ``next(it)`` -> ``{"image": float32 [B, H, W, C], "label": int32 [B]}`` (plus
    ``"index"``, the record indices, with ``with_index=True``).
    """

    _STATE_KEYS = ("dataset", "seed", "global_batch_size")  # what the stream depends on

    def __init__(self, batch_fn: _TrainBatch, recipe: _Recipe, *, num_threads: int, num_workers: int, prefetch: int):
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
        with contextlib.suppress(Exception):
            self.close()


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
) -> TrainIterator:
    """This process's slices of the global training batches (see the module docstring).

    Args:
      name: dataset name (see :mod:`flax_resnet.data.sources`).
      batch_size: per-process batch size; the global batch is ``batch_size * process_count``.
      seed: shuffle and augmentation seed.
      data_dir: TFDS data directory.
      process_index: this process (``jax.process_index()``).
      process_count: number of processes (``jax.process_count()``).
      augment: random crop/flip (off: images only resized/normalised as for eval).
      num_workers: Grain worker processes (0: threads in this process). Output is
        identical for any value.
      image_size: output side for variable-size datasets (default 224).
      num_threads: Grain threads per process (default: 1 for fixed-size data, up to
        4 for decoded JPEGs).
      prefetch: batches buffered ahead.
      with_index: add ``"index"`` (int64 record indices) to each batch.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    opened = sources.open_dataset(name, data_dir)
    recipe = _recipe(opened, data_dir, image_size)
    n = opened.split_size(opened.train_split)
    _shard_bounds(n, process_index, process_count)  # validates the process index
    steps = n // (batch_size * process_count)
    if steps == 0:
        raise UserError(
            f"batch size {batch_size} x {process_count} process(es) exceeds the {n} training examples of "
            f"'{name}': use a smaller batch size"
        )
    reader = _ShardReader(recipe, opened.train_split, 0, n, _reader_mode(recipe, n))
    fn = _TrainBatch(
        reader,
        recipe,
        seed=int(seed),
        batch_size=int(batch_size),
        steps_per_epoch=steps,
        process_index=int(process_index),
        process_count=int(process_count),
        augment=augment,
        with_index=with_index,
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
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the eval split: ``{"image", "label", "mask"}`` batches.

    Process ``p`` of ``n`` reads examples ``[p*N//n, (p+1)*N//n)`` in order; every
    process yields :func:`num_eval_batches` batches, the last ones padded with zero
    images and ``mask`` (float32 [B]) 0, so each example counts exactly once.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    opened = sources.open_dataset(name, data_dir)
    recipe = _recipe(opened, data_dir, image_size)
    split = split or opened.eval_split
    n = opened.split_size(split)
    lo, hi = _shard_bounds(n, process_index, process_count)
    reader = _ShardReader(recipe, split, lo, hi, "raw" if not recipe.fixed_size else "decode")
    fn = _EvalBatch(reader, recipe, batch_size, with_index)
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
