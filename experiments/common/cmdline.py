"""The command line every experiment script shares.

``--quick``, ``--outdir``, ``--dataset``, ``--data-dir``, ``--batch-size`` and (when a script
asks) ``--steps`` / ``--fresh``; any ``--config.FIELD=VALUE`` is collected and passed to
every run; :func:`command_line` is what a result records to be reproduced.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any, Mapping, Sequence


def split_overrides(parser: argparse.ArgumentParser, argv: Sequence[str]):
    """``parser.parse_known_args(argv)`` where the only unknown arguments allowed are
    ``--config.FIELD=VALUE`` overrides (passed to every run); returns ``(args, overrides)``."""
    args, rest = parser.parse_known_args(list(argv))
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like --config.num_epochs=3)")
    return args, rest


def experiment_parser(doc: str, name: str, quick_help: str, *, steps_help: str | None = None,
                      batch_help: str = "global batch (default: the recipe's)",
                      fresh_help: str | None = None) -> argparse.ArgumentParser:
    """The shared arguments; ``--steps`` / ``--fresh`` only when their help is given.

    Scripts add their own, then call :func:`parse_experiment_args`.
    """
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--outdir", default=None, help=f"output directory (default runs/experiments/{name}[_quick])")
    p.add_argument("--dataset", default=None, help="dataset (default: cifar10 if prepared, else digits; quick: digits)")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    if steps_help:
        p.add_argument("--steps", type=int, default=None, help=steps_help)
    p.add_argument("--batch-size", type=int, default=None, help=batch_help)
    if fresh_help:
        p.add_argument("--fresh", action="store_true", help=fresh_help)
    p.set_defaults(experiment_name=name)
    return p


def parse_experiment_args(parser: argparse.ArgumentParser, argv: Sequence[str], quick: Mapping[str, Any],
                          defaults: Mapping[str, Any] | None = None):
    """``(args, --config overrides)``.

    Arguments left unset take ``quick``'s values under ``--quick`` (which also means digits
    and a fresh run), then ``defaults``'.
    """
    args, overrides = split_overrides(parser, argv)
    if args.quick:
        args.dataset = args.dataset or "digits"
        if hasattr(args, "fresh"):
            args.fresh = True
    for source in ((quick if args.quick else {}), defaults or {}):
        for key, value in source.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    args.outdir = args.outdir or f"runs/experiments/{args.experiment_name}{'_quick' if args.quick else ''}"
    return args, overrides


def run_overrides(args: argparse.Namespace, **fields: str) -> dict[str, Any]:
    """Config overrides from the shared arguments that are set.

    ``num_train_steps`` (``--steps``), ``batch_size``, ``data_dir``, plus ``fields``
    (config field -> argument name).
    """
    names = {"num_train_steps": "steps", "batch_size": "batch_size", "data_dir": "data_dir", **fields}
    return {key: getattr(args, arg) for key, arg in names.items() if getattr(args, arg, None) is not None}


def as_overrides(overrides: Mapping[str, Any] | Sequence[str] = ()) -> list[str]:
    """``{"model": "plain56", "num_epochs": 3}`` -> ``["--config.model=plain56", "--config.num_epochs=3"]``.

    Strings that already look like ``--config.x=y`` pass through unchanged, so user overrides
    from the command line mix with the experiment's own.
    """
    if isinstance(overrides, Mapping):
        return [f"--config.{k}={v}" for k, v in overrides.items()]
    return list(overrides)


def command_line(script: str, argv: Sequence[str]) -> str:
    """The command that reproduces a result: ``python experiments/SCRIPT ARGS``."""
    return " ".join(["python", f"experiments/{script}", *map(shlex.quote, argv)])
