"""The hot path: pure ``train_step`` / ``eval_step`` functions of pytrees, and their jitting.

Both are pure functions of a :class:`~flax_resnet.training.state.TrainState` and a batch
dict. :func:`jit_train_step` / :func:`jit_eval_step` bind the static parts (model graph,
optimiser, schedule) and jit them with explicit shardings: state replicated, batch
sharded on ``'data'``. Under GSPMD the loss mean, the gradients and BatchNorm's batch
statistics are all over the *global* batch.

Batches may arrive as uint8 (what the trainer's data iterators send: a quarter of float32's
host work and transfer); :func:`prepare_images` normalises them inside the step, with the
host normaliser's float32 constants. Gradient accumulation (``grad_accum_steps`` k > 1)
splits the global batch into k micro-batches inside the step (``lax.scan``) and averages
their gradients: one optimiser update per global batch, with a k-th of the activations in
memory. BatchNorm then normalises each micro-batch with its own statistics and updates the
running statistics once per micro-batch, in order (as PyTorch does when it accumulates), so
results differ from k = 1 only through BatchNorm's batch statistics.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flax_resnet import cpu, parallel
from flax_resnet.data.augment import normalize_constants
from flax_resnet.training.state import ModelGraph, TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def cross_entropy_loss(logits, labels, num_classes: int, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels.

    With smoothing ``a`` the target is ``(1 - a) * one_hot + a / num_classes``.
    Computed in float32 whatever the compute dtype of ``logits``.
    """
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def topk_correct(logits, labels, k: int):
    """1.0 where the label is among the ``k`` highest logits, per example."""
    if k == 1:
        return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    _, idx = jax.lax.top_k(logits, k)
    return jnp.any(idx == labels[:, None], axis=-1).astype(jnp.float32)


def prepare_images(images, dtype: Any = jnp.float32, mean: tuple = (), std: tuple = ()):
    """A batch's images as the model's input in ``dtype``.

    uint8 images are normalised here, inside the jitted step, exactly as
    :func:`flax_resnet.data.augment.normalize` does on the host (float32 ``x * scale + bias``;
    empty ``mean``: ``x / 255``); float images arrive normalised and are only cast.
    """
    if images.dtype != jnp.uint8:
        return images.astype(dtype)
    x = images.astype(jnp.float32)
    if len(mean):
        scale, bias = normalize_constants(mean, std)
        x = x * scale + bias
    else:
        x = x / jnp.float32(255)
    return x.astype(dtype)


def micro_batches(x, k: int):
    """``[B, ...] -> [k, B/k, ...]``, micro-batch ``j`` holding rows ``j, j+k, j+2k, ...``: strided,
    so every device's shard of the batch gives each micro-batch the same number of rows."""
    return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def _loss_and_grads(graph, params, batch_stats, images, labels, num_classes, label_smoothing, grad_accum_steps):
    """``(loss, logits, new_batch_stats, grads)`` of the batch, over ``grad_accum_steps`` micro-batches."""

    def loss_fn(params, stats, x, y):
        logits, new_stats = graph.apply(params, stats, x, train=True)
        logits = logits.astype(jnp.float32)
        return cross_entropy_loss(logits, y, num_classes, label_smoothing).mean(), (logits, new_stats)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    k = int(grad_accum_steps)
    if k == 1:
        (loss, (logits, new_stats)), grads = grad_fn(params, batch_stats, images, labels)
        return loss, logits, new_stats, grads

    def body(carry, xy):
        total, stats = carry
        (loss, (logits, stats)), g = grad_fn(params, stats, *xy)
        return (jax.tree.map(jnp.add, total, g), stats), (loss, logits)

    zeros = jax.tree.map(jnp.zeros_like, params)
    (total, new_stats), (losses, logits) = jax.lax.scan(
        body, (zeros, batch_stats), (micro_batches(images, k), micro_batches(labels, k)))
    logits = logits.swapaxes(0, 1).reshape(images.shape[0], -1)  # back in the batch's row order
    return losses.mean(), logits, new_stats, jax.tree.map(lambda g: g / k, total)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    graph: ModelGraph,
    tx: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
    num_classes: int,
    label_smoothing: float = 0.0,
    compute_dtype: Any = jnp.float32,
    ema_decay: float = 0.0,
    grad_accum_steps: int = 1,
    image_mean: tuple = (),
    image_std: tuple = (),
) -> tuple[TrainState, Metrics]:
    """One optimiser update on a (global) batch. Returns the new state and scalar metrics.

    With ``state.ema`` set, it moves toward the new params and statistics (:func:`update_ema`).
    ``grad_accum_steps`` > 1: gradients averaged over that many micro-batches (module
    docstring). ``image_mean``/``image_std``: how uint8 images are normalised (:func:`prepare_images`).

    Metrics: ``loss`` (mean cross-entropy, with smoothing if set), ``top1`` (and ``top5``
    when ``num_classes > 5``) accuracies on the batch, ``lr`` used for this update and
    ``grad_norm`` (global L2 norm of the loss gradient, before weight decay).
    """
    images = prepare_images(batch["image"], compute_dtype, image_mean, image_std)
    labels = batch["label"]
    loss, logits, new_stats, grads = _loss_and_grads(graph, state.params, state.batch_stats, images, labels,
                                                     num_classes, label_smoothing, grad_accum_steps)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "top1": topk_correct(logits, labels, 1).mean(),
        "lr": jnp.asarray(learning_rate_fn(state.step), jnp.float32),
        "grad_norm": optax.tree.norm(grads),
    }
    if num_classes > 5:
        metrics["top5"] = topk_correct(logits, labels, 5).mean()
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state,
        ema=update_ema(state.ema, params, new_stats, ema_decay),
    )
    return new_state, metrics


