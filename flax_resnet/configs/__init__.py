"""Recipes (one file per recipe) and the loader that picks one and applies overrides.

A recipe is a module with ``get_config() -> ml_collections.ConfigDict``. Pick it by
name (a module in this package, e.g. ``cifar10_resnet56``) or by path to a ``.py`` file,
then override fields from the command line as ``--config.num_epochs=3``.
:func:`load_config` checks the result with :func:`validate_config` (also run by the trainer).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import os
import pkgutil
from pathlib import Path
from typing import Sequence

import ml_collections

from flax_resnet.configs.validate import validate_config
from flax_resnet.errors import UserError

DEFAULT_CONFIG = "digits_resnet20"
_NOT_RECIPES = {"default", "validate"}
# ConfigDict fields under which overrides may create new keys (free-form kwargs).
_OPEN_FIELDS = {"model_kwargs"}


def list_configs() -> list[str]:
    """Names of the recipes shipped in this package."""
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return sorted(n for n in names if n not in _NOT_RECIPES)


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _is_path(name_or_path: str) -> bool:
    """A path only when it ends in ``.py`` or holds a path separator; otherwise a recipe name."""
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return name_or_path.endswith(".py") or any(s in name_or_path for s in seps)


def _config_from_file(path: Path) -> ml_collections.ConfigDict:
    """Runs ``path``'s ``get_config()``; any failure is a one-line :class:`UserError`."""
    if not path.is_file():
        raise UserError(f"config file {path} not found: pass an existing .py file or one of: {', '.join(list_configs())}")
    spec = importlib.util.spec_from_file_location(f"flax_resnet_user_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise UserError(f"config file {path} is not a Python module: give it a .py name")
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise UserError(f"config file {path} has a syntax error at line {e.lineno}: {e.msg}; "
                        "fix it (python -m py_compile shows where)") from None
    except Exception as e:  # pylint: disable=broad-except  # a user's file may raise anything
        raise UserError(f"config file {path} failed to load ({_first_line(e)}): fix the file or the "
                        "environment it imports from") from None
    get = getattr(module, "get_config", None)
    if not callable(get):
        raise UserError(f"config file {path} has no get_config(): define get_config() returning an "
                        "ml_collections.ConfigDict")
    try:
        config = get()
    except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"config file {path}: get_config() raised {_first_line(e)}: fix get_config()") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"config file {path}: get_config() returned {type(config).__name__}, not an "
                        "ml_collections.ConfigDict: return one (see flax_resnet/configs/default.py)")
    return config


def get_config(name_or_path: str | None = None) -> ml_collections.ConfigDict:
    """Loads a recipe by name (``cifar10_resnet20``) or by path (``my_recipe.py``).

    Recipe names resolve first; ``name_or_path`` is a file only when it ends in ``.py`` or
    holds a path separator (so a file named like a recipe in the current directory does not
    shadow it). Any failure to load a file is a one-line :class:`UserError`.
    """
    name_or_path = name_or_path or DEFAULT_CONFIG
    if name_or_path in list_configs():
        return importlib.import_module(f"{__name__}.{name_or_path}").get_config()
    if _is_path(name_or_path):
        return _config_from_file(Path(name_or_path).expanduser())
    close = difflib.get_close_matches(name_or_path, list_configs(), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    if Path(name_or_path).is_file():
        hint += f" (the file {name_or_path} here is not read as a config: name it {name_or_path}.py to use it)"
    raise UserError(
        f"unknown config {name_or_path!r}{hint}; use one of: {', '.join(list_configs())}, or a path to a .py file"
    )


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
    """:func:`get_config`, then :func:`apply_overrides`, then :func:`validate_config`."""
    return validate_config(apply_overrides(get_config(name_or_path), overrides))
