"""Learning-rate schedules: the paper's step schedule, warm-up + cosine, constant.

All schedules are ``optax`` schedules: pure functions of the (0-based) update count,
evaluated inside the jitted step.
"""

from __future__ import annotations

from typing import Sequence

import optax

from flax_resnet.configs.validate import SCHEDULES
from flax_resnet.errors import UserError



def scaled_learning_rate(base_lr: float, batch_size: int, linear_scaling: bool) -> float:
    """The linear scaling rule (Goyal et al.): ``base_lr * batch_size / 256`` when enabled."""
    return base_lr * batch_size / 256.0 if linear_scaling else base_lr


def _with_warmup(schedule: optax.Schedule, peak: float, warmup_steps: int) -> optax.Schedule:
    if warmup_steps <= 0:
        return schedule
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, schedule], [warmup_steps])


def step_schedule(
    base_lr: float, boundaries: Sequence[int], factor: float = 0.1, warmup_steps: int = 0
) -> optax.Schedule:
    """``base_lr``, multiplied by ``factor`` at each boundary (an update count).

    The paper's CIFAR schedule is ``step_schedule(0.1, (32000, 48000))``: 0.1 for updates
    0..31999, 0.01 from 32000, 0.001 from 48000. Optional linear warm-up from 0 over the
    first ``warmup_steps`` updates (boundaries count from the start of training).
    """
    bounds = sorted(int(b) for b in boundaries)
    after = optax.piecewise_constant_schedule(
        base_lr, {b - max(warmup_steps, 0): factor for b in bounds if b > warmup_steps}
    )
    return _with_warmup(after, base_lr, warmup_steps)


def warmup_cosine_schedule(
    base_lr: float, total_steps: int, warmup_steps: int = 0, end_lr: float = 0.0
) -> optax.Schedule:
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then cosine to ``end_lr``.

    As Flax's ImageNet example: the cosine spans the ``total_steps - warmup_steps``
    updates after the warm-up.
    """
    decay_steps = max(int(total_steps) - int(warmup_steps), 1)
    cosine = optax.cosine_decay_schedule(
        base_lr, decay_steps, alpha=(end_lr / base_lr) if base_lr else 0.0
    )
    return _with_warmup(cosine, base_lr, warmup_steps)


def create_learning_rate_fn(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """The schedule a config asks for.

    Uses ``config.schedule`` (``step`` | ``cosine`` | ``constant``), ``learning_rate``,
    ``linear_scaling`` (with ``batch_size``), ``warmup_epochs`` / ``warmup_steps``,
    ``lr_boundaries_steps`` or ``lr_boundaries_epochs``, and ``lr_decay_factor``.
    """
    lr = scaled_learning_rate(config.learning_rate, config.batch_size, config.linear_scaling)
    warmup = int(config.get("warmup_steps", 0) or 0) or int(
        round(config.get("warmup_epochs", 0) * steps_per_epoch)
    )
    name = config.schedule
    if name == "step":
        bounds = list(config.get("lr_boundaries_steps", ()) or ())
        bounds += [int(round(e * steps_per_epoch)) for e in (config.get("lr_boundaries_epochs", ()) or ())]
        return step_schedule(lr, bounds, config.get("lr_decay_factor", 0.1), warmup)
    if name == "cosine":
        return warmup_cosine_schedule(lr, total_steps, warmup)
    if name == "constant":
        return _with_warmup(optax.constant_schedule(lr), lr, warmup)
    raise UserError(
        f"unknown schedule {name!r}; set --config.schedule to one of {', '.join(SCHEDULES)}"
    )
