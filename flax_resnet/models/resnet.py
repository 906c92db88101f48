"""The ResNet network: stem, residual stages, global average pool, linear head.

One class covers the ImageNet family (torchvision's resnet18..152, Wide ResNet, ResNeXt),
the CIFAR family of He et al. 2015 (3x3 stem, 16/32/64 widths, option-A shortcuts), their
plain counterparts, pre-activation ResNets (v2) and our widened variant of the article's
network (``article_resnet_widened``; the article's own is :mod:`~flax_resnet.models.article`).
Layout is NHWC.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flax_resnet.models.blocks import BLOCKS, Shortcut
from flax_resnet.models.head import ClassifierHead
from flax_resnet.models.layers import BatchNorm, Layers, max_pool

Stem = Literal["imagenet", "cifar", "article"]


class ResNet(ClassifierHead):
    """A residual network.

    Args:
      block: key of :data:`flax_resnet.models.blocks.BLOCKS` ("basic", "bottleneck",
        "preact_basic", "preact_bottleneck", "plain", "article").
      layers: number of blocks in each stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
      widths: base width of each stage (``planes``; bottlenecks output 4x this).
      num_classes: size of the classifier; 0 builds no head (a pure feature extractor).
      stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool), "cifar" (3x3/1 conv) or "article"
        (7x7/2 conv + max-pool, with max-pools between stages instead of strided blocks).
      stem_width: output channels of the stem conv.
      in_channels: input image channels (3 for RGB, 1 for the digits dataset).
      shortcut: "B" (1x1 projection when the shape changes) or "A" (zero-padded identity).
      groups, base_width: bottleneck cardinality and width per group (ResNeXt, Wide ResNet).
      zero_init_residual: zero the last BatchNorm scale of each residual branch (Goyal et al.).
      dtype: computation dtype (e.g. ``jnp.bfloat16``); params stay in ``param_dtype``.
      bn_momentum, bn_epsilon: Flax-convention momentum (0.9 == PyTorch 0.1) and epsilon.
      conv, norm, pool: the layer classes (default ``nnx.Conv`` and
        :class:`~flax_resnet.models.layers.BatchNorm`) and the max-pool function (default
        :func:`~flax_resnet.models.layers.max_pool`); a backend passes its own substitutes
        with the same parameters and values (:func:`flax_resnet.cpu.layers`).
      rngs: NNX random streams.
    """

    def __init__(self, *, block: str, layers: Sequence[int], widths: Sequence[int],
                 num_classes: int = 1000, stem: Stem = "imagenet", stem_width: int = 64,
                 in_channels: int = 3, shortcut: Shortcut = "B", groups: int = 1,
                 base_width: int = 64, zero_init_residual: bool = False,
                 dtype: Any = None, param_dtype: Any = jnp.float32,
                 bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
                 conv: type[nnx.Conv] = nnx.Conv, norm: type[BatchNorm] = BatchNorm,
                 pool: Callable[..., jax.Array] = max_pool, rngs: nnx.Rngs):
        if len(layers) != len(widths):
            raise ValueError(f"layers {tuple(layers)} and widths {tuple(widths)} differ in length")
        make = Layers(rngs, dtype, param_dtype, bn_momentum, bn_epsilon, conv=conv, norm=norm, pool=pool)
        block_cls = BLOCKS[block]
        self.max_pool = make.max_pool  # a function: static, no parameters
        self.stem = stem
        self.preact = block.startswith("preact")
        self.dtype = dtype

        # Stem. Pre-activation nets leave the first BN/ReLU to the first unit (He et al. 2016b).
        self.conv1 = make.conv(in_channels, stem_width, 3 if stem == "cifar" else 7,
                               1 if stem == "cifar" else 2, bias=stem == "article")
        self.bn1 = None if self.preact else make.norm(stem_width)

        cin = stem_width
        for i, (n, planes) in enumerate(zip(layers, widths)):
            # Stages after the first halve the resolution: by a strided first block, or
            # (article) by a max-pool before the stage.
            stride = 1 if i == 0 or stem == "article" else 2
            stage = []
            for j in range(n):
                stage.append(block_cls(cin, planes, stride if j == 0 else 1, make=make,
                                       shortcut=shortcut, zero_init_residual=zero_init_residual,
                                       groups=groups, base_width=base_width))
                cin = planes * block_cls.expansion
            setattr(self, f"layer{i + 1}", nnx.List(stage))
        self.num_stages = len(layers)
        self.num_features = cin
        # Pre-activation nets end with the BN/ReLU that no unit applied to its output.
        self.bn_final = make.norm(cin) if self.preact else None
        self.fc = self._make_head(num_classes, make.rngs, param_dtype)

    # ---------------------------------------------------------------- forward
    def stages(self) -> list[nnx.List]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def forward_features(self, x: jax.Array, *, return_intermediates: bool = False):
        """Stem and stages: the unpooled feature map ``[N, h, w, num_features]``.

        With ``return_intermediates=True`` also returns a dict of each stage's output.
        """
        x = x.astype(self.dtype) if self.dtype is not None else x
        x = self.conv1(x)
        if self.bn1 is not None:
            x = nnx.relu(self.bn1(x))
        if self.stem != "cifar":
            x = self.max_pool(x, 3, 2, 1)  # PyTorch's MaxPool2d(3, stride=2, padding=1)
        intermediates = {"stem": x}
        for i, stage in enumerate(self.stages()):
            if self.stem == "article" and i > 0:
                x = self.max_pool(x, 2, 2)
            for block in stage:
                x = block(x)
            intermediates[f"layer{i + 1}"] = x
        if self.bn_final is not None:
            x = nnx.relu(self.bn_final(x))
        return (x, intermediates) if return_intermediates else x
