"""Per-layer gradient norms: at initialisation and after ``k`` SGD steps of the library's training step.

:func:`gradient_flow` builds a recipe's model, optimiser and schedule, takes the library's
jitted training step on augmented training batches, and after each requested number of
steps measures the L2 norm of the loss gradient with respect to every conv/linear kernel on
one fixed probe batch; :func:`summarize_gradient_flow` reduces those rows to the figures
the article's claim is about (first and last layers, spread).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flax_resnet import data, parallel
from flax_resnet.configs import load_config
from flax_resnet.training import (create_learning_rate_fn, create_optimizer, create_train_state, cross_entropy_loss,
                                  jit_train_step)

from .cmdline import as_overrides
from .runs import recipe_for


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _layer_order(path: tuple[str, ...]) -> tuple:
    """Forward order of a parameter path: stem, then stage/block/layer, then the head."""
    head = path[0]
    if head.startswith("layer") and head[5:].isdigit():
        block = int(path[1]) if len(path) > 1 and path[1].isdigit() else 0
        sub = path[2] if len(path) > 2 else ""
        # conv1 < conv2 < conv3 < downsample within a block
        rank = {"conv1": 0, "conv2": 1, "conv3": 2}.get(sub, 3)
        return (1, int(head[5:]), block, rank, path)
    if head in ("fc", "bn_final"):
        return (2, 0, 0, 0, path)
    return (0, 0, 0, 0, path)


def kernel_paths(params: Any) -> list[tuple[str, ...]]:
    """Paths of every conv/linear ``kernel`` of a params pytree, in forward order."""
    paths = [tuple(_key_name(k) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return sorted((p for p in paths if p[-1] == "kernel"), key=_layer_order)


def _get(tree: Any, path: Sequence[str]) -> Any:
    for k in path:
        tree = tree[int(k)] if isinstance(tree, (list, tuple)) else tree[k if k in tree else int(k)]
    return tree


def loss_gradient_fn(graph, num_classes: int):
    """A jitted ``(params, batch_stats, images, labels) -> d(loss)/d(params)``.

    The loss is the mean cross-entropy with BatchNorm in train mode (batch statistics), as
    in the training step; the running statistics it would update are discarded.
    """
    def grads(params, batch_stats, images, labels):
        def loss(p):
            logits, _ = graph.apply(p, batch_stats, images, train=True)
            return cross_entropy_loss(logits.astype(jnp.float32), labels, num_classes).mean()

        return jax.grad(loss)(params)

    return jax.jit(grads)


def layer_gradient_norms(grads, params) -> list[dict[str, Any]]:
    """L2 norms of the gradient of each conv/linear kernel, in forward order.

    Returns one record per kernel: ``index`` (1-based, forward order), ``layer`` (e.g.
    ``layer2.3.conv1``), ``block`` (``stem``, ``layer2.3`` or ``head``), ``grad_norm``,
    ``weight_norm`` and ``ratio`` (``grad_norm / weight_norm``).
    """
    grads, params = jax.device_get((grads, params))
    rows = []
    for i, path in enumerate(kernel_paths(params), start=1):
        g = float(np.linalg.norm(np.asarray(_get(grads, path), np.float64)))
        w = float(np.linalg.norm(np.asarray(_get(params, path), np.float64)))
        block = "head" if path[0] == "fc" else ".".join(path[:2]) if path[0].startswith("layer") else "stem"
        rows.append({"index": i, "layer": ".".join(path[:-1]), "block": block, "grad_norm": g, "weight_norm": w,
                     "ratio": g / w if w else float("nan")})
    return rows


def gradient_flow(model: str, *, dataset: str, steps: Sequence[int] = (0, 10), recipe: str | None = None,
                  batch_size: int = 128, seed: int = 0, data_dir: str | None = None,
                  extra_overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Per-layer gradient norms of ``model`` after each number of SGD steps in ``steps``.

    The model, optimiser and schedule come from ``recipe`` (default: the dataset's, see
    :func:`~common.runs.recipe_for`) with ``model``, ``dataset``, ``batch_size`` and ``seed``
    overridden; the updates are the library's jitted training step on augmented training
    batches. The norms are always measured on the same fixed probe batch (the first
    ``batch_size`` training images, not augmented). Returns the records of
    :func:`layer_gradient_norms` with ``model`` and ``step`` added.
    """
    config = load_config(recipe or recipe_for(dataset), [
        *as_overrides({"model": model, "dataset": dataset, "batch_size": batch_size, "seed": seed}),
        *([f"--config.data_dir={data_dir}"] if data_dir else []), *extra_overrides])
    info = data.get_dataset_info(config.dataset, config.data_dir)
    num_classes, in_channels = int(info.num_classes), int(info.image_shape[-1])
    mesh = parallel.create_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    todo = sorted({int(s) for s in steps})
    with data.train_iterator(config.dataset, batch_size=config.batch_size, seed=config.seed,
                             data_dir=config.data_dir, augment=False) as probe_iter:
        probe = next(probe_iter)
    images, labels = jnp.asarray(probe["image"]), jnp.asarray(probe["label"])
    it = data.train_iterator(config.dataset, batch_size=parallel.per_process_batch_size(config.batch_size),
                             seed=config.seed + 1, data_dir=config.data_dir, augment=config.augment)
    try:
        lr_fn = create_learning_rate_fn(config, int(it.steps_per_epoch), max(todo[-1], 1))
        tx = create_optimizer(config, lr_fn)
        state, graph = create_train_state(config, num_classes, in_channels, tx, mesh)
        # The compute dtype the trainer uses: bfloat16 under half_precision, params always float32.
        dtype = jnp.bfloat16 if config.get("half_precision", False) else jnp.float32
        train_fn = jit_train_step(mesh, graph=graph, tx=tx, learning_rate_fn=lr_fn, num_classes=num_classes,
                                  label_smoothing=config.label_smoothing, compute_dtype=dtype)
        grad_fn = loss_gradient_fn(graph, num_classes)
        rows, done = [], 0
        for target in todo:
            while done < target:
                state, _ = train_fn(state, parallel.shard_batch(next(it), mesh))
                done += 1
            grads = grad_fn(state.params, state.batch_stats, images, labels)
            for r in layer_gradient_norms(grads, state.params):
                rows.append({"model": model, "step": target, **r})
    finally:
        it.close()
    return rows


def summarize_gradient_flow(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per ``(model, step)``: the figures the article's claim is about.

    First conv layer, last conv layer and head gradient norms, the first conv layer's weight
    norm and gradient/weight ratio, and the spread (largest / smallest conv-layer gradient norm).
    """
    out = []
    keys = list(dict.fromkeys((r["model"], r["step"]) for r in rows))
    for model, step in keys:
        sel = [r for r in rows if r["model"] == model and r["step"] == step]
        convs = [r for r in sel if r["block"] != "head"]
        head = [r for r in sel if r["block"] == "head"]
        g = np.array([r["grad_norm"] for r in convs])
        out.append({
            "model": model, "step": step, "conv_layers": len(convs),
            "first_conv_grad": float(g[0]), "last_conv_grad": float(g[-1]),
            "first_conv_weight": float(convs[0]["weight_norm"]), "first_conv_ratio": float(convs[0]["ratio"]),
            "head_grad": float(head[-1]["grad_norm"]) if head else float("nan"),
            "first_over_last": float(g[0] / g[-1]), "max_over_min": float(g.max() / g.min()),
        })
    return out
