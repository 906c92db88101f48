"""``digits``: scikit-learn's ``load_digits`` as a TFDS dataset (offline, seconds).

The features are a raw ``uint8`` tensor (not an encoded image), so TFDS writes the
array_record files without TensorFlow.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
TEST_PER_CLASS = 36  # 10 x 36 = 360 test images, 1,437 train images
SPLIT_SEED = 0


def upscale(images_8x8: np.ndarray) -> np.ndarray:
    """[N, 8, 8] values 0-16 -> [N, 32, 32, 1] uint8 0-255 (bilinear, PIL)."""
    from PIL import Image

    scaled = np.rint(np.asarray(images_8x8, np.float64) * (255.0 / 16.0)).astype(np.uint8)
    out = np.empty((len(scaled), IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8)
    for i, img in enumerate(scaled):
        big = Image.fromarray(img, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        out[i, :, :, 0] = np.asarray(big)
    return out


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The fixed stratified split: ``TEST_PER_CLASS`` per digit go to ``test``."""
    rng = np.random.RandomState(SPLIT_SEED)  # legacy generator: stable across numpy versions
    test = []
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        test.append(rng.permutation(members)[:TEST_PER_CLASS])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return {"train": train, "test": test}


class Builder(tfds.core.GeneratorBasedBuilder):
    """scikit-learn digits at 32x32x1."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
                    "index": tfds.features.Scalar(dtype=np.int32),  # row in load_digits()
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships with scikit-learn
        from sklearn.datasets import load_digits

        raw = load_digits()
        labels = np.asarray(raw.target, np.int64)
        images = upscale(raw.images)
        return {
            name: self._generate_examples(images, labels, idx)
            for name, idx in split_indices(labels).items()
        }

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i]), "index": int(i)}
