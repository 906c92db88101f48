"""Preparing datasets on disk as array_record (what ``flax-resnet prepare`` runs)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil

import tensorflow_datasets as tfds

from flax_resnet.data.folders import ImageFolderBuilder
from flax_resnet.data.sources import FOLDER_PREFIX, base_name, forget, open_dataset, quiet_tfds, resolve_data_dir
from flax_resnet.errors import UserError


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
    if name.startswith(FOLDER_PREFIX):
        folder = name[len(FOLDER_PREFIX) :]
        # Scans the folder: a bad layout or empty class folders fail here, before anything is written.
        builder = ImageFolderBuilder(root=folder, data_dir=root, verbose=verbose)
    os.makedirs(root, exist_ok=True)
    forget(name, root)

    if name.startswith(FOLDER_PREFIX):
        if builder.is_prepared():  # re-scan: the folder may have changed since
            shutil.rmtree(builder.data_dir)
            builder = ImageFolderBuilder(root=folder, data_dir=root, verbose=verbose)
        with contextlib.nullcontext() if verbose else quiet_tfds():
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
