"""ResNet backbones from torchvision, built without weights, returning pooled features.

The small-image variant follows the paper's CIFAR appendix (and He et al.'s CIFAR ResNets): a
3x3 stride-1 first convolution and no max-pool, so a 32 px input is not shrunk to 8 px before
the first residual stage.

    >>> backbone = build_backbone("resnet18", small_images=True)
    >>> backbone(torch.zeros(2, 3, 32, 32)).shape   # torch.Size([2, 512])
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision import models as tv_models

_FACTORIES: dict[str, Callable[..., tv_models.ResNet]] = {
    "resnet18": tv_models.resnet18,
    "resnet34": tv_models.resnet34,
    "resnet50": tv_models.resnet50,
}
BACKBONE_NAMES = tuple(_FACTORIES)


class Backbone(nn.Module):
    """A torchvision ResNet without its classifier: images in, pooled features out."""

    def __init__(self, resnet: tv_models.ResNet, name: str, small_images: bool):
        super().__init__()
        self.name = name
        self.small_images = small_images
        self.feature_dim: int = resnet.fc.in_features
        resnet.fc = nn.Identity()
        self.resnet = resnet

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.resnet(images)


def build_backbone(name: str, small_images: bool = False, stem_stride: int = 1,
                   zero_init_residual: bool = True) -> Backbone:
    """Build a randomly initialised ResNet backbone (weights are never downloaded).

    ``stem_stride`` (small-image stem only): 2 halves the feature maps of every stage, a quarter
    of the compute, for short training budgets on a CPU (bench/RESULTS.md, short-budget search).
    ``zero_init_residual``: each block's last batch norm starts at zero, so the block starts as
    an identity (the official SimSiam builder); False is torchvision's own init (lightly's).
    """
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}") from None
    resnet = factory(weights=None, zero_init_residual=zero_init_residual)
    if small_images:
        resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        resnet.maxpool = nn.Identity()
    return Backbone(resnet, name, small_images)
