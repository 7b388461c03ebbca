"""CIFAR ResNets: the 6n+2 family (resnet8/20/32/56; 16/32/64 channels) and the 3x3-stem ResNet-18/34.

The 6n+2 nets use option-B (1x1 conv + BN) projection shortcuts as in the CRD/torchdistill KD
benchmarks; ResNet-18/34 "CIFAR" keep the ImageNet widths with a 3x3 stride-1 stem and no max-pool.
Global average pooling makes every one of them work at 28 px as well as 32 px.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import ZooModel, init_weights, pool_flatten


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(ZooModel):
    """ResNet-(6n+2) for 32x32 inputs: three stages of n BasicBlocks with 16, 32, 64 channels."""

    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, widths=(16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.num_classes, self.in_chans = num_classes, in_chans
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin, stages = widths[0], []
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.feature_dim = cin
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return pool_flatten(x)


class ResNetCifarWide(ZooModel):
    """ResNet-18/34 with a 3x3 stride-1 stem and no max-pool (the usual CIFAR adaptation)."""

    def __init__(self, layers: tuple[int, ...], num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.num_classes, self.in_chans = num_classes, in_chans
        self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin, stages = 64, []
        for i, (w, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = cin
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return pool_flatten(x)
