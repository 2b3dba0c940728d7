"""Fully connected baseline network."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import check_positive, init_weights


class MLP(nn.Module):
    """Flatten -> (Linear -> ReLU) per hidden width -> Linear to ``num_classes``.

    The linear layers are registered as ``fc1``, ``fc2``, ... (in order) inside
    ``self.layers`` so that they can be addressed by name, e.g. ``model.layers.fc1``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        hidden: Sequence[int] = (256, 128),
    ) -> None:
        super().__init__()
        check_positive("num_classes", num_classes)
        check_positive("in_channels", in_channels)
        check_positive("image_size", image_size)
        hidden = tuple(hidden)
        for i, h in enumerate(hidden):
            check_positive(f"hidden[{i}]", h)

        self.flatten = nn.Flatten()
        self.layers = nn.Sequential()
        in_features = in_channels * image_size * image_size
        for i, width in enumerate(hidden, start=1):
            self.layers.add_module(f"fc{i}", nn.Linear(in_features, width))
            self.layers.add_module(f"relu{i}", nn.ReLU())
            in_features = width
        self.layers.add_module(f"fc{len(hidden) + 1}", nn.Linear(in_features, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape ``(batch, num_classes)``."""
        return self.layers(self.flatten(x))


def mlp(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    hidden: Sequence[int] = (256, 128),
) -> MLP:
    """Build :class:`MLP`; ``hidden`` lists the hidden-layer widths (may be empty)."""
    return MLP(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, hidden=hidden
    )
