"""One check of a config's numeric and named fields, before any work starts.

:func:`validate_config` runs where a config is loaded (:func:`flax_resnet.configs.load_config`,
after the overrides) and again at the start of
:func:`~flax_resnet.training.loop.train_and_evaluate`, so the CLI and the Python API refuse
the same bad values. Each failure is a one-line :class:`~flax_resnet.errors.UserError`
naming the field as ``--config.FIELD``, its value and the fix. Fields a config lacks are
not checked (a recipe may be partial; the trainer's defaults then apply).
"""

from __future__ import annotations

import math
import numbers

import ml_collections

from flax_resnet.errors import UserError
from flax_resnet.models import get_spec

# The learning-rate schedules flax_resnet.training.schedules.create_learning_rate_fn builds.
SCHEDULES = ("step", "cosine", "constant")
# The update rules flax_resnet.training.optimizer.create_optimizer builds.
OPTIMIZERS = ("sgd", "adamw", "lamb")
# The test metrics that may pick the best checkpoint.
BEST_METRICS = ("test_top1", "ema_test_top1")
BOOL_OR_NONE = ("true", "false", "none")  # a field whose default is None takes overrides as text


def _fail(field: str, value, fix: str):
    raise UserError(f"--config.{field}={value!r}: {fix}")


def _number(config, field: str, *, integer: bool = False):
    """The field's value, or None when absent; a UserError when it is not a (finite) number."""
    if field not in config:
        return None
    value = config[field]
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        _fail(field, value, f"must be {'an integer' if integer else 'a number'}")
    if not math.isfinite(value):
        _fail(field, value, "must be a finite number")
    return value


def _at_least(config, field: str, low, *, integer: bool = False, fix: str = ""):
    value = _number(config, field, integer=integer)
    if value is not None and value < low:
        _fail(field, value, fix or f"must be at least {low}")
    return value


def _numbers(config, field: str, fix: str):
    """A tuple of non-negative numbers (lr boundaries, unfreeze epochs)."""
    values = config.get(field, ()) or ()
    if not isinstance(values, (tuple, list)):
        values = (values,)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
            _fail(field, tuple(values), fix)


