"""ImageNet-style ResNets (He et al., 2016): ResNet-18 (basic) and ResNet-50 (bottleneck)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import check_positive, check_widths, init_weights
from .blocks import BasicBlock, Bottleneck

#: Stage widths (``planes``; bottleneck stages output 4x as many channels).
IMAGENET_RESNET_WIDTHS: tuple[int, ...] = (64, 128, 256, 512)

#: Inputs up to this side length get the small-input stem by default.
SMALL_INPUT_MAX_SIZE: int = 64


class ImageNetResNet(nn.Module):
    """Four-stage ResNet with a configurable block type.

    Layout: stem (``conv1``, ``bn1``, ``relu``, ``maxpool``) -> ``layer1``..``layer4``
    (``blocks_per_stage[i]`` blocks of ``widths[i]`` planes, stride 2 at the start of stages
    2-4) -> ``avgpool`` (adaptive, global) -> ``flatten`` -> ``fc``. Shortcuts are identity or
    1x1 conv + BN projections where the shape changes (option B, as in the paper).

    The standard stem is a 7x7 stride-2 conv followed by a 3x3 stride-2 max-pool, shrinking
    224x224 images to 56x56 before ``layer1``. For small images (CIFAR, Tiny-ImageNet) that
    would throw away most of the resolution, so ``small_input=True`` replaces it with a 3x3
    stride-1 conv and no max-pool (``maxpool`` becomes ``nn.Identity``).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks_per_stage: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        image_size: int = 224,
        small_input: bool | None = None,
        widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        check_positive("num_classes", num_classes)
        check_positive("in_channels", in_channels)
        check_positive("image_size", image_size)
        if len(blocks_per_stage) != 4:
            raise ValueError(f"expected 4 stages, got {len(blocks_per_stage)}")
        self.widths = check_widths(widths, IMAGENET_RESNET_WIDTHS, "ImageNet ResNet")
        if small_input is None:
            small_input = image_size <= SMALL_INPUT_MAX_SIZE
        self.small_input = small_input

        stem_width = self.widths[0]
        self.conv1: nn.Conv2d
        self.maxpool: nn.Module
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, stem_width, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU()
        if small_input:
            self.maxpool = nn.Identity()
        else:
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_planes = stem_width
        stages: list[nn.Sequential] = []
        for stage_idx, (planes, n_blocks) in enumerate(
            zip(self.widths, blocks_per_stage, strict=True)
        ):
            check_positive(f"blocks_per_stage[{stage_idx}]", n_blocks)
            stride = 1 if stage_idx == 0 else 2
            blocks: list[nn.Module] = []
            for block_idx in range(n_blocks):
                blocks.append(block(in_planes, planes, stride if block_idx == 0 else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape ``(batch, num_classes)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


def resnet18(
    num_classes: int = 1000,
    in_channels: int = 3,
    image_size: int = 224,
    small_input: bool | None = None,
    widths: Sequence[int] | None = None,
) -> ImageNetResNet:
    """Build ResNet-18 (basic blocks, [2, 2, 2, 2]; natural input 3x224x224).

    ``small_input`` defaults to ``image_size <= 64`` (3x3 stem, no max-pool); ``widths``
    overrides the four stage widths (default 64, 128, 256, 512).
    """
    return ImageNetResNet(
        BasicBlock, (2, 2, 2, 2), num_classes, in_channels, image_size, small_input, widths
    )


def resnet50(
    num_classes: int = 1000,
    in_channels: int = 3,
    image_size: int = 224,
    small_input: bool | None = None,
    widths: Sequence[int] | None = None,
) -> ImageNetResNet:
    """Build ResNet-50 (bottleneck blocks, [3, 4, 6, 3]; natural input 3x224x224).

    ``small_input`` defaults to ``image_size <= 64`` (3x3 stem, no max-pool); ``widths``
    overrides the four stage bottleneck widths (default 64, 128, 256, 512; the blocks output
    4x these).
    """
    return ImageNetResNet(
        Bottleneck, (3, 4, 6, 3), num_classes, in_channels, image_size, small_input, widths
    )
