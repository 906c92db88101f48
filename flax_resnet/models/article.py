"""The article's network as written: ``ResNet(num_blocks=9, num_classes)``, width 64 throughout.

The article's PyTorch code, and what we changed only because it cannot run:

* stem: ``conv1`` 7x7/2 with bias (in -> 64), then ``MaxPool2d(3, 2, padding=1)``; no BatchNorm.
* ``_make_layers``: per block ``i``: ``ResidualBlock(64, 64)`` (conv3x3 -> ReLU -> conv3x3,
  both with bias, plus the identity; no ReLU after the addition), ``BatchNorm2d`` -> ReLU,
  and between blocks ``MaxPool2d(3, stride=1 if i == 0 else 2, padding=1)`` ->
  ``BatchNorm2d`` -> ReLU; then adaptive average pool, flatten and ``self.fc``. The article
  uses ``self.fc`` there before ``__init__`` assigns it (an AttributeError: we define the
  classifier first), and ``forward`` applies it a second time (a shape error: we apply it once).

On 32x32 inputs the map is 8x8 after the stem and 1x1 from the fourth block on: the
article's choice, kept. Every layer takes PyTorch's default initialisation, as the article does.
Our attribute names give fine-tuning its groups (``conv1`` the stem, ``layer1``..``layerN``
one per block, ``fc`` the head); :func:`torch_keys` maps them to the article's state-dict keys.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from flax_resnet.errors import UserError
from flax_resnet.models.head import ClassifierHead
from flax_resnet.models.layers import BatchNorm, Layers, max_pool

WIDTH = 64
_MODULES_PER_BLOCK = 6  # ResidualBlock, BatchNorm, ReLU, MaxPool, BatchNorm, ReLU


class ArticleLayer(nnx.Module):
    """``layerN``: the article's ``ResidualBlock`` (``conv1``, ``conv2``) -> ``bn`` -> ReLU, and, for all
    but the last block, ``MaxPool2d(3, pool_stride, 1)`` -> ``pool_bn`` -> ReLU."""

    def __init__(self, pool_stride: int | None, *, make: Layers):
        self.conv1 = make.conv(WIDTH, WIDTH, 3, bias=True)
        self.conv2 = make.conv(WIDTH, WIDTH, 3, bias=True)
        self.bn = make.norm(WIDTH)
        self.pool_stride = pool_stride
        self.max_pool = make.max_pool  # a function: static, no parameters
        self.pool_bn = make.norm(WIDTH) if pool_stride else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv2(nnx.relu(self.conv1(x))) + x
        x = nnx.relu(self.bn(x))
        if self.pool_bn is not None:
            x = nnx.relu(self.pool_bn(self.max_pool(x, 3, self.pool_stride, 1)))
        return x


class ArticleResNet(ClassifierHead):
    """The article's ``ResNet(num_blocks, num_classes)`` (see the module docstring).

    Args:
      num_blocks: residual blocks (the article's 9).
      num_classes: size of the classifier; 0 builds no head.
      in_channels: input image channels (the article's 3).
      dtype, param_dtype, bn_momentum, bn_epsilon, conv, norm, pool, rngs: as
        :class:`~flax_resnet.models.resnet.ResNet`.
    """

    # What pretrained's errors call the weights this network reads (see :meth:`torch_keys`).
    torch_source = "the article's PyTorch ResNet (its state dict, with the classifier as fc.* and layers.N.*)"

    def __init__(self, num_blocks: int = 9, num_classes: int = 10, *, in_channels: int = 3,
                 dtype: Any = None, param_dtype: Any = jnp.float32, bn_momentum: float = 0.9,
                 bn_epsilon: float = 1e-5, conv: type[nnx.Conv] = nnx.Conv, norm: type[BatchNorm] = BatchNorm,
                 pool: Callable[..., jax.Array] = max_pool, rngs: nnx.Rngs):
        if num_blocks < 1:
            raise UserError(f"num_blocks must be at least 1, got {num_blocks}")
        make = Layers(rngs, dtype, param_dtype, bn_momentum, bn_epsilon, conv=conv, norm=norm, pool=pool,
                      init="pytorch")
        self.dtype = dtype
        self.num_blocks = num_blocks
        self.conv1 = make.conv(in_channels, WIDTH, 7, 2, bias=True)
        self.max_pool = make.max_pool  # a function: static, no parameters
        for i in range(num_blocks):
            stride = None if i == num_blocks - 1 else (1 if i == 0 else 2)
            setattr(self, f"layer{i + 1}", ArticleLayer(stride, make=make))
        self.num_features = WIDTH
        self.fc = self._make_head(num_classes, make.rngs, param_dtype)

    def stages(self) -> list[ArticleLayer]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_blocks)]

    def forward_features(self, x: jax.Array, *, return_intermediates: bool = False):
        """Stem and blocks: the unpooled feature map ``[N, h, w, 64]`` (and, if asked, each block's output)."""
        x = x.astype(self.dtype) if self.dtype is not None else x
        x = self.max_pool(self.conv1(x), 3, 2, 1)
        intermediates = {"stem": x}
        for i, layer in enumerate(self.stages()):
            x = layer(x)
            intermediates[f"layer{i + 1}"] = x
        return (x, intermediates) if return_intermediates else x

    @staticmethod
    def torch_keys(keys: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
        """For :mod:`flax_resnet.pretrained`: our torchvision-style keys -> the article's, and the
        article's duplicate keys -> the key they repeat.

        ``layerJ.conv1/conv2.*`` -> ``layers.K.conv1/conv2.*`` with ``K = 6 (J - 1)`` (the
        ``ResidualBlock``), ``layerJ.bn.*`` -> ``layers.K+1.*``, ``layerJ.pool_bn.*`` ->
        ``layers.K+4.*``; ``conv1.*`` and ``fc.*`` keep their names, and ``fc.*`` is also
        ``layers.{6 num_blocks - 1}.*``, since ``_make_layers`` ends with ``self.fc``.
        """
        keys = list(keys)
        blocks = {int(m.group(1)) for k in keys if (m := re.match(r"layer(\d+)\.", k))}
        renames = {}
        for key in keys:
            m = re.fullmatch(r"layer(\d+)\.(conv1|conv2|bn|pool_bn)\.(.+)", key)
            if m is None:
                renames[key] = key
                continue
            k = _MODULES_PER_BLOCK * (int(m.group(1)) - 1)
            module, leaf = m.group(2), m.group(3)
            renames[key] = {"bn": f"layers.{k + 1}.{leaf}", "pool_bn": f"layers.{k + 4}.{leaf}"}.get(
                module, f"layers.{k}.{module}.{leaf}")
        classifier = _MODULES_PER_BLOCK * len(blocks) - 1
        aliases = {f"layers.{classifier}.{leaf}": f"fc.{leaf}" for leaf in ("weight", "bias") if f"fc.{leaf}" in keys}
        return renames, aliases
