"""PyTorch weights <-> flax_resnet: torchvision and timm ``resnet*`` state dicts.

Our modules carry torchvision's attribute names, so conversion is a mechanical renaming
of the key plus a layout change of the array:

=====================================  ==========================================  ==================
PyTorch key                            flax_resnet path                            array
=====================================  ==========================================  ==================
``layer1.0.conv1.weight``              ``layer1/0/conv1/kernel``                   OIHW -> HWIO
``layer1.0.downsample.0.weight``       ``layer1/0/downsample/0/kernel``            OIHW -> HWIO
``fc.weight``                          ``fc/kernel``                               (out, in) -> (in, out)
``*.bias`` (conv, linear, BN)          ``*/bias``                                  as is
BN ``weight`` / ``running_mean`` /     ``scale`` / ``mean`` / ``var``              as is
``running_var``
BN ``num_batches_tracked``             (ignored on import, 0 on export)
=====================================  ==========================================  ==================

This covers torchvision's ``resnet18..152``, ``wide_resnet50_2``/``wide_resnet101_2``,
``resnext50_32x4d``/``resnext101_32x8d`` and timm's plain ``resnet*`` (timm keeps
torchvision's names: ``conv1``, ``bn1``, ``layer1..4``, ``downsample.0/1``, ``fc``).
timm's deep-stem / avg-down variants (``resnet50d``, ...) have other modules and are
refused, naming the first key that does not fit.

A model class whose PyTorch original names its modules otherwise says so with a
``torch_keys`` hook (our torchvision-style keys -> the original's, and the original's
duplicate keys): :class:`~flax_resnet.models.article.ArticleResNet` reads and writes the
article's ``conv1.*``, ``layers.K.*``, ``fc.*`` layout, whose classifier is also ``layers.53.*``.
Every function below takes the model (or its class, ``model_cls``) to choose the layout.

Files are read without executing code (:mod:`flax_resnet.state_dict_files`, whose
``read_state_dict`` and ``save_safetensors`` this module re-exports).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_resnet.errors import UserError
from flax_resnet.state_dict_files import (  # noqa: F401  (re-exported)
    SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, StateDict, read_state_dict, save_safetensors)

IGNORED_SUFFIXES = ("num_batches_tracked",)
_BN_NAMES = {"scale": "weight", "mean": "running_mean", "var": "running_var", "bias": "bias"}


# --------------------------------------------------------------------------- key mapping
def _paths(tree) -> list[tuple[tuple, Any]]:
    out = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out.append((tuple(getattr(k, "key", getattr(k, "name", k)) for k in kp), leaf))
    return out


def _to_torch_name(path: tuple, is_bn: bool) -> str:
    *mod, leaf = path
    if is_bn:
        leaf = _BN_NAMES[leaf]
    elif leaf == "kernel":
        leaf = "weight"
    return ".".join(str(p) for p in (*mod, leaf))


def _to_torch_array(leaf_name: str, arr: np.ndarray) -> np.ndarray:
    if leaf_name == "kernel":
        if arr.ndim == 4:  # HWIO -> OIHW
            return np.transpose(arr, (3, 2, 0, 1))
        if arr.ndim == 2:  # (in, out) -> (out, in)
            return arr.T
    return arr


def _from_torch_array(leaf_name: str, arr: np.ndarray) -> np.ndarray:
    if leaf_name == "kernel":
        if arr.ndim == 4:  # OIHW -> HWIO
            return np.transpose(arr, (2, 3, 1, 0))
        if arr.ndim == 2:
            return arr.T
    return arr


@dataclasses.dataclass(frozen=True)
class _Slot:
    collection: str   # "params" | "batch_stats"
    path: tuple       # path inside that collection's pure dict
    shape: tuple      # our shape
    dtype: Any


def _bn_modules(params: Mapping) -> set[tuple]:
    """Module paths holding BatchNorm parameters (``scale`` next to ``bias``)."""
    return {p[:-1] for p, _ in _paths(params) if p[-1] == "scale"}


def _layout(params: Mapping, batch_stats: Mapping) -> dict[str, _Slot]:
    """PyTorch key -> where it lives in our ``(params, batch_stats)`` pure dicts."""
    bn = _bn_modules(params)
    out = {}
    for collection, tree in (("params", params), ("batch_stats", batch_stats)):
        for path, leaf in _paths(tree):
            key = _to_torch_name(path, path[:-1] in bn or collection == "batch_stats")
            out[key] = _Slot(collection, path, tuple(leaf.shape), leaf.dtype)
    return out


def _torch_shape(slot: _Slot) -> tuple:
    return tuple(_to_torch_array(slot.path[-1], np.empty(slot.shape, np.bool_)).shape)


_LEAF_ORDER = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3, "num_batches_tracked": 4}


def torch_order(key: str) -> tuple:
    """Sort key giving torchvision's ``state_dict()`` order (stem, stages, blocks, conv before its BN, fc)."""
    out = []
    parts = key.split(".")
    for i, part in enumerate(parts):
        m = re.fullmatch(r"(conv|bn|layer)(\d+)", part)
        if part.isdigit():
            out.append((1, int(part), ""))
        elif i == len(parts) - 1 and part in _LEAF_ORDER:
            out.append((0, _LEAF_ORDER[part], ""))
        elif m and m.group(1) == "layer":
            out.append((2, 1000 + int(m.group(2)), ""))
        elif m:  # conv2 before bn2 before conv3
            out.append((2, 10 * int(m.group(2)) + (m.group(1) == "bn"), ""))
        else:
            out.append((3, {"downsample": 0, "bn_final": 1, "fc": 2}.get(part, 9), part))
    return tuple(out)


