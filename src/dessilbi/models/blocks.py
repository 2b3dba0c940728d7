"""Residual blocks shared by the CIFAR and ImageNet ResNets.

The blocks keep every layer as a plain, named attribute (``conv1``, ``bn1``, ``conv2``, ...,
``shortcut``) and use a separate ``nn.ReLU`` module per activation, so that dependency-graph
pruners such as torch-pruning can trace them and so that hooks attach to a unique module.
"""

from __future__ import annotations

import torch
from torch import nn


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Shortcut for a residual block: identity when shapes agree, else 1x1 conv + BN.

    The identity is an *empty* ``nn.Sequential`` (which returns its input unchanged), so every
    block has a ``shortcut`` attribute of the same type whether or not it projects. The
    projection is He et al.'s "option B" (a learned 1x1 convolution with stride, followed by
    BatchNorm), used only where the spatial size or channel count changes.
    """
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (ResNet-18/34 and CIFAR ResNets).

    ``relu1`` follows ``bn1``; ``relu2`` follows the addition of the shortcut.
    """

    #: Ratio of output channels to ``planes``.
    expansion: int = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        # Convs feeding a BatchNorm carry no bias: BN's mean subtraction would cancel it.
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes * self.expansion, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4) bottleneck block (ResNet-50/101/152).

    The stride sits on the 3x3 conv ``conv2`` (the "ResNet v1.5" placement that most current
    implementations use; it has the same parameter count as putting it on ``conv1`` but is
    slightly more accurate). ``relu3`` follows the addition of the shortcut.
    """

    #: Ratio of output channels to ``planes``.
    expansion: int = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _projection(in_planes, out_planes, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))
