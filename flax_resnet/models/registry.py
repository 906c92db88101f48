"""Named model variants: ``create_model(name, ...)`` and ``list_models()``.

Each entry is the architecture of a published network (torchvision's ImageNet models,
the CIFAR networks of He et al. 2015, the pre-activation networks of He et al. 2016b,
the article's network) with its default input size.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Any

import jax.numpy as jnp
from flax import nnx

from flax_resnet.errors import UserError
from flax_resnet.models.article import ArticleResNet
from flax_resnet.models.resnet import ResNet


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    kwargs: dict[str, Any]      # arguments of ``builder``
    input_size: int             # default square input resolution
    num_classes: int            # default classifier size
    description: str
    builder: type = ResNet      # the model class ``create_model`` builds


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, description: str, *, input_size: int, num_classes: int, builder: type = ResNet,
             **kwargs) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = ModelSpec(name, kwargs, input_size, num_classes, description, builder)


# ----------------------------------------------------------------- ImageNet (torchvision)
_IMAGENET = dict(input_size=224, num_classes=1000, stem="imagenet", widths=(64, 128, 256, 512))
_DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
           50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
           152: ("bottleneck", (3, 8, 36, 3))}
for _d, (_block, _layers) in _DEPTHS.items():
    register(f"resnet{_d}", f"ResNet-{_d} (torchvision, v1.5)", block=_block, layers=_layers, **_IMAGENET)
    register(f"preact_resnet{_d}", f"pre-activation ResNet-{_d} (v2)", block="preact_" + _block,
             layers=_layers, **_IMAGENET)
register("wide_resnet50_2", "Wide ResNet-50-2 (torchvision)", block="bottleneck",
         layers=(3, 4, 6, 3), base_width=128, **_IMAGENET)
register("wide_resnet101_2", "Wide ResNet-101-2 (torchvision)", block="bottleneck",
         layers=(3, 4, 23, 3), base_width=128, **_IMAGENET)
register("resnext50_32x4d", "ResNeXt-50 32x4d (torchvision)", block="bottleneck",
         layers=(3, 4, 6, 3), groups=32, base_width=4, **_IMAGENET)
register("resnext101_32x8d", "ResNeXt-101 32x8d (torchvision)", block="bottleneck",
         layers=(3, 4, 23, 3), groups=32, base_width=8, **_IMAGENET)

# ----------------------------------------------------------------- CIFAR (He et al. 2015, sec. 4.2)
_CIFAR = dict(input_size=32, num_classes=10, stem="cifar", stem_width=16, widths=(16, 32, 64))
for _depth in (20, 32, 44, 56, 110, 1202):
    _n = (_depth - 2) // 6
    register(f"resnet{_depth}", f"CIFAR ResNet-{_depth} (6n+2, n={_n}, option A)", block="basic",
             layers=(_n,) * 3, shortcut="A", **_CIFAR)
    if _depth <= 110:
        register(f"plain{_depth}", f"CIFAR plain-{_depth} (no shortcuts)", block="plain",
                 layers=(_n,) * 3, **_CIFAR)
register("resnet8", "CIFAR ResNet-8 (n=1): a tiny network for tests and smoke runs",
         block="basic", layers=(1, 1, 1), shortcut="A", **_CIFAR)
# Pre-activation CIFAR networks (He et al. 2016b): 9n+2 bottleneck / 6n+2 basic.
register("preact_resnet110", "pre-activation CIFAR ResNet-110 (basic units)", block="preact_basic",
         layers=(18, 18, 18), **_CIFAR)
register("preact_resnet164", "pre-activation CIFAR ResNet-164 (bottleneck units)",
         block="preact_bottleneck", layers=(18, 18, 18), **_CIFAR)

# ----------------------------------------------------------------- the article's network
register("article_resnet", "the article's network as written (9 blocks, width 64), fixed only where "
         "its code cannot run", builder=ArticleResNet, num_blocks=9, input_size=32, num_classes=10)
register("article_resnet_widened", "our fix, not the article's: 7x7/2 stem, 4 article blocks "
         "(64->512, max-pools between)", block="article", layers=(1, 1, 1, 1),
         widths=(64, 128, 256, 512), stem="article", input_size=32, num_classes=10)


# ----------------------------------------------------------------- public API
def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, optionally filtered by a glob (``"resnet*"``) or substring."""
    names = sorted(_REGISTRY, key=_sort_key)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern) or pattern in n]
    return names


def _sort_key(name: str):
    stem = name.rstrip("0123456789_xd")
    digits = "".join(c for c in name[len(stem):] if c.isdigit())
    return (stem, int(digits) if digits else 0, name)


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; a :class:`UserError` naming close matches if unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown model {name!r}{hint}: run `flax-resnet models` to list the "
                        f"{len(_REGISTRY)} registered models") from None


def create_model(name: str, num_classes: int | None = None, *, rngs: nnx.Rngs | None = None,
                 seed: int = 0, **overrides: Any) -> nnx.Module:
    """Build a registered model.

    Args:
      name: a name from :func:`list_models`, e.g. ``"resnet50"`` or ``"resnet20"``.
      num_classes: classifier size; defaults to the model's (1000 ImageNet, 10 CIFAR).
      rngs: NNX random streams; defaults to ``nnx.Rngs(seed)``.
      seed: used only when ``rngs`` is not given.
      **overrides: any argument of the entry's class (:class:`~flax_resnet.models.resnet.ResNet`,
        :class:`~flax_resnet.models.article.ArticleResNet`), e.g. ``in_channels=1``,
        ``dtype=jnp.bfloat16``, ``zero_init_residual=True``, ``shortcut="B"``, ``num_blocks=3``.
    """
    spec = get_spec(name)
    kwargs = dict(spec.kwargs)
    kwargs.update(overrides)
    kwargs["num_classes"] = spec.num_classes if num_classes is None else num_classes
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    try:
        return spec.builder(**kwargs, rngs=rngs if rngs is not None else nnx.Rngs(seed))
    except TypeError as e:
        raise UserError(f"bad option for model {name!r}: {e}") from None
