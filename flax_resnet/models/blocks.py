"""Residual blocks (Flax NNX, NHWC).

Every block takes explicit input and output widths, so a network is a plain stack of
them, and builds its layers through a :class:`~flax_resnet.models.layers.Layers` factory.
Attribute names follow torchvision (``conv1``, ``bn1``, ..., ``downsample``) so that
converting a PyTorch state dict is a mechanical renaming (see :mod:`flax_resnet.pretrained`).

Blocks:
  * :class:`BasicBlock`        two 3x3 convs (ResNet-18/34, CIFAR ResNets).
  * :class:`Bottleneck`        1x1 -> 3x3 -> 1x1, stride on the 3x3 ("v1.5", as torchvision);
                               ``groups``/``base_width`` give ResNeXt and Wide ResNet.
  * :class:`PreActBasicBlock`, :class:`PreActBottleneck`   ResNet v2 (He et al. 2016b):
                               BN -> ReLU before each conv, nothing after the addition.
  * :class:`PlainBlock`        a BasicBlock without the shortcut (the degradation study).
  * :class:`ArticleBlock`      the article's conv3x3 -> ReLU -> conv3x3 (+ shortcut), whose
                               BatchNorm/ReLU come after the addition (``article_resnet_widened``).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from flax_resnet.models.layers import Layers, apply_sequence, pad_identity

Shortcut = Literal["A", "B"]


class _Residual(nnx.Module):
    """Holds the shortcut choice shared by all residual blocks."""

    downsample: nnx.List | None

    def _init_shortcut(self, make: Layers, cin: int, cout: int, stride: int,
                       shortcut: Shortcut, *, norm: bool = True) -> None:
        self.out_channels = cout
        self.stride = stride
        self.shortcut_type = shortcut
        needs = stride != 1 or cin != cout
        self.downsample = make.projection(cin, cout, stride, norm=norm) if needs and shortcut == "B" else None

    def shortcut(self, x: jax.Array) -> jax.Array:
        if self.downsample is not None:
            return apply_sequence(self.downsample, x)
        if self.stride != 1 or x.shape[-1] != self.out_channels:
            return pad_identity(x, self.out_channels, self.stride)
        return x


class BasicBlock(_Residual):
    """3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, *, make: Layers,
                 shortcut: Shortcut = "B", zero_init_residual: bool = False, **_: Any):
        self.conv1 = make.conv(cin, planes, 3, stride)
        self.bn1 = make.norm(planes)
        self.conv2 = make.conv(planes, planes, 3)
        self.bn2 = make.norm(planes, zero_scale=zero_init_residual)
        self._init_shortcut(make, cin, planes, stride, shortcut)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return nnx.relu(out + self.shortcut(x))


class PlainBlock(nnx.Module):
    """A BasicBlock without its shortcut: the "plain" network of the degradation study."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, *, make: Layers, **_: Any):
        self.conv1 = make.conv(cin, planes, 3, stride)
        self.bn1 = make.norm(planes)
        self.conv2 = make.conv(planes, planes, 3)
        self.bn2 = make.norm(planes)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.relu(self.bn2(self.conv2(out)))


class Bottleneck(_Residual):
    """1x1 -> 3x3 (stride, groups) -> 1x1 with 4x expansion; torchvision's ResNet v1.5.

    ``groups`` and ``base_width`` set the inner width ``planes * base_width / 64 * groups``:
    ResNeXt-50 32x4d is groups=32, base_width=4; Wide ResNet-50-2 is base_width=128.
    """

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, *, make: Layers,
                 shortcut: Shortcut = "B", zero_init_residual: bool = False,
                 groups: int = 1, base_width: int = 64, **_: Any):
        width = int(planes * (base_width / 64.0)) * groups
        cout = planes * self.expansion
        self.conv1 = make.conv(cin, width, 1)
        self.bn1 = make.norm(width)
        self.conv2 = make.conv(width, width, 3, stride, groups=groups)
        self.bn2 = make.norm(width)
        self.conv3 = make.conv(width, cout, 1)
        self.bn3 = make.norm(cout, zero_scale=zero_init_residual)
        self._init_shortcut(make, cin, cout, stride, shortcut)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = nnx.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return nnx.relu(out + self.shortcut(x))


class PreActBasicBlock(_Residual):
    """ResNet v2 basic unit: BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3, plus the shortcut.

    A projection shortcut takes the *pre-activated* input and has no BatchNorm of its own.
    ``zero_init_residual`` zeroes the last conv (there is no BatchNorm at the branch end).
    """

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, *, make: Layers,
                 shortcut: Shortcut = "B", zero_init_residual: bool = False, **_: Any):
        self.bn1 = make.norm(cin)
        self.conv1 = make.conv(cin, planes, 3, stride)
        self.bn2 = make.norm(planes)
        self.conv2 = make.conv(planes, planes, 3)
        if zero_init_residual:
            self.conv2.kernel[...] = jnp.zeros_like(self.conv2.kernel[...])
        self._init_shortcut(make, cin, planes, stride, shortcut, norm=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        pre = nnx.relu(self.bn1(x))
        skip = self.shortcut(pre) if self.downsample is not None else self.shortcut(x)
        out = self.conv1(pre)
        out = self.conv2(nnx.relu(self.bn2(out)))
        return out + skip


class PreActBottleneck(_Residual):
    """ResNet v2 bottleneck unit (BN -> ReLU before each of the 1x1, 3x3, 1x1 convs)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, *, make: Layers,
                 shortcut: Shortcut = "B", zero_init_residual: bool = False,
                 groups: int = 1, base_width: int = 64, **_: Any):
        width = int(planes * (base_width / 64.0)) * groups
        cout = planes * self.expansion
        self.bn1 = make.norm(cin)
        self.conv1 = make.conv(cin, width, 1)
        self.bn2 = make.norm(width)
        self.conv2 = make.conv(width, width, 3, stride, groups=groups)
        self.bn3 = make.norm(width)
        self.conv3 = make.conv(width, cout, 1)
        if zero_init_residual:
            self.conv3.kernel[...] = jnp.zeros_like(self.conv3.kernel[...])
        self._init_shortcut(make, cin, cout, stride, shortcut, norm=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        pre = nnx.relu(self.bn1(x))
        skip = self.shortcut(pre) if self.downsample is not None else self.shortcut(x)
        out = self.conv1(pre)
        out = self.conv2(nnx.relu(self.bn2(out)))
        out = self.conv3(nnx.relu(self.bn3(out)))
        return out + skip


class ArticleBlock(_Residual):
    """The article's residual module with a width change, for ``article_resnet_widened`` (our
    fix, not the article's): conv3x3 -> ReLU -> conv3x3, plus the shortcut, then BatchNorm ->
    ReLU after the addition (the article puts BN/ReLU between blocks).

    The convs keep PyTorch's default bias; when the width changes the shortcut is a 1x1
    projection. The article's own network (width 64 throughout) is
    :class:`~flax_resnet.models.article.ArticleResNet`.
    """

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, *, make: Layers,
                 shortcut: Shortcut = "B", **_: Any):
        self.conv1 = make.conv(cin, planes, 3, stride, bias=True)
        self.conv2 = make.conv(planes, planes, 3, bias=True)
        self.bn = make.norm(planes)
        self._init_shortcut(make, cin, planes, stride, shortcut, norm=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.conv2(nnx.relu(self.conv1(x)))
        return nnx.relu(self.bn(out + self.shortcut(x)))


BLOCKS = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
    "preact_basic": PreActBasicBlock,
    "preact_bottleneck": PreActBottleneck,
    "plain": PlainBlock,
    "article": ArticleBlock,
}
