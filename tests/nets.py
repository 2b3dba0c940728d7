"""Small networks shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    """conv 2→8 (3x3) → tanh → fc1 128→12 → tanh → fc2 12→3: a 4-D, two 2-D and 1-D tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3)
        self.fc1 = nn.Linear(8 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv(x)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(x)))