def update_ema(ema, params, batch_stats, decay: float):
    """``decay * ema + (1 - decay) * new`` for the params and BatchNorm statistics (None: no EMA).

    ``optax.incremental_update`` with step size ``1 - decay``; the EMA starts from the initial
    weights (so it trails them by about ``1 / (1 - decay)`` steps).
    """
    if ema is None:
        return None
    new = {"params": params, "batch_stats": batch_stats}
    return optax.incremental_update(new, ema, step_size=1.0 - decay)


def eval_step(
    state: TrainState,
    batch: Batch,
    *,
    graph: ModelGraph,
    num_classes: int,
    compute_dtype: Any = jnp.float32,
    image_mean: tuple = (),
    image_std: tuple = (),
) -> Metrics:
    """Masked *sums* over a batch (running BatchNorm statistics); uint8 images are normalised
    with ``image_mean``/``image_std`` (:func:`prepare_images`).

    ``batch["mask"]`` (1 for real examples, 0 for padding; all ones if absent) weights
    every example, so a padded final batch counts each real example exactly once.
    Returns ``loss`` (sum of unsmoothed cross-entropy), ``correct`` (top-1 count),
    ``correct5`` (top-5 count, when ``num_classes > 5``) and ``count``.
    """
    images = prepare_images(batch["image"], compute_dtype, image_mean, image_std)
    logits = eval_logits(graph, state.params, state.batch_stats, images).astype(jnp.float32)
    labels = batch["label"]
    mask = batch.get("mask")
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    out = {
        "loss": jnp.sum(cross_entropy_loss(logits, labels, num_classes) * mask),
        "correct": jnp.sum(topk_correct(logits, labels, 1) * mask),
        "count": jnp.sum(mask),
    }
    if num_classes > 5:
        out["correct5"] = jnp.sum(topk_correct(logits, labels, 5) * mask)
    return out


def eval_logits(graph: ModelGraph, params, batch_stats, images: jax.Array) -> jax.Array:
    """The model's eval-mode logits. A model built from the CPU backend's layers, traced for one
    device, runs as :mod:`flax_resnet.cpu.inference`'s fused graph (BatchNorm folded, bias,
    residual and ReLU in the convolutions; the same logits to float32 rounding); any other as
    itself (``graph.apply``)."""
    if graph.cpu_fast_path:
        fused = cpu.inference.trace(nnx.merge(graph.eval_graph, params, batch_stats))
        if fused is not None:
            return cpu.inference.run(fused, images)
    return graph.apply(params, batch_stats, images, train=False)[0]


def predict_step(state: TrainState, images: jax.Array, *, graph: ModelGraph, compute_dtype=jnp.float32):
    """Class probabilities (float32 softmax) for a batch of images, eval mode (:func:`eval_logits`)."""
    logits = eval_logits(graph, state.params, state.batch_stats, images.astype(compute_dtype))
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def _jit(fn, mesh, graph: ModelGraph, **kwargs):
    """``jax.jit``, or :func:`flax_resnet.cpu.jit` for a model built from the CPU backend's layers."""
    if graph.cpu_fast_path:
        return cpu.jit(fn, mesh=mesh, **kwargs)
    return jax.jit(fn, **kwargs)


def jit_train_step(
    mesh,
    *,
    graph: ModelGraph,
    tx: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
    num_classes: int,
    label_smoothing: float = 0.0,
    compute_dtype: Any = jnp.float32,
    ema_decay: float = 0.0,
    grad_accum_steps: int = 1,
    image_mean: tuple = (),
    image_std: tuple = (),
):
    """``train_step`` jitted with the state donated, replicated, and the batch sharded on ``'data'``."""
    fn = functools.partial(
        train_step, graph=graph, tx=tx, learning_rate_fn=learning_rate_fn,
        num_classes=num_classes, label_smoothing=label_smoothing, compute_dtype=compute_dtype,
        ema_decay=ema_decay, grad_accum_steps=grad_accum_steps, image_mean=tuple(image_mean),
        image_std=tuple(image_std),
    )
    rep, data = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
    return _jit(fn, mesh, graph, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0)


def jit_eval_step(mesh, *, graph: ModelGraph, num_classes: int, compute_dtype: Any = jnp.float32,
                  image_mean: tuple = (), image_std: tuple = ()):
    """``eval_step`` jitted: state replicated, batch sharded, sums replicated."""
    fn = functools.partial(eval_step, graph=graph, num_classes=num_classes, compute_dtype=compute_dtype,
                           image_mean=tuple(image_mean), image_std=tuple(image_std))
    rep, data = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
    return _jit(fn, mesh, graph, in_shardings=(rep, data), out_shardings=rep)


def jit_predict_step(mesh, *, graph: ModelGraph, compute_dtype: Any = jnp.float32):
    """``predict_step`` jitted for ``mesh``: class probabilities of a batch of images."""
    fn = functools.partial(predict_step, graph=graph, compute_dtype=compute_dtype)
    return _jit(fn, mesh, graph)


def summarize_eval(sums: dict[str, Any]) -> dict[str, float]:
    """Turns fetched eval sums into means: ``loss``, ``top1`` (``top5``) and ``count``."""
    n = float(sums["count"])
    out = {"loss": float(sums["loss"]) / max(n, 1.0), "top1": float(sums["correct"]) / max(n, 1.0), "count": int(round(n))}
    if "correct5" in sums:
        out["top5"] = float(sums["correct5"]) / max(n, 1.0)
    return out


def all_finite(*trees) -> jax.Array:
    """A scalar bool: no NaN/inf in any floating-point leaf of ``trees`` (jit it; one reduction)."""
    leaves = [x for t in trees for x in jax.tree.leaves(t) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
