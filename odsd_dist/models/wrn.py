"""Wide ResNets (Zagoruyko & Komodakis): WRN-depth-k with pre-activation blocks, 16/16k/32k/64k channels."""
from __future__ import annotations

import torch
from torch import nn

from .base import ZooModel, init_weights, pool_flatten


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, drop: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = drop
        self.equal = cin == cout and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.relu(self.bn1(x))
        y = self.conv1(o)
        y = torch.relu(self.bn2(y))
        if self.drop > 0:
            y = nn.functional.dropout(y, self.drop, self.training)
        y = self.conv2(y)
        return y + (x if self.equal else self.shortcut(o))


class WideResNet(ZooModel):
    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_chans: int = 3, drop: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        self.num_classes, self.in_chans = num_classes, in_chans
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        cin, stages = widths[0], []
        for i, w in enumerate(widths[1:]):
            stages.append(nn.Sequential(*[WideBlock(cin if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1, drop)
                                          for j in range(n)]))
            cin = w
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(cin)
        self.feature_dim = cin
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return pool_flatten(torch.relu(self.bn(x)))
