"""Optimisers: SGD, AdamW or LAMB with kernel-only weight decay, gradient clipping, and the
parameter groups of fine-tuning.

``config.optimizer`` names the update rule (all from optax):

* ``sgd`` (default): ``add_decayed_weights -> (Nesterov) momentum -> -lr``; the decay is
  L2 regularisation added to the gradient (the paper's, PyTorch's ``SGD(weight_decay=)``).
* ``adamw``: as ``optax.adamw``: Adam, then *decoupled* decay ``wd * w`` added to the update,
  both scaled by the learning rate (PyTorch's ``AdamW``).
* ``lamb``: as ``optax.lamb``: AdamW's update rescaled per parameter array by the trust ratio
  ``||w|| / ||update||`` (You et al. 2020), for very large batches.

Adam's moments use ``adam_b1``, ``adam_b2``, ``adam_eps``. Weight decay (``weight_decay``)
reaches conv/linear kernels only, never a bias or BatchNorm parameter
(:func:`weight_decay_mask`). ``grad_clip_norm`` > 0 first scales the gradient so that its
global L2 norm is at most that (``optax.clip_by_global_norm``), before decay and momentum.

Fine-tuning is ordinary training (:func:`~flax_resnet.training.loop.train_and_evaluate`)
with a few config fields (see :mod:`flax_resnet.configs.finetune_folder`):

* ``pretrained``: a ``.safetensors``/``.pth`` file loaded once, when a fresh state is
  created (a resumed run takes everything from its checkpoint); the classifier is new,
  sized to the dataset's classes, unless ``keep_pretrained_head``.
* ``freeze_backbone``: every parameter but the head (``fc``) gets exactly zero update:
  ``optax.set_to_zero`` for them, so no gradient, weight decay or momentum moves them
  (and XLA drops their weight gradients).
* ``freeze_bn_stats``: the backbone's BatchNorms normalise with their running statistics
  in training too and never update them (BatchNorm in eval mode, as ``FrozenBatchNorm``).
  ``None`` (the default) follows the parameters: a backbone group's BatchNorms are frozen
  exactly while its parameters are (the whole run under ``freeze_backbone``, until its
  epoch under ``unfreeze_epochs``), so a linear probe changes nothing but the head;
  ``True`` freezes every backbone BatchNorm for the whole run, ``False`` none.
* ``backbone_lr_mult``: the backbone's learning rate is ``learning_rate * backbone_lr_mult``
  (the head uses the schedule's ``learning_rate``).
* ``unfreeze_epochs``: gradual unfreezing. The backbone starts frozen; the i-th entry is the
  epoch (0-based, fractions allowed) from which the i-th group from the top trains:
  groups are the stages from the last (``layer4``, with a pre-activation net's
  ``bn_final``; the article's network has one per block, ``layer9``) down to ``layer1``,
  then the stem (``conv1``, ``bn1``). Groups not listed
  stay frozen. Until its epoch a group's update, weight decay and momentum are exactly zero.

The optimiser is ``optax.multi_transform`` over these groups; each trainable group is
the update rule's direction (:func:`direction`) followed by ``-lr * mult``, which is
exactly what :func:`create_optimizer` builds for one group.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flax_resnet.errors import UserError
from flax_resnet.models import get_spec

PyTree = Any
HEAD = "head"
FROZEN = "frozen"
STEM = "stem"


def _name(k) -> Any:
    return getattr(k, "key", getattr(k, "name", k))


def uses_param_groups(config) -> bool:
    """Whether the config asks for anything but one SGD over all parameters."""
    return bool(config.get("freeze_backbone", False) or tuple(config.get("unfreeze_epochs", ()) or ())
                or float(config.get("backbone_lr_mult", 1.0)) != 1.0)


def top_level_group(key: str) -> str:
    """``fc`` -> head; ``layerN`` -> itself; anything else (``conv1``, ``bn1``) -> stem."""
    if key == "fc":
        return HEAD
    if re.fullmatch(r"layer\d+", key):
        return key
    return STEM


def backbone_groups(config) -> list[str]:
    """Backbone groups of ``config.model`` from the top: ``['layer4', ..., 'layer1', 'stem']``.

    One group per stage (``layers``), or per block for the article's network (``num_blocks``).
    """
    kwargs = {**get_spec(config.model).kwargs, **dict(config.get("model_kwargs", {}) or {})}
    count = len(kwargs["layers"]) if "layers" in kwargs else int(kwargs["num_blocks"])
    return [f"layer{i}" for i in range(count, 0, -1)] + [STEM]


def group_of(path: tuple, groups: list[str]) -> str:
    """The group of a parameter path (``('layer4', 0, 'conv1', 'kernel')`` -> ``'layer4'``)."""
    top = str(_name(path[0]))
    if top == "bn_final":  # pre-activation nets' final BN belongs with the last stage
        return groups[0] if groups else STEM
    return top_level_group(top)


def group_starts(config, groups: list[str], steps_per_epoch: int | None) -> dict[str, int | None]:
    """First step at which each backbone group trains; ``None``: frozen for the whole run."""
    epochs = tuple(config.get("unfreeze_epochs", ()) or ())
    frozen = bool(config.get("freeze_backbone", False)) or bool(epochs)
    if len(epochs) > len(groups):
        raise UserError(f"unfreeze_epochs has {len(epochs)} entries but the model has {len(groups)} backbone "
                        f"groups ({', '.join(groups)}); give at most {len(groups)}")
    if any(float(e) < 0 for e in epochs):
        raise UserError(f"unfreeze_epochs {epochs} has a negative epoch; use epochs >= 0")
    spe = max(int(steps_per_epoch or 1), 1)
    starts: dict[str, int | None] = {}
    for i, g in enumerate(groups):
        if i < len(epochs):
            starts[g] = int(round(float(epochs[i]) * spe))
        else:
            starts[g] = None if frozen else 0
    return starts


def param_labels(params: PyTree, starts: dict[str, int | None]) -> PyTree:
    """Label per parameter: ``'head'``, ``'frozen'``, or its backbone group's name."""
    groups = list(starts)

    def label(path, _):
        g = group_of(path, groups)
        if g == HEAD:
            return HEAD
        return FROZEN if starts.get(g) is None else g

    return jax.tree_util.tree_map_with_path(label, params)


