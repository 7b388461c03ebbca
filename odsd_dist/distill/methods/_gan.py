"""MosaicKD's networks, as in the authors' code (zju-vipa/MosaicKD, engine/models/generator_patch_size.py):
a DCGAN-style generator whose base grid follows the input size, and a patch discriminator whose depth sets
the patch (receptive field) size."""
from __future__ import annotations

import torch
from torch import nn

PATCH_SIZES = (4, 10, 22)  # receptive fields of 1, 2, 3 stride-2 4x4 convolutions


def _bn(c: int) -> nn.BatchNorm2d:
    """Batch statistics only: G and D always run in training mode (as in the authors' code), so running
    statistics would never be used, and each rank would update them from its own batch."""
    return nn.BatchNorm2d(c, track_running_stats=False)


class Generator(nn.Module):
    """z -> Linear(4 ngf x s/4 x s/4) -> BN -> up x2 -> conv 4ngf->2ngf, BN, LReLU -> up x2 -> conv 2ngf->ngf,
    BN, LReLU -> conv ngf->C -> sigmoid: images in [0, 1] (the caller normalises them like the data)."""

    def __init__(self, nz: int = 100, ngf: int = 64, img_size: int = 32, nc: int = 3):
        super().__init__()
        if img_size % 4:
            raise ValueError(f"the generator needs an input size divisible by 4, got {img_size}")
        self.init_size = img_size // 4
        self.l1 = nn.Linear(nz, ngf * 4 * self.init_size ** 2)
        self.conv_blocks = nn.Sequential(
            _bn(ngf * 4),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 4, ngf * 2, 3, 1, 1, bias=False), _bn(ngf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf, 3, 1, 1, bias=False), _bn(ngf), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, nc, 3, 1, 1), nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.l1(z)
        return self.conv_blocks(out.view(out.shape[0], -1, self.init_size, self.init_size))


class PatchDiscriminator(nn.Module):
    """A map of real/fake logits, one per patch: conv 4x4 s2 C->ndf, LReLU, then (patch 10, the authors'
    default) conv 4x4 s2 ndf->2ndf, BN, LReLU, ... and a 1x1 conv to one logit."""

    def __init__(self, nc: int = 3, ndf: int = 128, patch_size: int = 10):
        super().__init__()
        if patch_size not in PATCH_SIZES:
            raise ValueError(f"patch_size must be one of {PATCH_SIZES}")
        depth = PATCH_SIZES.index(patch_size) + 1
        layers: list[nn.Module] = [nn.Conv2d(nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        c = ndf
        for _ in range(depth - 1):
            layers += [nn.Conv2d(c, c * 2, 4, 2, 1, bias=False), _bn(c * 2), nn.LeakyReLU(0.2, inplace=True)]
            c *= 2
        layers.append(nn.Conv2d(c, 1, 1, 1, 0, bias=False))
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
