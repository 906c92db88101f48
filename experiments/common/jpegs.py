"""Generated ImageNet-sized JPEG folders and the input pipeline's steady rate over them.

Used by ``gpu_check.py``'s JPEG stage: :func:`make_jpeg_folder` forks its writers, so call it
before JAX is imported in the process.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

IMAGENET_SIDES = ((375, 500), (500, 375), (333, 500), (500, 333), (400, 400), (281, 500))


def write_jpeg(job: tuple[str, int]) -> int:
    """One smooth random ImageNet-sized JPEG (compresses like a photo, not like noise)."""
    import numpy as np
    from PIL import Image

    path, seed = job
    rng = np.random.default_rng(seed)
    h, w = IMAGENET_SIDES[seed % len(IMAGENET_SIDES)]
    coarse = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:h, :w].astype(np.int16)
    img = np.clip(img + rng.integers(-12, 13, size=img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)
    return os.path.getsize(path)


def make_jpeg_folder(root: Path, classes: int, per_class: int, processes: int) -> dict:
    from multiprocessing import get_context

    jobs = []
    for split, n in (("train", per_class), ("val", max(1, per_class // 8))):
        for c in range(classes):
            d = root / split / f"class_{c:03d}"
            d.mkdir(parents=True, exist_ok=True)
            jobs += [(str(d / f"{i:05d}.jpg"), len(jobs) + i) for i in range(n)]
    t = time.perf_counter()
    with get_context("fork").Pool(processes) as pool:  # before JAX is imported in this process
        sizes = pool.map(write_jpeg, jobs, chunksize=8)
    return {"images": len(jobs), "mean_kb": round(sum(sizes) / len(sizes) / 1024, 1),
            "generate_s": round(time.perf_counter() - t, 2)}


def pipeline_rate(name: str, data_dir: str, *, batch: int, waves: int, workers: int) -> dict:
    """Steady-state images/s. Each Grain worker makes whole batches, so with N workers they come
    in waves of N: skip the start-up bursts (buffers filled while the first batch was awaited),
    then time whole waves."""
    from flax_resnet.data import train_iterator

    per_wave = max(1, workers)
    t0 = time.perf_counter()
    it = train_iterator(name, batch_size=batch, seed=0, data_dir=data_dir, num_workers=workers, image_size=224,
                        uint8=True)  # as the trainer reads it: normalised on the device
    next(it)
    first = time.perf_counter() - t0
    for _ in range(2 * per_wave + 4):  # worker buffers (2 each) and the iterator's prefetch (4)
        next(it)
    timed = waves * per_wave
    t1 = time.perf_counter()
    for _ in range(timed):
        out = next(it)
    rate = timed * batch / (time.perf_counter() - t1)
    it.close()
    return {"workers": workers, "images_per_sec": round(rate, 1), "first_batch_s": round(first, 2),
            "timed_batches": timed, "batch_shape": list(out["image"].shape), "dtype": str(out["image"].dtype)}
