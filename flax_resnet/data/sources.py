"""Opening prepared datasets: names, the data directory, random-access TFDS sources.

A prepared dataset is an ordinary TFDS dataset (``DATA_DIR/name[/config]/version``
with ``dataset_info.json`` and array_record shards), which ``tfds.data_source`` and
``tfds.builder_from_directory`` read without TensorFlow.

Dataset names:

* any registered TFDS name, optionally ``name/config`` or ``name:version``
  (``cifar10``, ``cifar100``, ``imagenet2012``, ``imagenette``, ...);
* ``digits``: scikit-learn's digits (:mod:`flax_resnet.data.digits`), prepared
  automatically on first use;
* ``folder:PATH``: an image folder (:mod:`flax_resnet.data.folders`).

Nothing here downloads; :mod:`flax_resnet.data.preparing` writes datasets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import threading
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

import flax_resnet.data.digits  # noqa: F401  (registers the `digits` TFDS builder)
from flax_resnet.data.folders import FOLDER_BUILDER_NAME, FOLDER_PREFIX, folder_config_name
from flax_resnet.errors import DatasetNotPreparedError, UserError

# Which split is the held-out one, for datasets whose split list can't be read yet
# (e.g. under ``tfds.testing.mock_data``). Otherwise the first of _EVAL_PREFERENCE.
KNOWN_EVAL_SPLITS = {
    "digits": "test",
    "cifar10": "test",
    "cifar100": "test",
    "imagenet2012": "validation",
    "imagenette": "validation",
    "imagenet_v2": "test",
    "mnist": "test",
    "fashion_mnist": "test",
    "svhn_cropped": "test",
}
_EVAL_PREFERENCE = ("validation", "val", "test")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    """The TFDS data directory: ``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    if data_dir is None:
        data_dir = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def prepare_command(name: str, data_dir: str | None = None) -> str:
    """The exact shell command that prepares ``name`` in ``data_dir``."""
    return f"flax-resnet prepare {shlex.quote(name)} --data_dir {shlex.quote(resolve_data_dir(data_dir))}"


def base_name(name: str) -> str:
    """``'imagenette/320px-v2:1.0.0'`` -> ``'imagenette'``; ``'folder:/x'`` -> ``'folder'``."""
    if name.startswith(FOLDER_PREFIX):
        return "folder"
    return name.split(":")[0].split("/")[0]


# Grain's reader threads ask for a split's source at the same time: open each once. One lock
# for all datasets, because under tfds.testing.mock_data `as_data_source` patches TFDS's
# *global* SplitDict while it runs, so any two concurrent opens race.
_SOURCE_LOCK = threading.Lock()


@dataclasses.dataclass
class OpenedDataset:
    """A prepared dataset: its TFDS builder plus what the pipeline needs to know."""

    name: str
    builder: Any  # tfds.core.DatasetBuilder (registered or read-only)
    image_key: str
    label_key: str
    train_split: str
    eval_split: str
    class_names: tuple[str, ...]
    image_feature_shape: tuple  # e.g. (32, 32, 3) or (None, None, 3)
    files_on_disk: bool  # False under tfds.testing.mock_data
    _sources: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def encoded_images(self) -> bool:
        return isinstance(self.builder.info.features[self.image_key], tfds.features.Image)

    def source(self, split: str, *, raw_images: bool = False) -> Sequence[dict]:
        """Random-access source of example dicts for ``split``.

        With ``raw_images`` the image field is the encoded bytes (decode it yourself,
        e.g. with a PIL draft) when the files are on disk; under ``mock_data`` it is
        whatever TFDS returns (a decoded array).
        """
        key = (split, raw_images)
        if key in self._sources:  # the common case, without the lock
            return self._sources[key]
        with _SOURCE_LOCK:
            if key not in self._sources:
                decoders = None
                if raw_images and self.encoded_images and self.files_on_disk:
                    decoders = {self.image_key: tfds.decode.SkipDecoding()}
                self._sources[key] = self.builder.as_data_source(split=split, decoders=decoders)
            return self._sources[key]

    def read(self, split: str, indices: Sequence[int], *, raw_images: bool = False) -> list[dict]:
        """The examples at ``indices`` (one ``__getitems__`` call when reading files)."""
        src = self.source(split, raw_images=raw_images)
        idx = [int(i) for i in indices]
        if self.files_on_disk:  # mock_data's __getitems__ is unbound: read one by one there
            return list(src.__getitems__(idx))
        return [src[i] for i in idx]

    def split_size(self, split: str) -> int:
        try:
            n = self.builder.info.splits[split].num_examples
            if isinstance(n, int) and n > 0 and self.files_on_disk:
                return n
        except Exception:  # unknown split info (mock_data): ask the source
            pass
        return len(self.source(split))


_OPEN_CACHE: dict[tuple[str, str], OpenedDataset] = {}  # (name, resolved data dir) -> opened


def forget(name: str | None = None, data_dir: str | None = None) -> None:
    """Drops the cached opening of ``name`` in ``data_dir`` (all of them without ``name``): its files changed."""
    if name is None:
        _OPEN_CACHE.clear()
    else:
        _OPEN_CACHE.pop((name, resolve_data_dir(data_dir)), None)


