"""LeNet-5 as used in the DessiLBI paper's MNIST experiments."""

from __future__ import annotations

import torch
from torch import nn

from ._common import check_positive


class LeNet5(nn.Module):
    """LeNet-5 (the variant from the DessiLBI MNIST script).

    ``conv1`` 6@5x5 (padding 2) -> ReLU -> maxpool 2 -> ``conv2`` 16@5x5 -> ReLU -> maxpool 2 ->
    ``conv3`` 120@5x5 -> ReLU -> flatten -> ``fc1`` 84 -> ReLU -> ``fc2`` ``num_classes``.

    With the paper's 1x28x28 input ``conv3`` produces a 120x1x1 map, so ``fc1`` has 120 inputs
    and the model has 61,706 parameters for 10 classes. Larger inputs are accepted (``fc1``
    then sees ``120 * s * s`` features for the resulting ``s x s`` map) so that the same
    module can be used on e.g. 32x32 images; inputs smaller than 28 are rejected because
    ``conv3`` would have nothing left to convolve.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        check_positive("num_classes", num_classes)
        check_positive("in_channels", in_channels)
        check_positive("image_size", image_size)
        # Spatial size after each stage: conv1 keeps the size (padding 2), each pool halves it
        # (floor), conv2/conv3 are "valid" 5x5 convolutions that remove 4 pixels.
        side = (image_size // 2 - 4) // 2 - 4
        if side < 1:
            raise ValueError(f"LeNet-5 needs image_size >= 28, got {image_size}")

        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(16, 120, kernel_size=5)
        self.relu3 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(120 * side * side, 84)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(84, num_classes)
        # PyTorch's default initialisation, as in the paper's MNIST script. It matters for
        # DessiLBI: the entry time of a filter depends on its weight norm (V_g accumulates
        # (lr/nu)·||W_g|| per step), and Kaiming-normal init makes every conv3 filter's norm large
        # enough to enter the support within the first epoch at the paper's nu = 20.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape ``(batch, num_classes)``."""
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        x = self.relu4(self.fc1(self.flatten(x)))
        return self.fc2(x)


def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> LeNet5:
    """Build :class:`LeNet5` (natural input: 1x28x28)."""
    return LeNet5(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