def is_head_key(key: str) -> bool:
    return key.split(".")[0] == "fc"


_TORCHVISION = "a torchvision/timm resnet, wide_resnet or resnext"


def torch_names(model_cls: type | None, keys) -> tuple[dict[str, str], dict[str, str]]:
    """``({our torchvision-style key: the PyTorch original's}, {original's duplicate key: the key it repeats})``
    for ``model_cls`` (its ``torch_keys`` hook; torchvision's names are ours)."""
    hook = getattr(model_cls, "torch_keys", None)
    return hook(keys) if hook is not None else ({k: k for k in keys}, {})


def _check_aliases(state_dict: Mapping[str, np.ndarray], aliases: Mapping[str, str], source: str) -> dict:
    """``state_dict`` without its duplicate keys, each checked equal to the key it repeats."""
    out = dict(state_dict)
    for alias, key in aliases.items():
        if alias not in out:
            continue
        dup = np.asarray(out.pop(alias))
        if key not in out or dup.shape != np.shape(out[key]) or not np.array_equal(dup, np.asarray(out[key])):
            raise UserError(f"{source}: {alias!r} differs from {key!r}, which it repeats (the same module "
                            "registered twice); re-save the model's state_dict() or drop the duplicate")
    return out


# --------------------------------------------------------------------------- model <-> state dict
def split_state(model: nnx.Module) -> tuple[nnx.GraphDef, dict, dict]:
    """``(graphdef, params, batch_stats)`` of a model, the states as pure dicts."""
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"model holds state other than Param/BatchStat: {rest}")
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def to_torch_state_dict(params: Mapping, batch_stats: Mapping, *, num_batches_tracked: bool = True,
                        model_cls: type | None = None) -> StateDict:
    """Our ``(params, batch_stats)`` -> a PyTorch-layout state dict of numpy arrays.

    torchvision's layout, or ``model_cls``'s original's (:func:`torch_names`). Adds
    ``num_batches_tracked`` (int64 0) to every BatchNorm, as ``nn.BatchNorm2d.state_dict()``
    has, so ``load_state_dict(strict=True)`` accepts it.
    """
    params, batch_stats = jax.device_get((params, batch_stats))
    layout = _layout(params, batch_stats)
    trees = {"params": params, "batch_stats": batch_stats}
    out: StateDict = {}
    for key, slot in layout.items():
        leaf = trees[slot.collection]
        for p in slot.path:
            leaf = leaf[p]
        out[key] = np.ascontiguousarray(_to_torch_array(slot.path[-1], np.asarray(leaf)))
    if num_batches_tracked:
        for mod in sorted(_bn_modules(params)):
            out[".".join(str(p) for p in (*mod, "num_batches_tracked"))] = np.zeros((), np.int64)
    renames, aliases = torch_names(model_cls, list(out))
    out = {renames[k]: v for k, v in out.items()}
    out.update({alias: out[key].copy() for alias, key in aliases.items()})
    return out


def model_state_dict(model: nnx.Module) -> StateDict:
    """A model's weights and BatchNorm statistics as its PyTorch original's state dict."""
    _, params, stats = split_state(model)
    return to_torch_state_dict(params, stats, model_cls=type(model))


