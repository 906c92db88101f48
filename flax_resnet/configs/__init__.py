"""Recipes (one file per recipe) and the loader that picks one and applies overrides.

A recipe is a module with ``get_config() -> ml_collections.ConfigDict``. Pick it by
name (a module in this package, e.g. ``cifar10_resnet56``) or by path to a ``.py`` file,
then override fields from the command line as ``--config.num_epochs=3``.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import pkgutil
from pathlib import Path
from typing import Sequence

import ml_collections

from flax_resnet.errors import UserError

DEFAULT_CONFIG = "digits_resnet20"
_NOT_RECIPES = {"default"}
# ConfigDict fields under which overrides may create new keys (free-form kwargs).
_OPEN_FIELDS = {"model_kwargs"}


def list_configs() -> list[str]:
    """Names of the recipes shipped in this package."""
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return sorted(n for n in names if n not in _NOT_RECIPES)


def _module_from_path(path: Path):
    spec = importlib.util.spec_from_file_location(f"flax_resnet_user_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(name_or_path: str | None = None) -> ml_collections.ConfigDict:
    """Loads a recipe by name (``cifar10_resnet20``) or by path (``my_recipe.py``)."""
    name_or_path = name_or_path or DEFAULT_CONFIG
    path = Path(name_or_path)
    if name_or_path.endswith(".py") or path.is_file():
        if not path.is_file():
            raise UserError(f"config file {name_or_path} not found; pass an existing .py file or one of: {', '.join(list_configs())}")
        module = _module_from_path(path)
    else:
        if name_or_path not in list_configs():
            close = difflib.get_close_matches(name_or_path, list_configs(), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(
                f"unknown config {name_or_path!r}{hint}; use one of: {', '.join(list_configs())}, or a path to a .py file"
            )
        module = importlib.import_module(f"{__name__}.{name_or_path}")
    if not hasattr(module, "get_config"):
        raise UserError(f"config {name_or_path} has no get_config(); define get_config() returning an ml_collections.ConfigDict")
    return module.get_config()


def _parse_value(text: str, current):
    """Parses ``text`` to the type of the field's current value."""
    if isinstance(current, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        value = ast.literal_eval(text) if text.strip() else ()
        value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        return type(current)(value)
    # None or anything else: a Python literal if it parses, else the string.
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies ``--config.a.b=value`` (or ``--config.a.b value``) overrides in place.

    Values are parsed to the type of the field they replace (bool, int, float, str,
    tuple); unknown fields are a :class:`UserError` naming the closest match.
    """
    items = list(overrides)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--config."):
            raise UserError(f"unrecognized argument {arg!r}; config overrides look like --config.num_epochs=3")
        key = arg[len("--config."):]
        if "=" in key:
            key, text = key.split("=", 1)
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            i += 1
            text = items[i]
        else:
            raise UserError(f"override {arg} has no value; write it as {arg}=VALUE")
        i += 1
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                raise UserError(f"unknown config field {key!r}; see the printed config for valid fields")
            node = node[p]
        if leaf not in node:
            if parents and parents[-1] in _OPEN_FIELDS:
                with node.ignore_type():
                    node[leaf] = _parse_value(text, None)
                continue
            close = difflib.get_close_matches(leaf, list(node.keys()), n=1)
            hint = f" (did you mean {'.'.join([*parents, close[0]])}?)" if close else ""
            raise UserError(f"unknown config field {key!r}{hint}; see the printed config for valid fields")
        current = node[leaf]
        try:
            value = _parse_value(text, current)
        except (ValueError, SyntaxError) as e:
            raise UserError(f"bad value for --config.{key}: {e}; give a {type(current).__name__}") from None
        if current is None or type(current) is not type(value):
            with node.ignore_type():
                node[leaf] = value
        else:
            node[leaf] = value
    return config


def load_config(name_or_path: str | None = None, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """:func:`get_config` followed by :func:`apply_overrides`."""
    return apply_overrides(get_config(name_or_path), overrides)
