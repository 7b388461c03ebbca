"""Name -> constructor registry for the model zoo (timm-style: a config names the arch, code never changes).

`build_model("timm:NAME", ...)` wraps a timm model behind the same contract when the optional `timm`
extra is installed; it is never downloaded (pretrained=False): weights come from our safetensors files.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import UserError
from .base import ZooModel
from .mobilenetv2 import MobileNetV2
from .resnet_cifar import BasicBlock, CifarResNet, ResNetCifarWide
from .resnet_imagenet import Bottleneck, ImageNetResNet
from .wrn import WideResNet

_REGISTRY: dict[str, Callable[[int, int], ZooModel]] = {
    "resnet8": lambda c, i: CifarResNet(8, c, i),
    "resnet20": lambda c, i: CifarResNet(20, c, i),
    "resnet32": lambda c, i: CifarResNet(32, c, i),
    "resnet56": lambda c, i: CifarResNet(56, c, i),
    "wrn16_1": lambda c, i: WideResNet(16, 1, c, i),
    "wrn16_2": lambda c, i: WideResNet(16, 2, c, i),
    "wrn40_1": lambda c, i: WideResNet(40, 1, c, i),
    "wrn40_2": lambda c, i: WideResNet(40, 2, c, i),
    "resnet18_cifar": lambda c, i: ResNetCifarWide((2, 2, 2, 2), c, i),
    "resnet34_cifar": lambda c, i: ResNetCifarWide((3, 4, 6, 3), c, i),
    "mobilenetv2": lambda c, i: MobileNetV2(c, i),
    "resnet18": lambda c, i: ImageNetResNet(BasicBlock, (2, 2, 2, 2), c, i),
    "resnet34": lambda c, i: ImageNetResNet(BasicBlock, (3, 4, 6, 3), c, i),
    "resnet50": lambda c, i: ImageNetResNet(Bottleneck, (3, 4, 6, 3), c, i),
}

ARCHS: list[str] = list(_REGISTRY)
TIMM_PREFIX = "timm:"


class TimmModel(ZooModel):
    """A timm model behind the zoo contract: pooled pre-logits features, then timm's own classifier."""

    def __init__(self, name: str, num_classes: int, in_chans: int):
        super().__init__()
        import timm

        self.model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
        self.num_classes, self.in_chans = num_classes, in_chans
        self.feature_dim = int(self.model.num_features)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        return self.model.get_classifier()(f)


def build_model(arch: str, num_classes: int, in_chans: int = 3) -> nn.Module:
    """A freshly initialised zoo model; unknown names are a UserError listing the known ones."""
    if num_classes < 1 or in_chans < 1:
        raise UserError(f"model {arch!r}: num_classes and in_chans must be >= 1 (got {num_classes}, {in_chans})")
    if arch.startswith(TIMM_PREFIX):
        try:
            import timm  # noqa: F401
        except ImportError:
            raise UserError(f"model {arch!r} needs timm, an optional extra: pip install 'odsd-dist[timm]'") from None
        name = arch[len(TIMM_PREFIX):]
        try:
            model: ZooModel = TimmModel(name, num_classes, in_chans)
        except RuntimeError as e:  # timm: "Unknown model (...)"
            raise UserError(f"model {arch!r}: {e}") from None
    elif arch in _REGISTRY:
        model = _REGISTRY[arch](num_classes, in_chans)
    else:
        raise UserError(f"unknown model arch {arch!r}; known: {', '.join(ARCHS)} or timm:NAME")
    model.arch = arch
    return model
