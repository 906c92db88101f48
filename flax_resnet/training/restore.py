"""After training: a run's checkpoint restored for inference, evaluated on a split, or asked about images."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flax_resnet import data, parallel
from flax_resnet.checkpoint import Checkpointer
from flax_resnet.errors import UserError
from flax_resnet.training import steps
from flax_resnet.training.evaluation import eval_batch_size, eval_batches, evaluate_split, image_size, normalize
from flax_resnet.training.optimizer import create_optimizer
from flax_resnet.training.state import abstract_train_state, compute_dtype


@dataclasses.dataclass
class RestoredModel:
    """A checkpointed model ready for inference: state on ``mesh`` plus what describes it."""

    state: Any
    graph: Any
    config: ml_collections.ConfigDict
    dataset_info: dict[str, Any]
    step: int
    mesh: Any
    ema: bool = False  # ``state`` holds the run's EMA of the weights as its params and statistics

    @property
    def compute_dtype(self):
        return compute_dtype(self.config)


def restore_model(workdir: str | Path, which: str = "best", *, mesh=None, ema: bool | None = None) -> RestoredModel:
    """Loads the newest (``which="latest"``) or best checkpoint of a run onto ``mesh`` (default: all devices).

    ``ema``: whether the model's weights are the run's exponential moving average
    (``config.ema_decay``) rather than the raw weights. None (default): the EMA when the run
    picked its best checkpoint by it (``best_metric='ema_test_top1'``), so evaluate, predict,
    convert and export use the weights that won.

    Raises:
      UserError: no checkpoint, or ``ema=True`` for a run without an EMA;
        :class:`~flax_resnet.checkpoint.UnreadableCheckpointError` when it is damaged or does
        not fit the model its config names.
    """
    if not Path(workdir).is_dir():
        raise UserError(f"run directory {workdir} does not exist; pass the --workdir given to `flax-resnet train`")
    with Checkpointer(workdir, read_only=True) as ckpt:
        step, config_dict, meta = ckpt.restore_config(which)
        config = ml_collections.ConfigDict(config_dict)
        info = meta.get("dataset_info") or {}
        num_classes, in_channels = int(info["num_classes"]), int(info["image_shape"][-1])
        # The schedule does not change the optimiser state's structure; any callable will do.
        tx = create_optimizer(config, optax.constant_schedule(0.0))
        mesh = parallel.create_mesh() if mesh is None else mesh
        abstract, graph = abstract_train_state(config, num_classes, in_channels, tx, mesh)
        state, _, _, _ = ckpt.restore(abstract, which, step=step)
    if ema is None:
        ema = state.ema is not None and config.get("best_metric", "test_top1") == "ema_test_top1"
    if ema and state.ema is None:
        raise UserError(f"the run in {workdir} keeps no EMA of its weights (it was trained without "
                        "--config.ema_decay); use its weights")
    if ema:
        state = state.ema_weights()
    return RestoredModel(state, graph, config, info, step, mesh, ema=bool(ema))


def evaluate(workdir: str | Path, *, which: str = "best", split: str | None = None,
             data_dir: str | None = None) -> dict[str, Any]:
    """Evaluates a run's checkpoint on a split (default: the one it was evaluated on).

    Returns ``loss``, ``top1`` (``top5``), ``count``, ``step`` and ``split``.
    """
    m = restore_model(workdir, which)
    config = m.config
    if data_dir is not None:
        config.data_dir = data_dir
    info = data.get_dataset_info(config.dataset, config.data_dir, image_size=image_size(config))
    eval_bs = eval_batch_size(config, m.mesh, info, split)
    eval_fn = steps.jit_eval_step(m.mesh, graph=m.graph, num_classes=int(info.num_classes),
                                  compute_dtype=m.compute_dtype)
    out = evaluate_split(eval_fn, m.state, eval_batches(config, info, eval_bs, split), m.mesh)
    return {**out, "step": m.step, "split": split or config.get("eval_split") or info.eval_split,
            "dataset": info.name, "model": config.model}




def predict(workdir: str | Path, image_paths: Sequence[str | Path], *, which: str = "best",
            top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-``k`` ``(class name, probability)`` for each image file, from a run's checkpoint."""
    if not image_paths:
        raise UserError("no images given; pass one or more image files: flax-resnet predict --workdir DIR IMG...")
    missing = [str(p) for p in image_paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"image file(s) not found: {', '.join(missing)}; check the paths")
    m = restore_model(workdir, which)
    info = data.get_dataset_info(m.config.dataset, m.config.data_dir, image_size=image_size(m.config),
                                 normalize=normalize(m.config))
    images = np.stack([np.asarray(data.preprocess_for_eval(data.open_image(p), info), np.float32)
                       for p in image_paths])
    probs_fn = steps.jit_predict_step(m.mesh, graph=m.graph, compute_dtype=m.compute_dtype)
    probs = np.asarray(jax.device_get(probs_fn(m.state, jnp.asarray(images))))
    names = list(m.dataset_info.get("class_names") or info.class_names or [])
    k = min(top_k, probs.shape[-1])
    results = []
    for p in probs:
        idx = np.argsort(-p)[:k]
        results.append([(names[i] if i < len(names) else str(i), float(p[i])) for i in idx])
    return results
