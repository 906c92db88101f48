"""The search space: a YAML file mapping config fields to Optuna distributions, checked before any trial.

One line per field, the field named as on the command line without ``--config.`` (dotted for
nested fields)::

    learning_rate: {distribution: loguniform, low: 0.01, high: 0.5}
    weight_decay:  {distribution: loguniform, low: 1.0e-5, high: 1.0e-3}
    momentum:      {distribution: uniform, low: 0.8, high: 0.95}        # optional step
    batch_size:    {distribution: int, low: 32, high: 128, step: 32}   # optional step, log
    schedule:      {distribution: categorical, choices: [cosine, step]}

Every mistake is a one-line :class:`~flax_resnet.errors.UserError` naming the file, the field
and the fix, raised before anything trains: an unknown field, a distribution that does not fit
the field's type (``uniform`` on an integer field), a bad range, or a range reaching a value
the trainer refuses (both ends and every choice go through
:func:`~flax_resnet.configs.validate_config`).
"""

from __future__ import annotations

import copy
import difflib
import math
import numbers
from pathlib import Path
from typing import Any

import ml_collections

from flax_resnet.configs import validate_config
from flax_resnet.errors import UserError
from flax_resnet.sweep.optional import require_optuna, require_yaml

# distribution name -> (required keys, optional keys)
KINDS = {
    "loguniform": ({"low", "high"}, set()),
    "uniform": ({"low", "high"}, {"step"}),
    "int": ({"low", "high"}, {"step", "log"}),
    "categorical": ({"choices"}, set()),
}
EXAMPLE = "learning_rate: {distribution: loguniform, low: 0.01, high: 0.5}"


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def get_field(config: ml_collections.ConfigDict, field: str):
    """The value of dotted ``field`` in ``config``; KeyError naming the closest field when absent."""
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
            raise KeyError(field)
        node = node[p]
    if leaf not in node:
        close = difflib.get_close_matches(leaf, list(node.keys()), n=1)
        raise KeyError(".".join([*parents, close[0]]) if close else None)
    return node[leaf]