class StartAtState(NamedTuple):
    count: jax.Array
    inner: optax.OptState


def start_at(inner: optax.GradientTransformation, start_step: int) -> optax.GradientTransformation:
    """``inner``, but before update ``start_step`` its updates are exactly zero and its state is kept.

    So a group that is not yet unfrozen neither moves nor accumulates momentum or decay.
    """

    def init(params):
        return StartAtState(jnp.zeros([], jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        new_updates, new_inner = inner.update(updates, state.inner, params)
        on = state.count >= start_step
        new_updates = jax.tree.map(lambda u: jnp.where(on, u, jnp.zeros_like(u)), new_updates)
        new_inner = jax.tree.map(lambda n, o: jnp.where(on, n, o), new_inner, state.inner)
        return new_updates, StartAtState(optax.safe_increment(state.count), new_inner)

    return optax.GradientTransformation(init, update)


def direction(config, decay_mask) -> optax.GradientTransformation:
    """The update rule ``config.optimizer`` names, without the learning rate (see the module docstring)."""
    name = config.get("optimizer", "sgd")
    wd = config.weight_decay
    if name == "sgd":
        inner = [optax.add_decayed_weights(wd, mask=decay_mask)]
        if config.momentum:
            inner.append(optax.trace(decay=config.momentum, nesterov=config.nesterov))
        return optax.chain(*inner)
    adam = optax.scale_by_adam(b1=config.get("adam_b1", 0.9), b2=config.get("adam_b2", 0.999),
                               eps=config.get("adam_eps", 1e-8))
    if name == "adamw":
        return optax.chain(adam, optax.add_decayed_weights(wd, mask=decay_mask))
    if name == "lamb":
        return optax.chain(adam, optax.add_decayed_weights(wd, mask=decay_mask), optax.scale_by_trust_ratio())
    raise UserError(f"--config.optimizer={name!r}: must be one of sgd, adamw, lamb")


def _group_tx(config, learning_rate_fn, mult: float, start: int, decay_mask) -> optax.GradientTransformation:
    tx = direction(config, decay_mask)
    if start > 0:
        tx = start_at(tx, start)
    lr = learning_rate_fn if mult == 1.0 else (lambda step: mult * learning_rate_fn(step))
    return optax.chain(tx, optax.scale_by_learning_rate(lr))


def param_group_optimizer(config, learning_rate_fn: optax.Schedule,
                          steps_per_epoch: int | None = None) -> optax.GradientTransformation:
    """The fine-tuning optimiser: the update rule per parameter group (see the module docstring).

    ``steps_per_epoch`` converts ``unfreeze_epochs`` to steps; it does not change the
    optimiser state's structure (restoring a checkpoint may leave it out).
    """
    starts = group_starts(config, backbone_groups(config), steps_per_epoch)
    mult = float(config.get("backbone_lr_mult", 1.0))
    if mult < 0:
        raise UserError(f"backbone_lr_mult must be >= 0, got {mult}")
    transforms = {HEAD: _group_tx(config, learning_rate_fn, 1.0, 0, weight_decay_mask), FROZEN: optax.set_to_zero()}
    for g, start in starts.items():
        if start is not None:
            transforms[g] = _group_tx(config, learning_rate_fn, mult, start, weight_decay_mask)
    return optax.multi_transform(transforms, lambda params: param_labels(params, starts))


def freeze_bn_setting(config) -> bool | None:
    """``config.freeze_bn_stats`` as True, False or None ("follow the parameters"; also when absent)."""
    value = config.get("freeze_bn_stats", None)
    if isinstance(value, str):  # an override of a None field arrives as text
        value = {"true": True, "false": False, "none": None}.get(value.strip().lower(), value)
    return value if value is None else bool(value)


def frozen_bn_groups(config, step: int, steps_per_epoch: int | None = None) -> frozenset[str]:
    """The backbone groups whose BatchNorms run on (and keep) their running statistics at ``step``.

    Under the default (``freeze_bn_stats`` None) these are the groups whose parameters are
    frozen at ``step``; True: every backbone group; False: none.
    """
    setting = freeze_bn_setting(config)
    if setting is False or (setting is None and not (config.get("freeze_backbone", False)
                                                      or tuple(config.get("unfreeze_epochs", ()) or ()))):
        return frozenset()
    groups = backbone_groups(config)
    if setting:
        return frozenset(groups)
    starts = group_starts(config, groups, steps_per_epoch)
    return frozenset(g for g, start in starts.items() if start is None or step < start)


def bn_frozen_predicate(config, frozen: frozenset[str]):
    """``top-level attribute name -> bool``: whether a BatchNorm under it belongs to a group in ``frozen``."""
    groups = backbone_groups(config) if frozen else []
    return lambda key: group_of((key,), groups) in frozen


def describe(config, steps_per_epoch: int | None = None) -> str:
    """One line for the run header: which groups train, from when, at what learning-rate factor."""
    groups = backbone_groups(config)
    starts = group_starts(config, groups, steps_per_epoch)
    mult = float(config.get("backbone_lr_mult", 1.0))
    parts = []
    for g in groups:
        s = starts[g]
        parts.append(f"{g} frozen" if s is None else (f"{g} lr x{mult:g}" + (f" from step {s}" if s else "")))
    setting = freeze_bn_setting(config)
    bn = ("; backbone BatchNorm statistics frozen" if setting else "; BatchNorm statistics frozen with their group"
          if setting is None and frozen_bn_groups(config, 0, steps_per_epoch) else "")
    return f"fine-tuning: head lr x1, {', '.join(parts)}{bn}"


def weight_decay_mask(params: PyTree) -> PyTree:
    """``True`` for conv/linear kernels (path ends in ``kernel``), ``False`` for every bias and BN scale/bias."""

    def is_kernel(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", last))
        return name == "kernel"

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def create_optimizer(config, learning_rate_fn: optax.Schedule,
                     steps_per_epoch: int | None = None) -> optax.GradientTransformation:
    """The optimiser ``config`` asks for: SGD (default), AdamW or LAMB, decay on kernels only,
    after gradient clipping when ``grad_clip_norm`` > 0 (see the module docstring).

    SGD's ``add_decayed_weights`` before ``sgd`` adds ``wd * w`` to the gradient, i.e. the
    paper's L2 regularisation ``wd/2 * ||w||^2`` (as PyTorch's ``SGD(weight_decay=...)``).
    Fine-tuning options (frozen backbone, backbone learning-rate factor, gradual
    unfreezing, which needs ``steps_per_epoch``) use per-group transforms instead:
    :func:`param_group_optimizer`.
    """
    name = config.get("optimizer", "sgd")
    if uses_param_groups(config):
        tx = param_group_optimizer(config, learning_rate_fn, steps_per_epoch)
    elif name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
            optax.sgd(learning_rate_fn, momentum=config.momentum or None, nesterov=config.nesterov),
        )
    else:
        tx = optax.chain(direction(config, weight_decay_mask), optax.scale_by_learning_rate(learning_rate_fn))
    clip = float(config.get("grad_clip_norm", 0.0) or 0.0)
    return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx
