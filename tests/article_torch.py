"""The article's PyTorch model, transcribed (tests only): its class names and structure, fixed
only where its code cannot run.

Fixes: ``_make_layers`` ends with ``self.fc``, which the article assigns only after calling it
(an AttributeError), so the classifier is defined first; ``forward`` applied ``self.fc`` again
after ``self.layers`` (a shape error), so it is applied once, inside ``self.layers``. The state
dict therefore holds the classifier twice: ``fc.*`` and ``layers.{6 num_blocks - 1}.*``.
"""

import torch.nn as nn


class ResidualBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        residual = x
        out = self.conv1(x)
        out = self.relu(out)
        out = self.conv2(out)
        out += residual
        return out


class ResNet(nn.Module):
    def __init__(self, num_blocks=9, num_classes=10, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(64, num_classes)  # fix: defined before _make_layers uses it
        self.layers = self._make_layers(num_blocks)

    def _make_layers(self, num_blocks):
        layers = []
        for i in range(num_blocks):
            layers.append(ResidualBlock(64, 64))
            layers.append(nn.BatchNorm2d(64))
            layers.append(nn.ReLU(inplace=True))
            if i < num_blocks - 1:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=1 if i == 0 else 2, padding=1))
                layers.append(nn.BatchNorm2d(64))
                layers.append(nn.ReLU(inplace=True))
        layers.append(nn.AdaptiveAvgPool2d((1, 1)))
        layers.append(nn.Flatten())
        layers.append(self.fc)
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.maxpool(x)
        x = self.layers(x)  # fix: ends with self.fc; not applied a second time
        return x
