"""Core types of the datasets layer: the in-memory data set, its metadata and the error type."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["DatasetError", "DatasetInfo", "ImageDataset", "default_root"]


class DatasetError(RuntimeError):
    """A data set could not be found, read or downloaded.

    The message always names the file or directory involved and what was expected, so that a
    user can fix the problem without reading the source.
    """


def default_root() -> Path:
    """Directory used when ``root`` is ``None``: ``$DESSILBI_DATA`` if set, else ``./data``."""
    env = os.environ.get("DESSILBI_DATA")
    return Path(env).expanduser() if env else Path("data")


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a data set, available without reading any data.

    Attributes:
        name: registry name (``"mnist"``, ``"cifar10"``, ...).
        num_classes: number of labels.
        in_channels: image channels (1 for grey, 3 for RGB).
        image_size: ``(height, width)`` of the images a model receives.
        mean: per-channel mean in [0, 1] units, for normalisation.
        std: per-channel standard deviation in [0, 1] units.
        crop_padding: default training augmentation: zero padding of the random crop
            (0 means no random crop).
        flip: default training augmentation: random horizontal flips.
        classes: class names in label order (empty when they depend on the files, e.g. an
            image folder whose root was not given).
        lazy: ``True`` when the data set is read per sample from disk (:class:`FolderDataset`)
            instead of being held in memory.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 0
    flip: bool = False
    classes: tuple[str, ...] = ()
    lazy: bool = False


@dataclass
class ImageDataset:
    """A labelled image data set held in memory as one uint8 tensor.

    Attributes:
        images: uint8 tensor ``[N, C, H, W]`` with raw pixel values 0..255.
        labels: int64 tensor ``[N]`` with values in ``0 .. num_classes - 1``.
        classes: class names; ``classes[k]`` is the name of label ``k``.
        mean: per-channel mean in [0, 1] units (normalisation constant, see :class:`DatasetInfo`).
        std: per-channel standard deviation in [0, 1] units.
        name: registry name of the data set.
        split: ``"train"`` or ``"test"``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""
    split: str = ""

    def __post_init__(self) -> None:
        # Validate once here so that every consumer can rely on the documented layout.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 tensor [N, C, H, W], got {self.images.dtype} "
                f"with shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be an int64 tensor [{self.images.shape[0]}], got "
                f"{self.labels.dtype} with shape {tuple(self.labels.shape)}"
            )
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(
                f"mean/std need {self.in_channels} entries, got {len(self.mean)}/{len(self.std)}"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        """Number of image channels."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the images."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Return ``(image uint8 [C, H, W], label)``; lets the set feed a DataLoader too."""
        return self.images[index], int(self.labels[index])

    def to(self, device: torch.device | str) -> ImageDataset:
        """Return a copy whose tensors live on ``device`` (e.g. to train entirely on a GPU)."""
        return ImageDataset(
            images=self.images.to(device),
            labels=self.labels.to(device),
            classes=list(self.classes),
            mean=self.mean,
            std=self.std,
            name=self.name,
            split=self.split,
        )

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageDataset:
        """Return the samples at ``indices`` (a copy), keeping classes and metadata."""
        index = torch.as_tensor(indices, dtype=torch.int64, device=self.images.device)
        return ImageDataset(
            images=self.images[index],
            labels=self.labels[index.to(self.labels.device)],
            classes=list(self.classes),
            mean=self.mean,
            std=self.std,
            name=self.name,
            split=self.split,
        )