def from_torch_state_dict(state_dict: Mapping[str, np.ndarray], params: Mapping, batch_stats: Mapping, *,
                          load_head: bool = True, source: str = "state dict",
                          model_cls: type | None = None) -> tuple[dict, dict, list[str]]:
    """Fills copies of our ``(params, batch_stats)`` pure dicts from a PyTorch state dict.

    The state dict has torchvision's layout, or ``model_cls``'s original's (:func:`torch_names`);
    a duplicate key (the article's classifier, twice) must equal the key it repeats.

    ``params``/``batch_stats`` give the target structure, shapes and dtypes (arrays or
    ``jax.ShapeDtypeStruct``). Every key must match: missing, unexpected (other than
    ``num_batches_tracked``) or mis-shaped tensors raise a :class:`UserError` naming the
    offending key. With ``load_head=False`` the ``fc.*`` tensors are skipped (whatever
    their shape) and the target's head is kept.

    Returns:
      ``(params, batch_stats, loaded_keys)``; the loaded states as ``jax.Array`` (never
      numpy: NNX would update numpy-backed BatchNorm statistics in place), a kept head
      as the target's own value.
    """
    layout = _layout(params, batch_stats)
    renames, aliases = torch_names(model_cls, list(layout))
    layout = {renames[k]: slot for k, slot in layout.items()}
    state_dict = _check_aliases(state_dict, aliases, source)
    given = {k: v for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIXES)}
    wanted = {k: s for k, s in layout.items() if load_head or not is_head_key(k)}
    if not load_head:
        given = {k: v for k, v in given.items() if not is_head_key(k)}
    missing = sorted((k for k in wanted if k not in given), key=torch_order)
    unexpected = sorted((k for k in given if k not in wanted), key=torch_order)
    if missing or unexpected:
        def some(keys):
            shown = ", ".join(repr(k) for k in keys[:3])
            return shown + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")

        parts = []
        if unexpected:
            parts.append(f"unexpected key {some(unexpected)}")
        if missing:
            parts.append(f"missing key {some(missing)}")
        raise UserError(f"{source} does not fit this model: {'; '.join(parts)}; pass the --model the "
                        f"weights were made for ({getattr(model_cls, 'torch_source', _TORCHVISION)})")
    new = {"params": _copy_dicts(params), "batch_stats": _copy_dicts(batch_stats)}
    for key in sorted(wanted, key=torch_order):
        slot, arr = wanted[key], np.asarray(given[key])
        if tuple(arr.shape) != _torch_shape(slot):
            fix = ("load it without its head (a new classifier)" if is_head_key(key)
                   else "pass the --model the weights were made for")
            raise UserError(f"{source}: tensor {key!r} has shape {tuple(arr.shape)} but the model needs "
                            f"{_torch_shape(slot)}; {fix}")
        value = jnp.asarray(_from_torch_array(slot.path[-1], arr), dtype=slot.dtype)
        node = new[slot.collection]
        for p in slot.path[:-1]:
            node = node[p]
        node[slot.path[-1]] = value
    return new["params"], new["batch_stats"], list(wanted)


def _copy_dicts(tree):
    """A copy of the nested dicts (leaves shared), safe to assign into."""
    if isinstance(tree, Mapping):
        return {k: _copy_dicts(v) for k, v in tree.items()}
    return tree


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray], *, load_head: bool = True,
                    source: str = "state dict") -> list[str]:
    """Loads a PyTorch-layout state dict into ``model`` in place; returns the keys loaded.

    See :func:`from_torch_state_dict` for the matching rules (strict, names the offending key).
    """
    _, params, stats = split_state(model)
    params, stats, loaded = from_torch_state_dict(state_dict, params, stats, load_head=load_head, source=source,
                                                  model_cls=type(model))
    p_state, s_state = nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)
    nnx.replace_by_pure_dict(p_state, params)
    nnx.replace_by_pure_dict(s_state, stats)
    nnx.update(model, p_state, s_state)
    return loaded


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained` did."""

    path: str
    tensors: int          # tensors copied into the model
    head: str             # "loaded" or "new (N classes)"

    def __str__(self) -> str:
        return f"loaded {self.tensors} tensors from {self.path}; head: {self.head}"


def head_classes(state_dict: Mapping[str, np.ndarray]) -> int:
    """Classes of the state dict's classifier (``fc.weight`` rows); 0 if it has none."""
    w = state_dict.get("fc.weight")
    return int(w.shape[0]) if w is not None else 0


def load_pretrained(model: nnx.Module, path: str | os.PathLike, *, load_head: bool | None = None) -> LoadReport:
    """Loads torchvision/timm weights (or the article's, into its network) from ``path`` into ``model`` in place.

    Args:
      model: a model of the weights' architecture (:class:`~flax_resnet.models.resnet.ResNet`,
        :class:`~flax_resnet.models.article.ArticleResNet`).
      path: ``.safetensors`` or ``.pth``/``.pt`` file.
      load_head: ``True`` copies ``fc`` too (its shape must match), ``False`` keeps the
        model's own (new) head, ``None`` copies it only when the class counts agree.
    """
    sd = read_state_dict(path)
    classes = getattr(model, "num_classes", None)
    if load_head is None:
        load_head = model.fc is not None and head_classes(sd) == classes
    elif load_head and head_classes(sd) != classes:
        raise UserError(f"{path} has a {head_classes(sd)}-class head but the model has {classes} classes: "
                        "train a new head (--config.keep_pretrained_head=false)")
    loaded = load_state_dict(model, sd, load_head=load_head, source=str(path))
    head = "loaded" if load_head else f"new ({classes} classes)"
    return LoadReport(str(path), len(loaded), head)


def export_safetensors(model_or_state, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None,
                       model_cls: type | None = None) -> StateDict:
    """Writes a model's (or a ``(params, batch_stats)`` pair's, of ``model_cls``) weights as ``.safetensors``
    in its PyTorch original's layout (torchvision's for the ResNet family).

    Returns the state dict written.
    """
    if isinstance(model_or_state, nnx.Module):
        sd = model_state_dict(model_or_state)
    else:
        params, stats = model_or_state
        sd = to_torch_state_dict(params, stats, model_cls=model_cls)
    save_safetensors(sd, path, metadata)
    return sd
