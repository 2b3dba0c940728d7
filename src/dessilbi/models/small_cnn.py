"""A small CNN for tiny images (8x8 scikit-learn digits), usable on 28x28/32x32 as well."""

from __future__ import annotations

import torch
from torch import nn

from ._common import check_positive, init_weights


class SmallCNN(nn.Module):
    """``conv1`` 16@3x3 -> ReLU -> ``conv2`` 32@3x3 -> ReLU -> maxpool 2 -> ``conv3`` 64@3x3 ->
    ReLU -> adaptive average pool to 2x2 -> flatten -> ``fc`` ``num_classes``.

    All convolutions use padding 1. The adaptive pool makes the head independent of the input
    size: for 8x8 digits it averages the 4x4 map down to 2x2 (keeping coarse spatial layout,
    which helps on digits more than a global average would), and 28x28 or 32x32 inputs work
    unchanged. Inputs must be at least 2x2.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> None:
        super().__init__()
        check_positive("num_classes", num_classes)
        check_positive("in_channels", in_channels)
        check_positive("image_size", image_size)
        if image_size < 2:
            raise ValueError(f"SmallCNN needs image_size >= 2, got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.relu3 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64 * 2 * 2, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape ``(batch, num_classes)``."""
        x = self.relu1(self.conv1(x))
        x = self.pool(self.relu2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        return self.fc(self.flatten(self.avgpool(x)))


def small_cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> SmallCNN:
    """Build :class:`SmallCNN` (natural input: 1x8x8)."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
