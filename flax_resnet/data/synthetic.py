"""Synthetic stand-ins for TFDS datasets, written in the real dataset's on-disk layout.

``write_synthetic("cifar10", data_dir, {"train": 5000, "test": 1000})`` writes random
images under ``data_dir/cifar10/3.0.2`` with cifar10's exact features (PNG-encoded
``Image``, ``ClassLabel``, ...) as array_record, so ``tfds.builder("cifar10",
data_dir=...)``, ``tfds.data_source`` and this package read it exactly as they would
read the real thing. For benchmarks and tests; offline, no TensorFlow (images are
encoded with PIL).
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds

from flax_resnet.data import sources


def _encode(array: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[-1] == 1 else array).save(buf, format=fmt, quality=90)
    return buf.getvalue()


def random_image(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """A smooth-ish random uint8 image (compresses like a photo, not like noise)."""
    h, w, c = shape
    coarse = rng.integers(0, 256, size=(max(1, h // 8), max(1, w // 8), c), dtype=np.uint8)
    img = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:h, :w]
    img = np.pad(img, ((0, h - img.shape[0]), (0, w - img.shape[1]), (0, 0)), mode="edge")
    noise = rng.integers(-12, 13, size=img.shape)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def write_synthetic(
    name: str,
    data_dir: str,
    split_sizes: dict[str, int],
    *,
    seed: int = 0,
    variable_size: tuple[int, int] = (200, 500),
) -> str:
    """Writes a random dataset with ``name``'s TFDS features; returns its directory.

    Image features of fixed shape get images of that shape (PNG); variable-size
    ones get JPEGs with sides drawn from ``variable_size``. Labels are uniform.
    """
    reference = tfds.builder(name, data_dir=sources.resolve_data_dir(data_dir))
    features = reference.info.features
    supervised = reference.info.supervised_keys

    def generate(split: str, n: int):
        rng = np.random.default_rng([seed, sum(map(ord, split))])
        for i in range(n):
            ex = {}
            for key, feature in features.items():
                if isinstance(feature, tfds.features.Image):
                    h, w, c = feature.shape
                    if h is None or w is None:
                        h, w = (int(v) for v in rng.integers(variable_size[0], variable_size[1] + 1, size=2))
                        ex[key] = _encode(random_image(rng, (h, w, c or 3)), "JPEG")
                    else:
                        ex[key] = _encode(random_image(rng, (h, w, c)), "PNG")
                elif isinstance(feature, tfds.features.ClassLabel):
                    ex[key] = int(rng.integers(0, feature.num_classes))
                elif isinstance(feature, tfds.features.Text):
                    ex[key] = f"{split}_{i:08d}"
                else:
                    raise ValueError(f"write_synthetic does not know how to fake feature {key!r} ({feature})")
            yield f"{split}_{i}", ex

    class _Synthetic(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = reference.version
        RELEASE_NOTES = {str(reference.version): "synthetic"}
        BUILDER_CONFIGS = [reference.builder_config] if reference.builder_config else []

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Synthetic random stand-in for {name}.",
                features=features,
                supervised_keys=supervised,
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split, n) for split, n in split_sizes.items()}

        def _generate_examples(self, split, n):
            yield from generate(split, n)

    _Synthetic.name = reference.name
    builder = _Synthetic(
        data_dir=sources.resolve_data_dir(data_dir),
        config=reference.builder_config.name if reference.builder_config else None,
    )
    with sources.quiet_tfds():
        builder.download_and_prepare(file_format="array_record")
    sources.forget()
    return str(builder.data_dir)
