"""Offline stand-ins for downloaded data and weights, so quick modes need no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from flax_resnet import pretrained
from flax_resnet.models import create_model


def make_pattern_folder(root: str | Path, *, classes: int = 3, train_per_class: int = 16, val_per_class: int = 6,
                        size: int = 32, seed: int = 0) -> Path:
    """Writes ``root/{train,val}/class_k/*.png``: a small, learnable image-folder dataset.

    Class ``k`` is a stripe pattern at angle ``k * 180 / classes`` degrees with a random
    phase, colour and noise, so a network can tell the classes apart within a few steps.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for k in range(classes):
            d = root / split / f"class_{k}"
            d.mkdir(parents=True, exist_ok=True)
            angle = np.pi * k / classes
            for i in range(n):
                wave = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / 6 + rng.uniform(0, 2 * np.pi))
                colour = rng.uniform(0.4, 1.0, size=3)
                img = 127.5 + 100 * wave[..., None] * colour + rng.normal(0, 12, size=(size, size, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


def write_random_weights(model: str, path: str | Path, *, seed: int = 0) -> Path:
    """Saves a freshly initialised ``model`` as torchvision-layout ``.safetensors``.

    It exercises the fine-tuning path, not the benefit of pretraining.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pretrained.export_safetensors(create_model(model, seed=seed), path,
                                  metadata={"model": model, "source": "random initialisation (experiments/common)"})
    return path
