"""The best trial written as a recipe file, ``best_config.py``, that ``flax-resnet train --config`` runs.

The file loads the sweep's base recipe and sets, field by field, what the trial changed: the
sweep's ``--config`` overrides and the searched parameters. A person reads the difference at a
glance, and the recipe's own docstring stays the reference for the rest. Writing checks that the
file loads back to exactly the trial's config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_collections

from flax_resnet.configs import DEFAULT_CONFIG, get_config, list_configs

FILE = "best_config.py"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _recipe_ref(base_config: str | None) -> str:
    """The base recipe as ``get_config`` takes it: a shipped name, or an absolute path."""
    name = base_config or DEFAULT_CONFIG
    return name if name in list_configs() else str(Path(name).expanduser().resolve())


def _normalised(config: ml_collections.ConfigDict) -> dict:
    return json.loads(json.dumps(config.to_dict()))


def render(base_config: str | None, trial_config: ml_collections.ConfigDict, params: dict, *, title: str,
           expect: str) -> str:
    """The text of the recipe file: ``base_config`` plus every field where ``trial_config`` differs."""
    ref = _recipe_ref(base_config)
    base = _flat(get_config(ref).to_dict())
    want = _flat(trial_config.to_dict())
    changed = {k: v for k, v in want.items() if k not in base or base[k] != v or type(base[k]) is not type(v)}
    by_parent: dict[str, list[str]] = {}
    for key in sorted(changed, key=lambda k: (k not in params, k)):  # searched fields first
        parent, _, leaf = key.rpartition(".")
        note = "  # searched" if key in params else ""
        by_parent.setdefault(parent, []).append(f"        {'c.' + parent + '.' if parent else 'c.'}{leaf} = "
                                                f"{changed[key]!r}{note}")
    body = []
    for parent, lines in by_parent.items():
        body.append(f"    with c{'.' + parent if parent else ''}.ignore_type():")
        body.extend(lines)
    return "\n".join([
        f'"""{title}',
        "",
        f"Written by `flax-resnet sweep`: the recipe {ref} with the sweep's overrides and the trial's",
        "searched parameters (marked below).",
        "",
        "Run:    flax-resnet train --config PATH/best_config.py",
        f"Expect: {expect}",
        '"""',
        "",
        "from flax_resnet.configs import get_config as _recipe",
        "",
        "",
        "def get_config():",
        f"    c = _recipe({ref!r})",
        *(body or ["    # the recipe unchanged"]),
        "    return c",
        "",
    ])


def write_best_config(path: str | Path, base_config: str | None, trial_config: ml_collections.ConfigDict,
                      params: dict, *, title: str, expect: str) -> Path:
    """Writes the recipe file and proves it loads back to ``trial_config``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(render(base_config, trial_config, params, title=title, expect=expect))
    tmp.replace(path)  # atomic: several workers may write it
    loaded = get_config(str(path))
    if _normalised(loaded) != _normalised(trial_config):
        raise RuntimeError(f"{path} does not load back to the best trial's config; please report this bug")
    return path
