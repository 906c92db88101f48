"""TFDS builder for scikit-learn's 8x8 handwritten digits, upscaled to 32x32.

Importing this package registers the ``digits`` dataset with TFDS.
"""

from flax_resnet.data.digits.digits_dataset_builder import Builder

__all__ = ["Builder"]
