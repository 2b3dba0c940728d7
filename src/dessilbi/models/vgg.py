"""VGG-16 for CIFAR-sized inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import check_positive, check_widths, init_weights

#: Conv widths of VGG-16's 13 conv layers ("configuration D" of Simonyan & Zisserman).
VGG16_WIDTHS: tuple[int, ...] = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
#: How many conv layers sit in each of the five blocks; a 2x2 max-pool ends every block.
_VGG16_BLOCKS: tuple[int, ...] = (2, 2, 3, 3, 3)


class VGG(nn.Module):
    """VGG-16 in the common CIFAR form.

    ``features`` holds 13 conv3x3 (padding 1) layers, each followed by ``BatchNorm2d`` (when
    ``batch_norm``) and ReLU, with a 2x2 max-pool after each of the five blocks
    (cfg ``[64,64,M,128,128,M,256,256,256,M,512,512,512,M,512,512,512,M]``). The head is
    ``avgpool`` -> ``flatten`` -> ``classifier``, where ``classifier`` is a *single*
    ``nn.Linear(widths[-1], num_classes)`` -- the widespread CIFAR variant (about 14.7M
    parameters) rather than ImageNet's three 4096-wide FC layers (about 134M), which massively
    overfit 32x32 data. ``avgpool`` is an ``AdaptiveAvgPool2d(1)``: a no-op for 32x32 inputs
    (the map is already 1x1) that lets larger inputs reuse the same head.

    Convs carry a bias only without BatchNorm; with BN the bias would be cancelled by the mean
    subtraction and merely add dead parameters.

    ``widths`` overrides the 13 conv widths (e.g. to grow a network from a narrow seed).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        batch_norm: bool = False,
        widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        check_positive("num_classes", num_classes)
        check_positive("in_channels", in_channels)
        check_positive("image_size", image_size)
        if image_size < 32:
            # Five 2x2 max-pools need at least 32 pixels to leave a non-empty map.
            raise ValueError(f"VGG-16 needs image_size >= 32, got {image_size}")
        self.widths = check_widths(widths, VGG16_WIDTHS, "vgg16")

        layers: list[nn.Module] = []
        channels = in_channels
        idx = 0
        for n_convs in _VGG16_BLOCKS:
            for _ in range(n_convs):
                width = self.widths[idx]
                idx += 1
                layers.append(
                    nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=not batch_norm)
                )
                if batch_norm:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(nn.ReLU())
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape ``(batch, num_classes)``."""
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


def vgg16(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    widths: Sequence[int] | None = None,
) -> VGG:
    """Build VGG-16 without BatchNorm (natural input: 3x32x32)."""
    return VGG(num_classes, in_channels, image_size, batch_norm=False, widths=widths)


def vgg16_bn(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    widths: Sequence[int] | None = None,
) -> VGG:
    """Build VGG-16 with BatchNorm after every conv (natural input: 3x32x32)."""
    return VGG(num_classes, in_channels, image_size, batch_norm=True, widths=widths)
