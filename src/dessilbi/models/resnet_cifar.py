"""CIFAR ResNets of He et al. (2016).

* :class:`CifarResNet`: section 4.2's ResNet-(6n+2) of basic blocks (``resnet20/32/56`` and
  the basic-block ``resnet50_cifar``).
* :class:`CifarBottleneckResNet`: the ResNet-(9n+2) of bottleneck blocks used for the deeper
  CIFAR nets (ResNet-110/164 in He et al.'s follow-up paper) and, at depth 56, by the DessiLBI
  winning-ticket code (``resnet56_bottleneck``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import check_positive, check_widths, init_weights
from .blocks import BasicBlock, Bottleneck

#: Stage widths of the original CIFAR ResNets.
CIFAR_RESNET_WIDTHS: tuple[int, ...] = (16, 32, 64)


def _check_input(num_classes: int, in_channels: int, image_size: int) -> None:
    """Validate the arguments every CIFAR ResNet shares."""
    check_positive("num_classes", num_classes)
    check_positive("in_channels", in_channels)
    check_positive("image_size", image_size)
    if image_size < 4:
        # Two stride-2 stages need a map of at least 4 pixels to stay meaningful.
        raise ValueError(f"CIFAR ResNet needs image_size >= 4, got {image_size}")


def _make_stages(
    block: type[BasicBlock] | type[Bottleneck],
    in_planes: int,
    widths: Sequence[int],
    blocks_per_stage: int,
) -> tuple[list[nn.Sequential], int]:
    """Build the 3 stages (stride 2 at the start of stages 2 and 3); return them and the
    channel count of the last stage's output (``widths[-1] * block.expansion``)."""
    stages: list[nn.Sequential] = []
    for stage_idx, planes in enumerate(widths):
        stride = 1 if stage_idx == 0 else 2
        blocks: list[nn.Module] = []
        for block_idx in range(blocks_per_stage):
            blocks.append(block(in_planes, planes, stride if block_idx == 0 else 1))
            in_planes = planes * block.expansion
        stages.append(nn.Sequential(*blocks))
    return stages, in_planes


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

    #: The residual block and the weighted layers in each (depth = 3 * layers * n + 2).
    block: type[BasicBlock] | type[Bottleneck] = BasicBlock
    layers_per_block: int = 2

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        per_stage = 3 * self.layers_per_block
        kind = "bottleneck CIFAR ResNet" if self.block is Bottleneck else "CIFAR ResNet"
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise ValueError(f"{kind} depth must be an integer, got {depth!r}")
        if depth < per_stage + 2 or (depth - 2) % per_stage != 0:
            examples = ", ".join(str(per_stage * n + 2) for n in (1, 2, 3))
            raise ValueError(
                f"{kind} depth must be {per_stage}n+2 with n >= 1 ({examples}, ...), got {depth}"
            )
        _check_input(num_classes, in_channels, image_size)
        self.depth = depth
        suffix = "_bottleneck" if self.block is Bottleneck else ""
        self.widths = check_widths(widths, CIFAR_RESNET_WIDTHS, f"resnet{depth}{suffix}")
        #: Number of residual blocks per stage, ``n = (depth - 2) / (3 * layers_per_block)``.
        self.blocks_per_stage = (depth - 2) // per_stage

        self.conv1 = nn.Conv2d(in_channels, self.widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.widths[0])
        self.relu = nn.ReLU()
        stages, in_planes = _make_stages(
            self.block, self.widths[0], self.widths, self.blocks_per_stage
        )
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


class CifarBottleneckResNet(CifarResNet):
    """ResNet-(9n+2) of bottleneck blocks for 32x32 inputs.

    Layout: ``conv1`` 3x3 (``widths[0]`` channels) -> ``bn1`` -> ``relu`` -> ``layer1``,
    ``layer2``, ``layer3`` (``n`` :class:`Bottleneck` each: 1x1 reduce to the stage's planes,
    3x3, 1x1 expand x4; planes 16/32/64 by default, so the stages output 64/128/256 channels;
    stride 2 at the start of stages 2 and 3, on the 3x3 conv ``conv2``) -> ``avgpool`` (global)
    -> ``flatten`` -> ``fc`` (``4 * widths[2]`` inputs).

    Each block has 3 weighted layers, so ``depth = 3 * 3n + 2`` (stem and classifier).
    Shortcuts are identities except where the shape changes: a 1x1 conv + BatchNorm projection
    in the first block of *every* stage (stage 1 too, since it expands 16 -> 64 channels).
    ``widths`` are the 3 stage *planes* (the bottleneck widths), as for :class:`CifarResNet`.
    """

    block = Bottleneck
    layers_per_block = 3


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
    """Build CIFAR ResNet-56 of *basic* blocks (9 per stage; natural input 3x32x32).

    This is the ResNet-56 of the DessiLBI pruning code; for the bottleneck ResNet-56 of its
    winning-ticket code see :func:`resnet56_bottleneck`.
    """
    return CifarResNet(56, num_classes, in_channels, image_size, widths)


def resnet50_cifar(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    widths: Sequence[int] | None = None,
) -> CifarResNet:
    """Build CIFAR ResNet-50 of *basic* blocks (8 per stage, 6*8+2 = 50; input 3x32x32).

    The CIFAR net of the DessiLBI lasso-ticket experiments. Not the ImageNet bottleneck
    ResNet-50 (:func:`dessilbi.models.resnet_imagenet.resnet50`, 3/4/6/3 bottlenecks).
    """
    return CifarResNet(50, num_classes, in_channels, image_size, widths)


def resnet56_bottleneck(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    widths: Sequence[int] | None = None,
) -> CifarBottleneckResNet:
    """Build CIFAR ResNet-56 of *bottleneck* blocks (6 per stage, 9*6+2 = 56; input 3x32x32).

    The ResNet-56 of the DessiLBI winning-ticket code: stage outputs 64/128/256 channels.
    ``widths`` sets the 3 stage planes (default 16/32/64, outputs 4x that).
    """
    return CifarBottleneckResNet(56, num_classes, in_channels, image_size, widths)
