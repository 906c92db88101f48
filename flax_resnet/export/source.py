"""What an export starts from: a model built from the plain layers, loaded from a run or a weights file,
and the facts a caller of the exported model needs (image size, normalisation, class names).

The plain layers (:func:`flax_resnet.models.create_model`), never the CPU backend's: those lower
convolutions to FFI custom calls that ``jax.export`` refuses to serialise. Both kinds of layer
hold the same parameters, so a run trained with the CPU backend loads into the plain model as is.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from flax import nnx

from flax_resnet import pretrained
from flax_resnet.data.info import IMAGENET_MEAN, IMAGENET_STD, NORMALIZATION
from flax_resnet.errors import UserError
from flax_resnet.models import ArticleResNet, create_model, get_spec
from flax_resnet.training.restore import restore_model


@dataclasses.dataclass
class ExportSource:
    """A plain-layer model in eval mode and its input facts.

    Attributes:
      model: the NNX model (float32 parameters, BatchNorm in eval mode).
      name: its registry name.
      image_size: the square side it was trained at; in_channels: image channels.
      mean, std: per-channel normalisation on the 0-1 scale; empty: the model sees ``pixel / 255``.
      class_names: one per logit, or empty when the weights do not say.
      origin: where the weights came from (``source``, and for a run ``checkpoint``, ``step``).
    """

    model: nnx.Module
    name: str
    image_size: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    origin: dict[str, Any]


def plain_model(name: str, params: Mapping, batch_stats: Mapping, *, num_classes: int, in_channels: int,
                **model_kwargs: Any) -> nnx.Module:
    """Registered model ``name`` from the plain layers holding ``params``/``batch_stats`` (pure dicts), in eval mode."""
    abstract = nnx.eval_shape(lambda: create_model(name, num_classes=num_classes, in_channels=in_channels,
                                                   **model_kwargs))
    graphdef, p_state, s_state = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    nnx.replace_by_pure_dict(p_state, params)
    nnx.replace_by_pure_dict(s_state, batch_stats)
    model = nnx.merge(graphdef, p_state, s_state)
    model.eval()
    return model


def from_run(workdir: str | os.PathLike, which: str = "best") -> ExportSource:
    """The ``which`` checkpoint (``"best"`` or ``"latest"``) of a training or fine-tuning run."""
    restored = restore_model(workdir, which)
    config, info = restored.config, restored.dataset_info
    kwargs = dict(config.get("model_kwargs", {}) or {})
    kwargs.pop("conv_impl", None)
    h, _, c = (int(v) for v in info["image_shape"])
    model = plain_model(config.model, restored.state.params, restored.state.batch_stats,
                        num_classes=int(info["num_classes"]), in_channels=c, **kwargs)
    return ExportSource(model, config.model, h, c, tuple(info.get("mean") or ()), tuple(info.get("std") or ()),
                        tuple(info.get("class_names") or ()),
                        {"source": str(Path(workdir).absolute()), "checkpoint": which, "step": restored.step,
                         "dataset": config.dataset})


def default_normalization(name: str, in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """What a weights file of ``name`` most likely expects: ImageNet's statistics for the ImageNet
    family, CIFAR-10's for the 32x32 networks, ``pixel / 255`` for the article's (its recipe)."""
    spec = get_spec(name)
    if spec.builder is ArticleResNet or in_channels != 3:
        return (), ()
    if spec.input_size <= 32:
        return NORMALIZATION["cifar10"]
    return IMAGENET_MEAN, IMAGENET_STD


def from_weights(path: str | os.PathLike, name: str, *, image_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 class_names: Sequence[str] | None = None) -> ExportSource:
    """A PyTorch-layout weights file (``.safetensors``/``.pth``, as ``flax-resnet convert`` writes or
    torchvision ships) of architecture ``name``; unset input facts take the model's defaults."""
    if not name:
        raise UserError("pass --model NAME (e.g. --model resnet50) with --pretrained: the weights' architecture")
    spec = get_spec(name)
    given = pretrained.read_state_dict(path)
    conv1 = given.get("conv1.weight")
    in_channels = int(conv1.shape[1]) if conv1 is not None and conv1.ndim == 4 else 3
    classes = pretrained.head_classes(given)
    abstract = nnx.eval_shape(lambda: create_model(name, num_classes=classes, in_channels=in_channels))
    _, params, stats = pretrained.split_state(abstract)
    params, stats, _ = pretrained.from_torch_state_dict(given, params, stats, source=str(path),
                                                        model_cls=spec.builder)
    model = plain_model(name, params, stats, num_classes=classes, in_channels=in_channels)
    d_mean, d_std = default_normalization(name, in_channels)
    return ExportSource(model, name, int(image_size or spec.input_size), in_channels,
                        tuple(d_mean if mean is None else mean), tuple(d_std if std is None else std),
                        tuple(class_names or ()), {"source": str(Path(path).absolute())})
