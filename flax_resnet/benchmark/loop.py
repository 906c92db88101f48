"""``flax-resnet benchmark --loop``: images/s through the real training loop against the bare step."""

from __future__ import annotations

import tempfile
from typing import Any, Callable

from flax_resnet import data
from flax_resnet.benchmark.run import environment
from flax_resnet.benchmark.runners import BenchmarkConfig, build_ours, rate_summary
from flax_resnet.configs import get_config
from flax_resnet.data.synthetic import write_synthetic
from flax_resnet.training import logging as run_logging
from flax_resnet.training import train_and_evaluate


LOOP_KEYS = ("model", "batch", "steps", "log_every_steps", "dataset", "loop_images_per_sec", "bare_images_per_sec",
             "loop_over_bare", "overhead_fraction", "loop_interval_images_per_sec", "bare_repeats_images_per_sec",
             "environment")


def loop_overhead(model: str = "resnet20", batch: int = 128, steps: int = 40, *, log_every: int = 5,
                  recipe: str | None = None, data_dir: str | None = None, synthetic_train_images: int = 0,
                  log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Images/s through the real training loop against the bare step, same model and batch.

    The loop is :func:`~flax_resnet.training.loop.train_and_evaluate` on ``recipe`` (the
    embedded digits data by default: 32x32x1, real Grain pipeline with augmentation, metric
    fetches every ``log_every`` steps, metrics.jsonl + TensorBoard + progress bar, a checkpoint
    and an evaluation per epoch) for ``steps`` steps in a temporary workdir; its rate is its own
    median over log intervals (evaluation and epoch-end checkpoints fall between intervals).
    The bare step is the same jitted train step on one fixed device batch, timed in repeats of
    ``log_every`` steps before *and* after the loop run (median), so both see the same load.
    ``overhead_fraction = 1 - loop / bare`` (the issue's bar: <= 0.05).

    ``synthetic_train_images > 0`` instead writes a synthetic CIFAR-10 of that many training
    images (PNG-encoded, TFDS layout: :func:`flax_resnet.data.synthetic.write_synthetic`) to a
    temporary directory and runs the ``cifar10_resnet20`` recipe on it: the same pipeline with
    enough steps per epoch for a fast accelerator (digits has 1,437 images).
    """
    tmp = tempfile.TemporaryDirectory(prefix="flax_resnet_loop_data_") if synthetic_train_images else None
    if tmp is not None:
        recipe, data_dir = recipe or "cifar10_resnet20", tmp.name
        log(f"writing a synthetic cifar10 ({synthetic_train_images} train images) to {data_dir} ...")
        write_synthetic("cifar10", data_dir, {"train": int(synthetic_train_images), "test": batch})
    config = get_config(recipe or "digits_resnet20")
    config.model, config.batch_size = model, batch
    config.num_train_steps, config.log_every_steps = steps, log_every
    config.eval_batch_size = 0
    if data_dir is not None:
        config.data_dir = data_dir
    info = data.get_dataset_info(config.dataset, config.data_dir)
    size = int(info.image_shape[0])
    bench_cfg = BenchmarkConfig(model=model, batch=batch, image_size=size, in_channels=int(info.image_shape[-1]),
                                num_classes=int(info.num_classes), steps=log_every, eval=False)
    log(f"bare step: compiling {model} batch {batch} ({size}x{size}x{bench_cfg.in_channels}) ...")
    bare = build_ours(bench_cfg, size, bench_cfg.num_classes)
    bare.train(2)
    repeats = max(3, steps // (2 * log_every))
    bare_times = [bare.train(log_every) for _ in range(repeats)]
    env_before = environment()
    log(f"training loop: {steps} steps of {recipe} ({config.dataset}), logging every {log_every} ...")
    with tempfile.TemporaryDirectory(prefix="flax_resnet_loop_") as workdir:
        summary = train_and_evaluate(config, workdir, print_fn=lambda *a, **k: None)
        intervals = [r["images_per_sec"] for r in run_logging.read_metrics(workdir, "train")]
    bare_times += [bare.train(log_every) for _ in range(repeats)]
    if tmp is not None:
        tmp.cleanup()
    bare_rate = rate_summary(bare_times, batch, log_every)
    loop_rate = float(summary.images_per_sec)
    return {
        "model": model, "batch": batch, "steps": steps, "log_every_steps": log_every, "dataset": config.dataset,
        "loop_images_per_sec": loop_rate, "bare_images_per_sec": bare_rate["images_per_sec"],
        "loop_over_bare": loop_rate / bare_rate["images_per_sec"],
        "overhead_fraction": 1.0 - loop_rate / bare_rate["images_per_sec"],
        "loop_interval_images_per_sec": [round(r, 2) for r in intervals],
        "bare_repeats_images_per_sec": bare_rate["repeats_images_per_sec"],
        "environment": {**environment(), "load_average_before": env_before["load_average"]},
    }


def format_loop_summary(r: dict[str, Any]) -> str:
    return (f"{r['model']} batch {r['batch']} on {r['dataset']}: training loop {r['loop_images_per_sec']:.1f} images/s, "
            f"bare step {r['bare_images_per_sec']:.1f} images/s -> loop/bare {r['loop_over_bare']:.3f} "
            f"(overhead {100 * r['overhead_fraction']:.1f}%); load average {r['environment']['load_average']}")