def parse_profile_steps(text, start_step: int = 0) -> tuple[int, int] | None:
    """``(first, end)`` steps to trace from ``config.profile_steps`` (None: off): ``"A,B"`` -> ``(A, B)``;
    ``"N"`` -> the N steps after ``start_step + 1`` (see :mod:`flax_resnet.training.profiling`)."""
    text = str(text or "").strip()
    if not text or text.lower() in ("0", "none", "off"):
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) == 1 and numbers[0] > 0:
        return start_step + 1, start_step + 1 + numbers[0]
    if len(numbers) == 2 and 0 <= numbers[0] < numbers[1]:
        return numbers[0], numbers[1]
    raise UserError(f"--config.profile_steps={text!r}: give a step count (e.g. 5) or a range FIRST,END of "
                    f"step numbers with FIRST < END (e.g. 10,15)")


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every numeric and named field of ``config``; returns it unchanged.

    Raises:
      UserError: the first bad field, e.g. ``--config.num_epochs=-1: must be at least 1 (or
        set --config.num_train_steps)``.
    """
    steps = _number(config, "num_train_steps", integer=True)
    if steps is not None and steps < -1:
        _fail("num_train_steps", steps, "must be at least 1 (or -1 or 0: train --config.num_epochs epochs)")
    if steps is None or steps <= 0:
        _at_least(config, "num_epochs", 1, integer=True,
                  fix="must be at least 1 (or set --config.num_train_steps)")
    lr = _number(config, "learning_rate")
    if lr is not None and lr <= 0:
        _fail("learning_rate", lr, "must be a positive number, e.g. 0.1")
    _at_least(config, "batch_size", 1, integer=True, fix="must be a positive integer (the global batch)")
    accum = _at_least(config, "grad_accum_steps", 1, integer=True, fix="must be at least 1 (1: no accumulation)")
    batch = config.get("batch_size")
    if accum and isinstance(batch, int) and batch % accum:
        _fail("grad_accum_steps", accum, f"must divide --config.batch_size={batch} (the global batch)")
    _at_least(config, "eval_batch_size", 0, integer=True,
              fix="must be a positive integer (or 0: the same as --config.batch_size)")
    size = _number(config, "image_size", integer=True)
    if size is not None and size != 0 and size < 8:
        _fail("image_size", size, "must be at least 8 (or 0: the dataset's default)")
    momentum = _number(config, "momentum")
    if momentum is not None and not 0 <= momentum < 1:
        _fail("momentum", momentum, "must be in [0, 1), e.g. 0.9")
    _at_least(config, "weight_decay", 0, fix="must be at least 0 (0: no weight decay)")
    _at_least(config, "grad_clip_norm", 0, fix="must be at least 0 (0: no clipping; 1.0 is usual)")
    for field, default in (("adam_b1", 0.9), ("adam_b2", 0.999)):
        beta = _number(config, field)
        if beta is not None and not 0 <= beta < 1:
            _fail(field, beta, f"must be in [0, 1), e.g. {default}")
    eps = _number(config, "adam_eps")
    if eps is not None and eps <= 0:
        _fail("adam_eps", eps, "must be a positive number, e.g. 1e-8")
    smoothing = _number(config, "label_smoothing")
    if smoothing is not None and not 0 <= smoothing < 1:
        _fail("label_smoothing", smoothing, "must be in [0, 1) (0: none; 0.1 is usual)")
    _at_least(config, "warmup_epochs", 0, fix="must be at least 0 (0: no warm-up)")
    _at_least(config, "warmup_steps", 0, integer=True, fix="must be at least 0 (0: no warm-up)")
    decay = _number(config, "lr_decay_factor")
    if decay is not None and decay <= 0:
        _fail("lr_decay_factor", decay, "must be a positive number, e.g. 0.1")
    _numbers(config, "lr_boundaries_steps", "must be update counts >= 0, e.g. (32000, 48000)")
    _numbers(config, "lr_boundaries_epochs", "must be epochs >= 0, e.g. (100, 150)")
    _numbers(config, "unfreeze_epochs", "must be epochs >= 0, e.g. (1, 2, 3)")
    bn = config.get("freeze_bn_stats", None)
    if not (bn is None or isinstance(bn, bool) or (isinstance(bn, str) and bn.strip().lower() in BOOL_OR_NONE)):
        _fail("freeze_bn_stats", bn, "must be true, false or none (none: frozen where the backbone's weights are)")
    _at_least(config, "log_every_steps", 1, integer=True, fix="must be at least 1")
    _at_least(config, "checkpoint_every_steps", 0, integer=True, fix="must be at least 0 (0: at epoch ends only)")
    _at_least(config, "max_to_keep", 1, integer=True, fix="must be at least 1")
    _at_least(config, "backbone_lr_mult", 0, fix="must be at least 0 (0: backbone learns nothing; 1: as the head)")
    _at_least(config, "num_workers", -1, integer=True,
              fix="must be -1 (one per core but one), 0 (load in this process) or a worker count")
    ema = _number(config, "ema_decay")
    if ema is not None and not 0 <= ema < 1:
        _fail("ema_decay", ema, "must be in [0, 1) (0: no EMA; 0.999 or 0.9999 are usual)")
    if "best_metric" in config:
        if config.best_metric not in BEST_METRICS:
            _fail("best_metric", config.best_metric, f"must be one of {', '.join(BEST_METRICS)}")
        if config.best_metric == "ema_test_top1" and not ema:
            _fail("best_metric", config.best_metric, "needs an EMA: set --config.ema_decay, e.g. 0.999")
    if "profile_steps" in config:
        parse_profile_steps(config.profile_steps)  # UserError naming the field and the two forms
    if "optimizer" in config and config.optimizer not in OPTIMIZERS:
        _fail("optimizer", config.optimizer, f"must be one of {', '.join(OPTIMIZERS)}")
    if "schedule" in config and config.schedule not in SCHEDULES:
        _fail("schedule", config.schedule, f"must be one of {', '.join(SCHEDULES)}")
    if "model" in config:
        if not isinstance(config.model, str) or not config.model:
            _fail("model", config.model, "name a registered model: run `flax-resnet models` to list them")
        get_spec(config.model)  # UserError naming close matches
    return config
