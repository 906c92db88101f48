"""PyTorch reference networks with torchvision's exact layout (the one shared definition).

``torchvision`` is not a dependency (and does not import beside the pinned torch), so its
ResNet is written here with plain ``torch.nn``: the same classes, constructor arguments and
attribute names (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1``..``layer4``,
``downsample.0/1``, ``avgpool``, ``fc``), hence the same ``state_dict()`` keys. Two
extensions cover the CIFAR networks of He et al. (2015): ``stem="cifar"`` (3x3/1 stem, no
max-pool) with free ``widths``/``stem_width``, and ``shortcut="A"`` (parameter-free strided
identity with zero-padded channels, half before and half after, as ours).

The twin the benchmark's ``--compare-torch`` times, and the reference of the parity tests.
PyTorch is imported lazily: importing this module does not need it; the classes
(``BasicBlock``, ``Bottleneck``, ``ResNet``) are built on first attribute access.

    >>> from flax_resnet.benchmark import torch_twin
    >>> m = torch_twin.create_torch_model("resnet20")          # a registered name
    >>> m = torch_twin.ResNet(torch_twin.Bottleneck, [3, 4, 6, 3])   # torchvision's resnet50
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flax_resnet import pretrained
from flax_resnet.errors import UserError
from flax_resnet.models import get_spec

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "create_torch_model", "load_flax_weights", "twin_arguments"]


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a test extra
        raise UserError("the PyTorch reference needs torch: pip install 'flax-resnet[test]'") from None
    return torch


def _build() -> dict[str, Any]:
    torch = _torch()
    nn = torch.nn
    F = torch.nn.functional

    def conv3x3(cin, cout, stride=1, groups=1):
        return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)

    def conv1x1(cin, cout, stride=1):
        return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)

    class PadIdentity(nn.Module):
        """Option A shortcut: strided identity, new channels zero-padded half before, half after."""

        def __init__(self, cout, stride):
            super().__init__()
            self.cout, self.stride = cout, stride

        def forward(self, x):
            if self.stride > 1:
                x = x[:, :, ::self.stride, ::self.stride]
            extra = self.cout - x.shape[1]
            return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2)) if extra else x

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
            super().__init__()
            self.conv1 = conv3x3(inplanes, planes, stride)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = conv3x3(planes, planes)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample
            self.stride = stride

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
            super().__init__()
            width = int(planes * (base_width / 64.0)) * groups
            self.conv1 = conv1x1(inplanes, width)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = conv3x3(width, width, stride, groups)  # v1.5: stride on the 3x3
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = conv1x1(width, planes * self.expansion)
            self.bn3 = nn.BatchNorm2d(planes * self.expansion)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample
            self.stride = stride

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + identity)

    class ResNet(nn.Module):
        """torchvision's ``ResNet`` (``block, layers, num_classes, groups, width_per_group``) plus
        ``stem`` ("imagenet" | "cifar"), ``widths``, ``stem_width``, ``in_channels`` and ``shortcut``
        ("B": 1x1 projection + BN, torchvision's; "A": zero-padded identity) for the CIFAR nets."""

        def __init__(self, block, layers, num_classes=1000, groups=1, width_per_group=64, *,
                     stem="imagenet", widths=(64, 128, 256, 512), stem_width=64, in_channels=3, shortcut="B"):
            super().__init__()
            if stem not in ("imagenet", "cifar"):
                raise ValueError(f"stem {stem!r}")
            self.inplanes, self.groups, self.base_width, self.shortcut = stem_width, groups, width_per_group, shortcut
            cifar = stem == "cifar"
            self.conv1 = (conv3x3(in_channels, stem_width) if cifar else
                          nn.Conv2d(in_channels, stem_width, kernel_size=7, stride=2, padding=3, bias=False))
            self.bn1 = nn.BatchNorm2d(stem_width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.num_stages = len(layers)
            for i, (n, planes) in enumerate(zip(layers, widths)):
                setattr(self, f"layer{i + 1}", self._make_layer(block, planes, n, stride=1 if i == 0 else 2))
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(self.inplanes, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def _make_layer(self, block, planes, blocks, stride=1):
            downsample, cout = None, planes * block.expansion
            if stride != 1 or self.inplanes != cout:
                downsample = (PadIdentity(cout, stride) if self.shortcut == "A" else
                              nn.Sequential(conv1x1(self.inplanes, cout, stride), nn.BatchNorm2d(cout)))
            layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
            self.inplanes = cout
            layers += [block(self.inplanes, planes, groups=self.groups, base_width=self.base_width)
                       for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            for i in range(self.num_stages):
                x = getattr(self, f"layer{i + 1}")(x)
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck, "ResNet": ResNet, "PadIdentity": PadIdentity}


_CLASSES: dict[str, Any] | None = None


def __getattr__(name: str):  # PEP 562: the nn.Module classes are built (and torch imported) on first use
    global _CLASSES
    if name in ("BasicBlock", "Bottleneck", "ResNet", "PadIdentity"):
        if _CLASSES is None:
            _CLASSES = _build()
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_torch_model(name: str, num_classes: int | None = None, in_channels: int = 3, **overrides: Any):
    """The ``torch.nn.Module`` equivalent of registered model ``name`` (float32, random init).

    Args:
      name: a registered basic/bottleneck ResNet with an imagenet or cifar stem (``resnet20``,
        ``resnet50``, ``wide_resnet50_2``, ``resnext50_32x4d``, ...).
      num_classes: classifier size; defaults to the model's.
      in_channels: input image channels.
      **overrides: registry keyword arguments, e.g. ``shortcut="B"``.

    Raises:
      UserError: the model has no PyTorch reference here (pre-activation, plain, article).
    """
    spec = get_spec(name)
    kw = {**spec.kwargs, **overrides}
    block = {"basic": "BasicBlock", "bottleneck": "Bottleneck"}.get(kw.get("block"))
    if block is None or kw.get("stem", "imagenet") not in ("imagenet", "cifar"):
        raise UserError(f"no PyTorch reference for {name!r}: only basic/bottleneck ResNets with an imagenet "
                        "or cifar stem (resnet8..1202, resnet18..152, wide_resnet*, resnext*)")
    return __getattr__("ResNet")(
        __getattr__(block), kw["layers"], spec.num_classes if num_classes is None else num_classes,
        groups=kw.get("groups", 1), width_per_group=kw.get("base_width", 64), stem=kw.get("stem", "imagenet"),
        widths=kw["widths"], stem_width=kw.get("stem_width", 64), in_channels=in_channels,
        shortcut=kw.get("shortcut", "B"))


def load_flax_weights(torch_model, params, batch_stats) -> None:
    """Copies our ``(params, batch_stats)`` into ``torch_model`` (strict: every key must match)."""
    torch = _torch()
    own = torch_model.state_dict()
    sd = {k: torch.from_numpy(np.array(v)) for k, v in pretrained.to_torch_state_dict(params, batch_stats).items()}
    sd = {k: v.to(own[k].dtype) if k in own else v for k, v in sd.items()}
    torch_model.load_state_dict(sd, strict=True)


def twin_arguments(name: str) -> dict[str, Any]:
    """The :class:`ResNet` arguments of registered model ``name`` but its class count and input
    channels, as JSON (``block`` is ``"basic"`` or ``"bottleneck"``): what
    :func:`create_torch_model` passes, for a process that builds the twin without this package."""
    kw = get_spec(name).kwargs
    if kw.get("block") not in ("basic", "bottleneck") or kw.get("stem", "imagenet") not in ("imagenet", "cifar"):
        raise UserError(f"no PyTorch reference for {name!r}")
    return {"block": kw["block"], "layers": list(kw["layers"]), "groups": kw.get("groups", 1),
            "width_per_group": kw.get("base_width", 64), "stem": kw.get("stem", "imagenet"),
            "widths": list(kw["widths"]), "stem_width": kw.get("stem_width", 64), "shortcut": kw.get("shortcut", "B")}