def set_fields(config: ml_collections.ConfigDict, values: dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with each dotted field set to its value (types follow the values)."""
    config = copy.deepcopy(config)
    for field, value in values.items():
        *parents, leaf = field.split(".")
        node = config
        for p in parents:
            node = node[p]
        with node.ignore_type():
            node[leaf] = value
    return config


def apply_params(config: ml_collections.ConfigDict, params: dict[str, Any]) -> ml_collections.ConfigDict:
    """A trial's config: ``config`` with the trial's parameters set, validated."""
    return validate_config(set_fields(config, params))


def _fail(path, field: str, problem: str, fix: str):
    raise UserError(f"space file {path}: {field}: {problem}; {fix}")


def _distribution(optuna, path, field: str, spec, current):
    """One field's Optuna distribution, checked against the field's current value."""
    if not isinstance(spec, dict) or "distribution" not in spec:
        _fail(path, field, f"got {spec!r}", f"write it as {{distribution: KIND, ...}} with KIND one of "
              f"{', '.join(KINDS)}, e.g. {EXAMPLE}")
    kind = spec["distribution"]
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), list(KINDS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        _fail(path, field, f"unknown distribution {kind!r}{hint}", f"use one of {', '.join(KINDS)}")
    required, optional = KINDS[kind]
    keys = set(spec) - {"distribution"}
    if required - keys:
        _fail(path, field, f"{kind} needs {', '.join(sorted(required - keys))}", f"add it, e.g. {EXAMPLE}")
    if keys - required - optional:
        allowed = ", ".join(sorted(required | optional))
        _fail(path, field, f"{kind} takes no {', '.join(sorted(keys - required - optional))}", f"use only {allowed}")
    if isinstance(current, (ml_collections.ConfigDict, tuple, list, dict)):
        _fail(path, field, f"is a {type(current).__name__} field", "search scalar fields only (numbers, "
              "strings, booleans)")
    if kind == "categorical":
        return _categorical(optuna, path, field, spec["choices"], current)
    low, high = spec["low"], spec["high"]
    if kind == "int":
        step, log = spec.get("step", 1), spec.get("log", False)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, step)):
            _fail(path, field, f"int needs integer low/high/step, got {low!r}/{high!r}/{step!r}",
                  "give whole numbers (or use uniform for a float field)")
        if current is not None and (isinstance(current, bool) or not isinstance(current, numbers.Real)):
            _fail(path, field, f"is a {type(current).__name__} field", "use categorical with its choices")
        if step < 1 or not isinstance(log, bool) or (log and step != 1) or low > high or (log and low < 1):
            _fail(path, field, f"bad int range low={low} high={high} step={step} log={log}",
                  "need low <= high, step >= 1, and with log: true, low >= 1 and no step")
        return optuna.distributions.IntDistribution(low, high, log=log, step=step)
    if not (_is_number(low) and _is_number(high)):
        _fail(path, field, f"{kind} needs numbers low/high, got {low!r}/{high!r}", "give numbers, e.g. 1.0e-4 "
              "(YAML reads 1e-4 without a dot as a string)")
    if isinstance(current, int) or (current is not None and not isinstance(current, float)):
        kind_fix = "use distribution: int" if isinstance(current, int) and not isinstance(current, bool) \
            else "use categorical with its choices"
        _fail(path, field, f"is a {type(current).__name__} field, {kind} draws floats", kind_fix)
    if low > high or (kind == "loguniform" and low <= 0):
        _fail(path, field, f"bad {kind} range low={low} high={high}",
              "need low <= high" + (" and low > 0" if kind == "loguniform" else ""))
    step = spec.get("step")
    if step is not None and not (_is_number(step) and step > 0):
        _fail(path, field, f"bad step {step!r}", "give a positive number or leave step out")
    return optuna.distributions.FloatDistribution(float(low), float(high), log=kind == "loguniform",
                                                  step=None if step is None else float(step))


def _categorical(optuna, path, field: str, choices, current):
    if not isinstance(choices, list) or not choices:
        _fail(path, field, f"choices must be a non-empty list, got {choices!r}", "write choices: [a, b]")
    for c in choices:
        if c is not None and not isinstance(c, (bool, int, float, str)):
            _fail(path, field, f"choice {c!r} is a {type(c).__name__}", "give numbers, strings, booleans or null")
    if isinstance(current, float) and all(_is_number(c) for c in choices):
        choices = [float(c) for c in choices]  # 1 and 1.0 are one choice of a float field
    if current is not None:
        want = (numbers.Real,) if isinstance(current, float) else (type(current),)
        bad = [c for c in choices if not isinstance(c, want) or isinstance(c, bool) != isinstance(current, bool)]
        if bad:
            _fail(path, field, f"choice {bad[0]!r} does not fit this {type(current).__name__} field",
                  f"give {type(current).__name__} choices")
    if len(set(map(repr, choices))) != len(choices):
        _fail(path, field, f"repeated choices in {choices!r}", "list each choice once")
    return optuna.distributions.CategoricalDistribution(choices)


def _extremes(dist) -> list:
    """The values that bound a distribution: both ends, or every choice."""
    return list(dist.choices) if hasattr(dist, "choices") else [dist.low, dist.high]


def parse_space(raw, config: ml_collections.ConfigDict, path: str | Path = "<space>") -> dict:
    """``{field: optuna distribution}`` from a parsed YAML mapping, checked against ``config``."""
    optuna = require_optuna()
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"space file {path}: expected a mapping of config fields to distributions, got "
                        f"{type(raw).__name__}; write one field per line, e.g. {EXAMPLE}")
    space = {}
    for field, spec in raw.items():
        if not isinstance(field, str):
            raise UserError(f"space file {path}: key {field!r} is not a config field name; write e.g. {EXAMPLE}")
        try:
            current = get_field(config, field)
        except KeyError as e:
            hint = f" (did you mean {e.args[0]}?)" if e.args and e.args[0] else ""
            _fail(path, field, f"no such config field{hint}", "name a field of the recipe (without --config.)")
        dist = _distribution(optuna, path, field, spec, current)
        for value in _extremes(dist):
            try:
                validate_config(set_fields(config, {field: value}))
            except UserError as e:
                _fail(path, field, f"the value {value!r} is refused ({e})", "narrow the range or the choices")
        space[field] = dist
    return space


def load_space(path: str | Path, config: ml_collections.ConfigDict) -> dict:
    """Reads and checks a space file: ``{field: optuna distribution}`` in the file's order."""
    yaml = require_yaml()
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"space file {path} cannot be read ({e.strerror or e}); pass an existing YAML "
                        f"file with lines like {EXAMPLE}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"space file {path} is not valid YAML{where} ({getattr(e, 'problem', None) or e}); "
                        f"fix it, e.g. {EXAMPLE}") from None
    return parse_space(raw, config, path)


def suggest(trial, space: dict) -> dict[str, Any]:
    """Draws every field of ``space`` for ``trial`` (a retried trial gets its fixed values back)."""
    optuna = require_optuna()
    params = {}
    for field, dist in space.items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            params[field] = trial.suggest_categorical(field, dist.choices)
        elif isinstance(dist, optuna.distributions.IntDistribution):
            params[field] = trial.suggest_int(field, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            params[field] = trial.suggest_float(field, dist.low, dist.high, step=dist.step, log=dist.log)
    return params


def describe(space: dict) -> str:
    """One line per field, for the sweep's header."""
    out = []
    for field, d in space.items():
        if hasattr(d, "choices"):
            out.append(f"  {field}: one of {list(d.choices)}")
        else:
            scale = "log" if d.log else "linear"
            step = f", step {d.step}" if d.step not in (None, 1) else ""
            out.append(f"  {field}: {d.low} .. {d.high} ({scale}{step})")
    return "\n".join(out)
