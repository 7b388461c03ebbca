"""MobileNetV2, CIFAR variant: stride-1 stem and a stride-1 second stage, so 32 px ends at 4x4 (28 px at 4x4)."""
from __future__ import annotations

import torch
from torch import nn

from .base import ZooModel, init_weights, pool_flatten

# (expansion, out channels, blocks, first stride); ImageNet has stride 2 in the stem and row 2.
CIFAR_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(ZooModel):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0, last_channels: int = 1280):
        super().__init__()
        self.num_classes, self.in_chans = num_classes, in_chans
        cin = int(32 * width_mult)
        layers = [_conv_bn(in_chans, cin, 3, 1)]
        for t, c, n, s in CIFAR_CFG:
            cout = int(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        self.feature_dim = max(last_channels, int(last_channels * width_mult))
        layers.append(_conv_bn(cin, self.feature_dim, 1))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(self.feature_dim, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return pool_flatten(self.features(x))
