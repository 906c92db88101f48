"""Input-pipeline throughput: images/s for CIFAR-shaped data and a JPEG folder, 0 and N Grain workers.

    python experiments/data_throughput.py --workdir /tmp/data_throughput --workers 2

Builds (once, offline) a synthetic CIFAR-10 in cifar10's real TFDS layout (PNG images
in array_record, 50,000 train images by default) and a folder of JPEGs of 200-500 px
prepared with ``flax-resnet prepare folder:...``, then times ``train_iterator``
(augmentation on) with 0 and N workers: seconds to the first batch (start-up: in-memory
load, worker spawn) and steady-state images/s after it. The requirement checked is that
the CIFAR pipeline delivers at least 5x what the ResNet-20 train step consumes
(``--model-rate``, 600 img/s at batch 128 on 2 CPU cores). Writes
``data_throughput.{md,json,png}`` to the workdir. Takes 1-3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # `common` sits beside the scripts, however a script is loaded
    sys.path.insert(0, _HERE)
from common import report, runs  # noqa: E402

from flax_resnet.data import enable_worker_processes, prepare, synthetic, train_iterator  # noqa: E402


def make_jpeg_folder(root: str, classes: int, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", max(1, per_class // 5))):
        for c in range(classes):
            d = os.path.join(root, split, f"class_{c:03d}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(200, 501, size=2))
                image = Image.fromarray(synthetic.random_image(rng, (h, w, 3)))
                image.save(os.path.join(d, f"{i:05d}.jpg"), quality=90)


def measure(name: str, data_dir: str, *, batch_size: int, batches: int, workers: int, image_size: int | None) -> dict:
    t0 = time.perf_counter()
    it = train_iterator(name, batch_size=batch_size, seed=0, data_dir=data_dir, num_workers=workers, image_size=image_size)
    next(it)
    first = time.perf_counter() - t0
    for _ in range(2):  # let the prefetch buffers fill
        next(it)
    t1 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    steady = time.perf_counter() - t1
    it.close()
    assert batch["image"].dtype == np.float32
    return {
        "first_batch_s": round(first, 2),
        "images_per_s": round(batches * batch_size / steady, 1),
        "batch_shape": list(batch["image"].shape),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/flax_resnet_data_throughput")
    p.add_argument("--workers", type=int, default=2, help="the N of '0 and N workers'")
    p.add_argument("--cifar-train", type=int, default=50_000, help="synthetic CIFAR train images")
    p.add_argument("--cifar-batches", type=int, default=300)
    p.add_argument("--jpeg-classes", type=int, default=10)
    p.add_argument("--jpeg-per-class", type=int, default=60)
    p.add_argument("--jpeg-batches", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224, help="output side for the JPEG folder")
    p.add_argument("--model-rate", type=float, default=600.0, help="img/s the ResNet-20 train step consumes")
    args = p.parse_args(argv)

    data_dir = os.path.join(args.workdir, "tfds")
    jpeg_root = os.path.join(args.workdir, "jpeg_folder")
    t = time.perf_counter()
    marker = os.path.join(data_dir, "cifar10", "3.0.2", "dataset_info.json")
    if not os.path.exists(marker):
        synthetic.write_synthetic("cifar10", data_dir, {"train": args.cifar_train, "test": 1000})
    if not os.path.isdir(jpeg_root):
        make_jpeg_folder(jpeg_root, args.jpeg_classes, args.jpeg_per_class)
    prepare(f"folder:{jpeg_root}", data_dir, verbose=False)
    print(f"data ready in {time.perf_counter() - t:.1f}s under {args.workdir}")

    enable_worker_processes()  # Grain's workers read absl flags
    rows = []
    for label, name, batches, size in (
        ("CIFAR-shaped (32x32 PNG, in memory)", "cifar10", args.cifar_batches, None),
        (f"JPEG folder (200-500 px -> {args.image_size})", f"folder:{jpeg_root}", args.jpeg_batches, args.image_size),
    ):
        for workers in sorted({0, args.workers}):
            r = measure(name, data_dir, batch_size=args.batch_size, batches=batches, workers=workers, image_size=size)
            r.update(pipeline=label, workers=workers)
            rows.append(r)
            print(f"{label:45s} workers={workers}: {r['images_per_s']:9.1f} img/s  (first batch after {r['first_batch_s']} s)")

    need = 5 * args.model_rate
    cifar_best = max(r["images_per_s"] for r in rows if r["pipeline"].startswith("CIFAR"))
    verdict = "PASS" if cifar_best >= need else "FAIL"
    machine = runs.machine()
    lines = [
        "# Input pipeline throughput",
        "",
        f"Machine: {machine}. Batch {args.batch_size}, augmentation on, steady state after the first batch.",
        "",
        "| pipeline | workers | images/s | first batch (s) |",
        "|---|---:|---:|---:|",
        *[f"| {r['pipeline']} | {r['workers']} | {r['images_per_s']:.0f} | {r['first_batch_s']} |" for r in rows],
        "",
        f"CIFAR requirement: >= 5 x {args.model_rate:.0f} = {need:.0f} img/s; best {cifar_best:.0f} img/s "
        f"({cifar_best / args.model_rate:.1f}x the ResNet-20 step): {verdict}.",
    ]
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "data_throughput.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    report.write_json({"machine": machine, "args": vars(args), "rows": rows, "verdict": verdict},
                      os.path.join(args.workdir, "data_throughput.json"))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.2))
        names = [f"{r['pipeline'].split(' (')[0]}\n{r['workers']} workers" for r in rows]
        ax.barh(names, [r["images_per_s"] for r in rows], color="tab:blue")
        ax.axvline(need, color="tab:red", ls="--", label=f"5 x ResNet-20 step ({need:.0f} img/s)")
        ax.set_xscale("log")
        ax.set_xlabel("images / s")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.workdir, "data_throughput.png"), dpi=120)
    except ImportError:
        pass
    print("\n".join(lines))


if __name__ == "__main__":
    main()