def _version_dirs(parent: str) -> list[str]:
    """Prepared version folders under ``parent``, newest first."""
    if not os.path.isdir(parent):
        return []
    found = []
    for v in os.listdir(parent):
        if re.fullmatch(r"\d+\.\d+\.\d+", v) and os.path.exists(os.path.join(parent, v, "dataset_info.json")):
            found.append(tuple(int(x) for x in v.split(".")))
    return [os.path.join(parent, ".".join(map(str, v))) for v in sorted(found, reverse=True)]


def _pick_eval_split(name: str, splits: Sequence[str]) -> str:
    known = KNOWN_EVAL_SPLITS.get(base_name(name))
    if known and (not splits or known in splits):
        return known
    for s in _EVAL_PREFERENCE:
        if s in splits:
            return s
    others = [s for s in splits if s != "train"]
    if others:
        return sorted(others)[0]
    raise UserError(f"dataset '{name}' has no held-out split (splits: {list(splits)}): use a dataset with a test or validation split")


def _describe(name: str, builder, files_on_disk: bool) -> OpenedDataset:
    info = builder.info
    keys = info.supervised_keys
    if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        image_key, label_key = keys
    else:
        image_key, label_key = "image", "label"
    features = info.features
    if image_key not in features or label_key not in features:
        raise UserError(
            f"dataset '{name}' has no ({image_key!r}, {label_key!r}) features: only image-classification datasets are supported"
        )
    label = features[label_key]
    if not isinstance(label, tfds.features.ClassLabel):
        raise UserError(f"dataset '{name}' feature {label_key!r} is not a class label: only image-classification datasets are supported")
    try:
        splits = list(info.splits.keys()) if files_on_disk else []
    except Exception:
        splits = []
    shape = tuple(features[image_key].shape)
    if len(shape) != 3:
        raise UserError(f"dataset '{name}' images have shape {shape}, not (H, W, C): only image-classification datasets are supported")
    return OpenedDataset(
        name=name,
        builder=builder,
        image_key=image_key,
        label_key=label_key,
        train_split="train",
        eval_split=_pick_eval_split(name, splits),
        class_names=tuple(label.names),
        image_feature_shape=shape,
        files_on_disk=files_on_disk,
    )


@contextlib.contextmanager
def quiet_tfds():
    """Hides TFDS's progress bars while it prepares a dataset."""
    from tensorflow_datasets.core.utils import tqdm_utils

    was = tqdm_utils._active  # pylint: disable=protected-access
    tqdm_utils.display_progress_bar(False)
    try:
        yield
    finally:
        tqdm_utils.display_progress_bar(was)


def open_dataset(name: str, data_dir: str | None = None, *, auto_prepare: bool = True) -> OpenedDataset:
    """Opens a prepared dataset; never downloads.

    Raises:
      DatasetNotPreparedError: naming the ``flax-resnet prepare`` command, in well
        under a second, if the dataset is not prepared as array_record in ``data_dir``.
      UserError: unknown names, datasets prepared in a format without random access.
    """
    root = resolve_data_dir(data_dir)
    key = (name, root)
    if key in _OPEN_CACHE and _OPEN_CACHE[key].files_on_disk:
        return _OPEN_CACHE[key]

    if name.startswith(FOLDER_PREFIX):
        folder = name[len(FOLDER_PREFIX) :]
        dirs = _version_dirs(os.path.join(root, FOLDER_BUILDER_NAME, folder_config_name(folder)))
        if not dirs:
            raise DatasetNotPreparedError(
                f"dataset '{name}' is not prepared in {root}: run `{prepare_command(name, root)}`"
            )
        builder = tfds.builder_from_directory(dirs[0])
        opened = _describe(name, builder, files_on_disk=True)
        _OPEN_CACHE[key] = opened
        return opened

    try:
        builder = tfds.builder(name, data_dir=root)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise UserError(
            f"unknown dataset '{name}': use a TFDS name (cifar10, cifar100, imagenet2012, imagenette, ...), "
            f"'digits', or 'folder:PATH' ({str(e).splitlines()[0][:120]})"
        ) from None
    except ValueError as e:  # bad config / version
        raise UserError(f"dataset '{name}': {str(e).splitlines()[0]}: check the name/config:version") from None

    if base_name(name) == "digits" and auto_prepare and not builder.is_prepared():
        try:
            with quiet_tfds():
                builder.download_and_prepare(file_format="array_record")
        except Exception:  # another process may have prepared it at the same moment
            builder = tfds.builder(name, data_dir=root)
            if not builder.is_prepared():
                raise

    # mock_data patches as_data_source but leaves no files: so try it first and only
    # diagnose (is_prepared, file formats) when it fails.
    try:
        opened = _describe(name, builder, files_on_disk=builder.is_prepared())
        opened.source(opened.train_split)
    except UserError:
        raise
    except Exception as e:  # pylint: disable=broad-except
        if not builder.is_prepared():
            raise DatasetNotPreparedError(
                f"dataset '{name}' is not prepared in {root}: run `{prepare_command(name, root)}`"
            ) from None
        formats = sorted(str(f.value) for f in builder.info.available_file_formats())
        if "array_record" not in formats:
            raise UserError(
                f"dataset '{name}' in {builder.data_dir} is prepared as {', '.join(formats) or 'unknown'}, which has no "
                f"random access: delete that folder and run `{prepare_command(name, root)}`"
            ) from None
        raise UserError(f"dataset '{name}' in {builder.data_dir} cannot be read ({type(e).__name__}: {e})") from e
    if opened.files_on_disk:
        _OPEN_CACHE[key] = opened
    return opened
