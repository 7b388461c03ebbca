"""The contract every zoo model follows: logits, penultimate features, and a classifier on features.

Scoring needs f (METHODS.md §1.1) and distillation needs both z and f from one pass, so every model
splits its forward into `forward_features(x) -> f` (after global pooling) and `classify(f) -> z`.
"""
from __future__ import annotations

import torch
from torch import nn


class ZooModel(nn.Module):
    """Base class: `forward(x) = classify(forward_features(x))`; subclasses set `feature_dim` and `fc`."""

    arch: str = ""
    feature_dim: int = 0
    num_classes: int = 0
    in_chans: int = 3

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.forward_features(x))


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs, unit BN, zero biases: the usual ResNet initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def pool_flatten(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling to (N, C); works at any input size."""
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
