"""CIFAR ResNets of He et al. (2016), section 4.2: depth 6n+2 with basic blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import check_positive, check_widths, init_weights
from .blocks import BasicBlock

#: Stage widths of the original CIFAR ResNets.
CIFAR_RESNET_WIDTHS: tuple[int, ...] = (16, 32, 64)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs.

    Layout: ``conv1`` 3x3 (``widths[0]`` channels) -> ``bn1`` -> ``relu`` -> ``layer1``,
    ``layer2``, ``layer3`` (``n`` :class:`BasicBlock` each, widths 16/32/64 by default, stride 2
    at the start of stages 2 and 3) -> ``avgpool`` (global) -> ``flatten`` -> ``fc``.

    **Shortcuts use option B**: a 1x1 conv (stride 2) + BatchNorm projection where the shape
    changes, identity elsewhere. The paper's CIFAR numbers use option A (zero-padded identity,
    no parameters); option B adds 2 projections (2,752 parameters for the default widths, e.g.
    ResNet-20: 272,474 instead of 269,722) but consists only of standard modules, which keeps
    the network prunable channel-by-channel.
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        check_positive("num_classes", num_classes)
        check_positive("in_channels", in_channels)
        check_positive("image_size", image_size)
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        if image_size < 4:
            # Two stride-2 stages need a map of at least 4 pixels to stay meaningful.
            raise ValueError(f"CIFAR ResNet needs image_size >= 4, got {image_size}")
        self.depth = depth
        self.widths = check_widths(widths, CIFAR_RESNET_WIDTHS, f"resnet{depth}")
        blocks_per_stage = (depth - 2) // 6

        self.conv1 = nn.Conv2d(in_channels, self.widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.widths[0])
        self.relu = nn.ReLU()
        in_planes = self.widths[0]
        stages: list[nn.Sequential] = []
        for stage_idx, planes in enumerate(self.widths):
            stride = 1 if stage_idx == 0 else 2
            blocks: list[nn.Module] = []
            for block_idx in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if block_idx == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape ``(batch, num_classes)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def resnet20(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    widths: Sequence[int] | None = None,
) -> CifarResNet:
    """Build CIFAR ResNet-20 (3 blocks per stage; natural input 3x32x32)."""
    return CifarResNet(20, num_classes, in_channels, image_size, widths)


def resnet32(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    widths: Sequence[int] | None = None,
) -> CifarResNet:
    """Build CIFAR ResNet-32 (5 blocks per stage; natural input 3x32x32)."""
    return CifarResNet(32, num_classes, in_channels, image_size, widths)


def resnet56(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    widths: Sequence[int] | None = None,
) -> CifarResNet:
    """Build CIFAR ResNet-56 (9 blocks per stage; natural input 3x32x32)."""
    return CifarResNet(56, num_classes, in_channels, image_size, widths)
