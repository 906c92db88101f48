"""Evaluation over a whole split: the batches a config names and the masked sums of the eval step."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_resnet import cpu, data, parallel
from flax_resnet.errors import UserError
from flax_resnet.training import steps


def image_size(config) -> int | None:
    """``config.image_size`` (side of variable-size images, e.g. folders); None: the dataset's default."""
    return int(config.get("image_size", 0) or 0) or None


def normalize(config) -> bool:
    """``config.normalize`` (per-channel normalisation; False: ``pixel / 255``); configs without it: True."""
    return bool(config.get("normalize", True))


def eval_batch_size(config, mesh) -> int:
    bs = int(config.get("eval_batch_size", 0) or 0) or int(config.batch_size)
    parallel.check_batch_size(bs, mesh, "eval_batch_size" if config.get("eval_batch_size") else "batch_size")
    return bs


def evaluate_split(eval_fn, state, batches, mesh, *, max_in_flight: int | None = None) -> dict[str, float]:
    """Runs ``eval_fn`` over every batch of a split; sums stay on device until the end.

    Batches carry a ``mask`` (the final one is padded), so every example is counted once.
    Returns ``loss``, ``top1`` (``top5``) and ``count``. At most ``max_in_flight`` steps are in
    flight (0: no bound; default :func:`flax_resnet.cpu.steps_in_flight`: 1 on XLA:CPU).
    """
    sums = None
    window = cpu.StepWindow(cpu.steps_in_flight() if max_in_flight is None else max_in_flight)
    for batch in batches:
        batch = parallel.shard_batch(batch, mesh)
        window.wait()
        out = eval_fn(state, batch)
        window.add(out)
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    if sums is None:
        raise UserError("the evaluation split is empty; check --config.eval_split and the dataset")
    return steps.summarize_eval(jax.device_get(sums))


def eval_batches(config, info, batch_size, split=None, *, uint8: bool = False):
    """This process's eval batches of ``split`` (default: the config's, else the dataset's test split);
    ``uint8``: images as pixels, for a step that normalises them (``jit_eval_step(image_mean=...)``)."""
    return data.eval_batches(
        config.dataset, batch_size=parallel.per_process_batch_size(batch_size), data_dir=config.data_dir,
        process_index=jax.process_index(), process_count=jax.process_count(),
        split=split or config.get("eval_split") or None, image_size=image_size(config),
        normalize=normalize(config), uint8=uint8,
    )
