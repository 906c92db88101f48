"""The sweep's optional dependencies (optuna, PyYAML), imported on use with a one-line fix when missing.

They are the ``[sweep]`` extra, not core dependencies: training never needs them, so the
rest of the package imports without them and only ``flax-resnet sweep`` asks for them.
"""

from __future__ import annotations

from flax_resnet.errors import UserError

INSTALL_HINT = "pip install 'flax-resnet[sweep]'"


def require_optuna():
    """The ``optuna`` module, or a :class:`UserError` naming the install command."""
    try:
        import optuna
    except ImportError:
        raise UserError(f"the sweep needs optuna, which is not installed: {INSTALL_HINT}") from None
    return optuna


def require_yaml():
    """The ``yaml`` module (PyYAML), or a :class:`UserError` naming the install command."""
    try:
        import yaml
    except ImportError:
        raise UserError(f"the sweep's space files need PyYAML, which is not installed: {INSTALL_HINT}") from None
    return yaml
