"""Whether a workdir's checkpoint may be resumed under a config: the fields a resumed run must keep."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from flax_resnet.errors import UserError
from flax_resnet.training import optimizer


def info_dict(info) -> dict[str, Any]:
    d = dataclasses.asdict(info) if dataclasses.is_dataclass(info) else dict(vars(info))
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# Fields that change the shapes or meaning of the saved state: a resumed run must keep them.
_RESUME_KEYS = ("model", "model_kwargs", "dataset", "optimizer", "momentum", "nesterov", "seed",
                # fine-tuning: the optimiser's parameter groups (state structure) and BN mode
                "freeze_backbone", "backbone_lr_mult", "unfreeze_epochs")


def _bn_mode(config) -> str:
    """What ``freeze_bn_stats`` does for ``config`` (a dict or ConfigDict): ``all``, ``none`` or
    ``with-groups``; so a run saved with ``False`` (the old default) resumes under ``None``."""
    setting = optimizer.freeze_bn_setting(config)
    if setting is None:
        follows = config.get("freeze_backbone", False) or tuple(config.get("unfreeze_epochs", ()) or ())
        return "with-groups" if follows else "none"
    return "all" if setting else "none"


def check_resumable(saved: dict, saved_meta: dict, config, info, workdir) -> None:
    """Raises a :class:`UserError` naming every key where ``workdir``'s checkpoint differs from ``config``."""
    now = json.loads(json.dumps(config.to_dict()))  # as saved: tuples become lists
    diff = [(k, saved[k], now.get(k)) for k in _RESUME_KEYS if k in saved and saved[k] != now.get(k)]
    if _bn_mode(saved) != _bn_mode(now):  # which BatchNorms keep their statistics
        diff.append(("freeze_bn_stats", saved.get("freeze_bn_stats"), now.get("freeze_bn_stats")))
    for key in ("grad_clip_norm", "ema_decay"):  # on/off changes the state's structure; the value may change
        if bool(saved.get(key)) != bool(now.get(key)):
            diff.append((key, saved.get(key, 0.0), now.get(key)))
    saved_info = saved_meta.get("dataset_info") or {}
    for key, current in (("num_classes", int(info.num_classes)), ("in_channels", int(info.image_shape[-1]))):
        was = saved_info.get(key) if key == "num_classes" else (saved_info.get("image_shape") or [None])[-1]
        if was is not None and int(was) != current:
            diff.append((key, int(was), current))
    if diff:
        what = ", ".join(f"{k}={a!r} (now {b!r})" for k, a, b in diff)
        raise UserError(f"{workdir} holds a run with {what}; resume with the same settings or pass a fresh --workdir "
                        f"(to start from its weights with a new head, fine-tune into a fresh workdir)")
