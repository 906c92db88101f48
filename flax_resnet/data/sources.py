"""Datasets on disk: TFDS builders (``digits``, image folders), preparation, opening.

Everything here reads and writes the TFDS layout (``DATA_DIR/name[/config]/version``
with ``dataset_info.json`` and array_record shards), so a prepared dataset is an
ordinary TFDS dataset that ``tfds.data_source`` and ``tfds.builder_from_directory``
read without TensorFlow.

Dataset names:

* any registered TFDS name, optionally ``name/config`` or ``name:version``
  (``cifar10``, ``cifar100``, ``imagenet2012``, ``imagenette``, ...);
* ``digits``: scikit-learn's digits (:mod:`flax_resnet.data.digits`), prepared
  automatically on first use;
* ``folder:PATH``: ``PATH/train/<class>/*`` plus ``PATH/val`` (or ``validation`` or
  ``test``) with the same class folders.

Nothing in this module downloads anything unless :func:`prepare` is called.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import os
import re
import shlex
import shutil
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

import flax_resnet.data.digits  # noqa: F401  (registers the `digits` TFDS builder)
from flax_resnet.errors import DatasetNotPreparedError, UserError

FOLDER_PREFIX = "folder:"
FOLDER_BUILDER_NAME = "image_folder"
FOLDER_SPLIT_DIRS = ("train", "val", "validation", "test")

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


# ----------------------------------------------------------------------------- folders
_QUIET_NAMES = {"Thumbs.db", "desktop.ini"}


@dataclasses.dataclass(frozen=True)
class FolderLayout:
    """What an image folder holds: class names and, per split, (path, class index) pairs."""

    root: str
    class_names: tuple[str, ...]
    files: dict[str, list[tuple[str, int]]]
    stray: tuple[str, ...]  # files not inside a class folder (reported, skipped)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in _QUIET_NAMES


def scan_folder(root: str) -> FolderLayout:
    """Lists ``root/<split>/<class>/**`` without opening any image."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise UserError(f"image folder {root} does not exist: pass folder:PATH with PATH/train/<class>/ inside")
    splits = [s for s in FOLDER_SPLIT_DIRS if os.path.isdir(os.path.join(root, s))]
    if "train" not in splits or len(splits) < 2:
        raise UserError(
            f"image folder {root} needs train/<class>/ and val/<class>/ (or validation/ or test/) "
            f"sub-folders; found {sorted(os.listdir(root))}: arrange the images that way"
        )
    train_dir = os.path.join(root, "train")
    class_names = tuple(
        sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)) and not _is_hidden(d))
    )
    if not class_names:
        raise UserError(f"{train_dir} has no class folders: put each class's images in train/<class>/")
    index = {c: i for i, c in enumerate(class_names)}
    files: dict[str, list[tuple[str, int]]] = {}
    stray: list[str] = []
    for split in splits:
        split_dir = os.path.join(root, split)
        entries = []
        for entry in sorted(os.listdir(split_dir)):
            path = os.path.join(split_dir, entry)
            if _is_hidden(entry):
                continue
            if not os.path.isdir(path):
                stray.append(path)
                continue
            if entry not in index:
                raise UserError(
                    f"class folder {path} has no counterpart in {train_dir}: every {split}/ class "
                    "must also exist under train/ (rename or remove it)"
                )
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
                for f in sorted(filenames):
                    if not _is_hidden(f):
                        entries.append((os.path.join(dirpath, f), index[entry]))
        files[split] = entries
    return FolderLayout(root=root, class_names=class_names, files=files, stray=tuple(stray))


def folder_config_name(root: str) -> str:
    """A TFDS config name unique to the folder's absolute path: ``<basename>_<hash8>``."""
    root = os.path.abspath(os.path.expanduser(root))
    stem = re.sub(r"[^a-z0-9_]+", "_", os.path.basename(root.rstrip(os.sep)).lower()).strip("_") or "root"
    return f"{stem[:40]}_{hashlib.sha1(root.encode()).hexdigest()[:8]}"


def check_image_bytes(data: bytes) -> bytes:
    """Validates one image file; returns bytes PIL decodes to RGB.

    RGB JPEGs are kept byte for byte; anything else PIL can read (PNG, grey, CMYK,
    palette, WebP, ...) is converted to RGB and re-encoded as lossless PNG. A file
    that does not decode completely raises (``OSError``, ``ValueError``, ...).
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG" and im.mode == "RGB":
            im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()  # decodes every scan at 1/8 scale: catches truncated files
            return data
        rgb = im.convert("RGB")
    out = io.BytesIO()
    rgb.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _load_checked(path: str) -> tuple[str, bytes | None, str | None]:
    try:
        with open(path, "rb") as f:
            data = f.read()
        return path, check_image_bytes(data), None
    except Exception as e:  # any undecodable file is skipped and reported, never fatal
        return path, None, f"{type(e).__name__}: {e}".splitlines()[0][:200]


class ImageFolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder for ``PATH/{train,val,test}/<class>/*`` image folders.

    Stored features: ``image`` (the file's bytes, RGB JPEG as is, other formats
    re-encoded as PNG), ``label`` (class index, names from the train folders) and
    ``file_name`` (path relative to PATH). Undecodable files are skipped, printed
    by name, and listed in the dataset's ``metadata.json``.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    name = FOLDER_BUILDER_NAME

    def __init__(self, *, root: str, workers: int | None = None, verbose: bool = True, **kwargs):
        self._layout = scan_folder(root)
        self._workers = workers or min(8, (os.cpu_count() or 1) * 2)
        self._verbose = verbose
        self.skipped: list[tuple[str, str]] = [(p, "not inside a class folder") for p in self._layout.stray]
        config = tfds.core.BuilderConfig(
            name=folder_config_name(self._layout.root), description=f"images from {self._layout.root}"
        )
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Image folder {self._layout.root}",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=list(self._layout.class_names)),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split, files) for split, files in self._layout.files.items()}

    def _generate_examples(self, split, files):
        labels = dict(files)
        with concurrent.futures.ThreadPoolExecutor(self._workers) as pool:
            for path, data, error in pool.map(_load_checked, [p for p, _ in files]):
                rel = os.path.relpath(path, self._layout.root)
                if data is None:
                    self.skipped.append((path, error))
                    if self._verbose:
                        print(f"skipping {path}: {error}", flush=True)
                    continue
                yield rel, {"image": data, "label": labels[path], "file_name": rel}
        self.info.metadata["source"] = self._layout.root
        self.info.metadata["skipped"] = [{"path": p, "error": e} for p, e in self.skipped]


# ----------------------------------------------------------------------------- opening
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


_OPEN_CACHE: dict[tuple[str, str], OpenedDataset] = {}


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
def _quiet_tfds():
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
            with _quiet_tfds():
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


# ----------------------------------------------------------------------------- preparing
def _have_tensorflow() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def prepare(
    name: str,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    *,
    verbose: bool = True,
) -> str:
    """Prepares ``name`` as array_record in ``data_dir``; returns a one-line summary.

    ``digits`` and ``folder:PATH`` need no network and no TensorFlow. Other TFDS
    datasets run TFDS's own ``download_and_prepare(file_format='array_record')``,
    which needs TensorFlow (its builders encode images and read files with ``tf``);
    ``manual_dir`` is where manually downloaded archives (ImageNet's tar files) live.
    A folder is re-scanned every time it is prepared.
    """
    root = resolve_data_dir(data_dir)
    os.makedirs(root, exist_ok=True)
    _OPEN_CACHE.pop((name, root), None)

    if name.startswith(FOLDER_PREFIX):
        folder = name[len(FOLDER_PREFIX) :]
        builder = ImageFolderBuilder(root=folder, data_dir=root, verbose=verbose)
        if builder.is_prepared():  # re-scan: the folder may have changed since
            shutil.rmtree(builder.data_dir)
            builder = ImageFolderBuilder(root=folder, data_dir=root, verbose=verbose)
        with contextlib.nullcontext() if verbose else _quiet_tfds():
            builder.download_and_prepare(file_format="array_record")
        counts = ", ".join(f"{s} {builder.info.splits[s].num_examples}" for s in builder.info.splits)
        return (
            f"prepared '{name}' in {builder.data_dir}: {len(builder._layout.class_names)} classes, {counts}; "
            f"skipped {len(builder.skipped)} unreadable file(s)"
        )

    try:
        builder = tfds.builder(name, data_dir=root)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"unknown dataset '{name}': use a TFDS name, 'digits' or 'folder:PATH'") from None

    if builder.is_prepared():
        formats = {str(f.value) for f in builder.info.available_file_formats()}
        if "array_record" in formats:
            return f"'{name}' is already prepared in {builder.data_dir}"
        raise UserError(
            f"'{name}' is prepared in {builder.data_dir} as {', '.join(sorted(formats))}, not array_record: delete that folder and run this again"
        )

    ours = base_name(name) == "digits"
    if not ours and not _have_tensorflow():
        has_images = any(
            isinstance(f, (tfds.features.Image, tfds.features.Video))
            for f in builder.info.features._flatten(builder.info.features)  # pylint: disable=protected-access
        )
        why = "encodes images with TensorFlow" if has_images else "uses TensorFlow to read its raw files"
        raise UserError(
            f"preparing '{name}' needs TensorFlow (TFDS's builder {why}; reading does not): "
            "pip install 'flax-resnet[prepare]'"
        )

    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if instructions:
        mdir = manual_dir or os.path.join(root, "downloads", "manual")
        if not os.path.isdir(mdir) or not os.listdir(mdir):
            first = " ".join(str(instructions).split())[:300]
            raise UserError(
                f"'{name}' needs manually downloaded files in {mdir} ({first}): put them there or pass --manual_dir DIR"
            )
    try:
        builder.download_and_prepare(file_format="array_record", download_config=download_config)
    except AssertionError as e:  # TFDS's manual-download checks
        raise UserError(f"preparing '{name}' failed: {str(e).strip().splitlines()[0]}") from e
    counts = ", ".join(f"{s} {builder.info.splits[s].num_examples}" for s in builder.info.splits)
    return f"prepared '{name}' in {builder.data_dir}: {counts}"


def folder_skipped(name: str, data_dir: str | None = None) -> list[dict]:
    """The files a folder dataset's preparation skipped (path and error)."""
    opened = open_dataset(name, data_dir)
    return list(opened.builder.info.metadata.get("skipped", [])) if opened.builder.info.metadata else []


def as_uint8_hwc(image: Any, channels: int) -> np.ndarray:
    """A decoded image as uint8 [H, W, channels]."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.shape[-1] != channels:
        if channels == 3 and a.shape[-1] == 1:
            a = np.repeat(a, 3, axis=-1)
        elif channels == 3 and a.shape[-1] == 4:
            a = a[..., :3]
        elif channels == 1:
            a = np.rint(a[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None].astype(np.uint8)
    return a
