"""Dataset descriptions: :class:`DatasetInfo`, normalisation constants, batch recipes.

A :class:`Recipe` says how one dataset's stored examples become model batches
(output shape, translation padding, flips, normalisation). Flips and normalisation can
be switched off (the article's recipe does neither): empty ``mean``/``std`` mean the
model sees ``pixel / 255``.
"""

from __future__ import annotations

import dataclasses

from flax_resnet.data import sources

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
    mean: tuple[float, ...] = ()  # per-channel normalisation (0-1 scale); empty: pixel / 255
    std: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to turn stored examples of one dataset into model batches."""

    name: str
    data_dir: str
    fixed_size: bool  # stored images all have out_shape: numpy crop/flip
    out_shape: tuple[int, int, int]
    pad: int  # fixed-size: translation range (pixels each side)
    flip: bool
    mean: tuple[float, ...]  # empty: no normalisation, batches are pixel / 255
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


def make_recipe(opened: sources.OpenedDataset, data_dir: str | None, image_size: int | None, *,
                flip: bool = True, normalize: bool = True) -> Recipe:
    """``opened``'s recipe: fixed-size images keep their shape unless ``image_size`` differs.

    ``flip=False`` turns off the horizontal flips the dataset would get (digits never
    flip); ``normalize=False`` leaves images as ``pixel / 255``.
    """
    h, w, c = opened.image_feature_shape
    c = c or 3
    mean, std = _normalization(opened.name, c) if normalize else ((), ())
    fixed = h is not None and w is not None and (image_size is None or (image_size == h == w))
    if fixed:
        base = sources.base_name(opened.name)
        pad = {"digits": 2}.get(base, max(1, round(min(h, w) / 8)))
        flip = flip and base != "digits" and c == 3  # digits/characters are not mirror-symmetric
        return Recipe(opened.name, sources.resolve_data_dir(data_dir), True, (h, w, c), pad, flip, mean, std)
    size = image_size or DEFAULT_IMAGE_SIZE
    return Recipe(opened.name, sources.resolve_data_dir(data_dir), False, (size, size, c), 0, flip, mean, std)


def get_dataset_info(name: str, data_dir: str | None = None, *, image_size: int | None = None,
                     normalize: bool = True) -> DatasetInfo:
    """Describes a prepared dataset; fast, never downloads.

    Args:
      name: TFDS name (``cifar10``, ``imagenet2012``, ...), ``digits`` or ``folder:PATH``.
      data_dir: TFDS data directory (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      image_size: output side for variable-size datasets (default 224).
      normalize: False: ``mean``/``std`` are empty and the model sees ``pixel / 255``
        (what :func:`~flax_resnet.data.preprocess_for_eval` then produces too).

    Raises:
      DatasetNotPreparedError: with the ``flax-resnet prepare`` command to run.
    """
    opened = sources.open_dataset(name, data_dir)
    recipe = make_recipe(opened, data_dir, image_size, normalize=normalize)
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
