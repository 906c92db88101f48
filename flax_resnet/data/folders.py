"""Image-folder datasets: ``folder:PATH`` scanned and stored as a TFDS dataset.

``PATH/train/<class>/*`` plus ``PATH/val`` (or ``validation`` or ``test``) with the
same class folders; :class:`ImageFolderBuilder` writes it in the TFDS layout, checking
every image and skipping (and listing) those that do not decode.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import os
import re

import tensorflow_datasets as tfds

from flax_resnet.errors import UserError

FOLDER_PREFIX = "folder:"
FOLDER_BUILDER_NAME = "image_folder"
FOLDER_SPLIT_DIRS = ("train", "val", "validation", "test")

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
    _check_not_empty(root, class_names, files)
    return FolderLayout(root=root, class_names=class_names, files=files, stray=tuple(stray))


def _check_not_empty(root: str, class_names: tuple[str, ...], files: dict[str, list[tuple[str, int]]]) -> None:
    """A split with no files, or a train class with none, is a UserError before any work starts
    (TFDS would fail later with "No examples were yielded")."""
    for split, entries in files.items():
        seen = {label for _, label in entries}
        empty = [os.path.join(root, split, c) for i, c in enumerate(class_names) if i not in seen
                 and os.path.isdir(os.path.join(root, split, c))]
        if not entries:
            where = f"its class folders {', '.join(empty)} are empty" if empty else "it has no class folders"
            raise UserError(f"image folder split {os.path.join(root, split)} holds no images ({where}): "
                            f"put each class's images (JPEG, PNG, ...) in {split}/<class>/")
        if split == "train" and empty:
            raise UserError(f"class folder(s) {', '.join(empty)} hold no images: put that class's training "
                            "images (JPEG, PNG, ...) there, or remove the folder")


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
        readable: set[int] = set()
        first_error = None
        with concurrent.futures.ThreadPoolExecutor(self._workers) as pool:
            for path, data, error in pool.map(_load_checked, [p for p, _ in files]):
                rel = os.path.relpath(path, self._layout.root)
                if data is None:
                    self.skipped.append((path, error))
                    first_error = first_error or f"{path}: {error}"
                    if self._verbose:
                        print(f"skipping {path}: {error}", flush=True)
                    continue
                readable.add(labels[path])
                yield rel, {"image": data, "label": labels[path], "file_name": rel}
        # Checked here, where the files are decoded (TFDS would stop with "No examples were yielded").
        split_dir = os.path.join(self._layout.root, split)
        if not readable:
            raise UserError(f"none of the {len(files)} files in {split_dir} is a readable image (e.g. "
                            f"{first_error}): put JPEG/PNG images there")
        unreadable = [c for i, c in enumerate(self._layout.class_names) if i not in readable
                      and any(label == i for _, label in files)]
        if split == "train" and unreadable:
            raise UserError(f"no readable image in class folder(s) {', '.join(os.path.join(split_dir, c) for c in unreadable)} "
                            f"(e.g. {first_error}): replace the damaged files, or remove the folder")
        self.info.metadata["source"] = self._layout.root
        self.info.metadata["skipped"] = [{"path": p, "error": e} for p, e in self.skipped]
