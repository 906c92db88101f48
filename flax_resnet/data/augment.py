"""Image transforms in numpy (vectorised per batch) and PIL (per image).

Zero-pad + random crop + flip for fixed-size images; Inception-style random-resized
crop for variable-size ones; resize + centre crop for evaluation; normalisation.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from flax_resnet.data.info import DatasetInfo
from flax_resnet.errors import UserError

EVAL_CROP_FRACTION = 0.875  # 224 / 256


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


def normalize_constants(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``(scale, bias)`` with ``(x/255 - mean) / std == x * scale + bias``: the host's
    :func:`normalize` and the train/eval steps (which normalise uint8 batches on the device) share them."""
    std = np.asarray(std, np.float32)
    return (1.0 / (255.0 * std)).astype(np.float32), (-np.asarray(mean, np.float32) / std).astype(np.float32)


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [..., C] -> float32 ``(x/255 - mean) / std``; empty ``mean``: exactly ``x/255``."""
    if not len(mean):
        return np.divide(images, np.float32(255), dtype=np.float32)
    scale, bias = normalize_constants(mean, std)
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
        arr = as_uint8_hwc(image, channels)
        im = Image.fromarray(arr[:, :, 0] if channels == 1 else arr)
        w, h = im.size
        x, y, cw, ch = box_fn(w, h)
    sx, sy = im.size[0] / w, im.size[1] / h
    if im.mode != mode:
        im = im.convert(mode)
    im = im.resize((size, size), Image.BILINEAR, box=(x * sx, y * sy, (x + cw) * sx, (y + ch) * sy))
    out = np.asarray(im, dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


def open_image(path) -> Any:
    """A decoded PIL image from a file, or a one-line :class:`UserError` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {path}: {e}; pass a PNG/JPEG/BMP/... file") from None


def preprocess_for_eval(image: Any, info: DatasetInfo) -> np.ndarray:
    """One image (encoded bytes, PIL image or uint8 array) -> the float32 [H, W, C] the model sees at eval.

    Normalised with ``info.mean``/``info.std``, or ``pixel / 255`` when they are empty
    (``get_dataset_info(..., normalize=False)``).
    """
    h, w, c = info.image_shape
    if not isinstance(image, (bytes, np.bytes_, np.ndarray)):  # PIL image
        image = np.asarray(image.convert("RGB" if c == 3 else "L"))
    if isinstance(image, np.ndarray):
        arr = as_uint8_hwc(image, c)
        if arr.shape == (h, w, c):
            return normalize(arr, info.mean, info.std)
        image = arr
    return normalize(crop_resize(image, center_crop_box, h, c), info.mean, info.std)
