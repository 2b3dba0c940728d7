"""Batched, vectorised data augmentation and normalisation on the training device."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import DatasetInfo

__all__ = ["BatchAugment"]


class BatchAugment:
    """Random crop with zero padding, random horizontal flip and normalisation of a uint8 batch.

    Calling the object on ``images`` (uint8 ``[N, C, H, W]``, any device) returns a float32
    tensor of the same shape, normalised per channel as ``(x / 255 - mean) / std``. With a
    generator (and ``train=True``) each sample is first shifted by its own random crop offset
    (the image is zero-padded by ``crop_padding`` pixels on every side and an ``H x W`` window
    is cut out) and flipped left-right with probability 1/2. Everything is done with two
    ``gather`` calls over the whole batch, without a Python loop over samples.

    Random numbers are drawn only from the given generator, in this fixed order, so a run's
    augmentation is reproducible and resumes exactly from a saved generator state:

    1. if ``crop_padding > 0``: ``torch.randint(0, 2 * crop_padding + 1, (N, 2))``; column 0 is
       the top and column 1 the left edge of the window in padded coordinates;
    2. if ``flip``: ``torch.randint(0, 2, (N,))``; 1 flips the sample (after cropping).

    Args:
        mean: per-channel mean in [0, 1] units.
        std: per-channel standard deviation in [0, 1] units.
        crop_padding: zero padding of the random crop (0: no random crop).
        flip: random horizontal flips.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 0,
        flip: bool = False,
    ) -> None:
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean and std need one entry per channel, got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)
        # Per-device copies of the constants, so a CUDA run does not copy them every step.
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_info(cls, info: DatasetInfo) -> BatchAugment:
        """The default training augmentation of a data set (see :func:`dataset_info`)."""
        return cls(info.mean, info.std, info.crop_padding, info.flip)

    @property
    def augments(self) -> bool:
        """Whether training calls change anything beyond normalisation."""
        return self.crop_padding > 0 or self.flip

    def __repr__(self) -> str:
        return (
            f"BatchAugment(mean={self.mean}, std={self.std}, "
            f"crop_padding={self.crop_padding}, flip={self.flip})"
        )

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._constants:
            shape = (1, len(self.mean), 1, 1)
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(shape)
            std = torch.tensor(self.std, dtype=torch.float32, device=device).view(shape)
            self._constants[device] = (mean, std)
        return self._constants[device]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(images / 255 - mean) / std`` in float32, without augmentation."""
        self._check(images)
        mean, std = self._mean_std(images.device)
        return images.to(torch.float32).div_(255.0).sub_(mean).div_(std)

    def _check(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(
                f"expected a uint8 batch [N, C, H, W], got {images.dtype} with shape "
                f"{tuple(images.shape)}"
            )
        if images.shape[1] != len(self.mean):
            raise ValueError(
                f"expected {len(self.mean)} channels (from mean/std), got {images.shape[1]}"
            )

    def __call__(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        train: bool = True,
    ) -> torch.Tensor:
        """Augment (when ``generator`` is given and ``train``) and normalise a uint8 batch.

        Args:
            images: uint8 tensor ``[N, C, H, W]``.
            generator: source of all random numbers; must live on ``images.device``.
                ``None`` means no augmentation (evaluation).
            train: ``False`` disables augmentation even when a generator is given.

        Returns:
            float32 tensor ``[N, C, H, W]`` on ``images.device``.
        """
        self._check(images)
        if generator is None or not train or not self.augments or images.shape[0] == 0:
            return self.normalize(images)
        if generator.device != images.device:
            raise ValueError(
                f"the generator is on {generator.device} but the images are on "
                f"{images.device}; create it with torch.Generator(device=images.device)"
            )
        return self.normalize(self._crop_and_flip(images, generator))

    def _crop_and_flip(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, c, h, w = images.shape
        device = images.device
        pad = self.crop_padding
        # Source row/column in the unpadded image of each output row/column, per sample.
        rows = torch.arange(h, device=device).expand(n, h)
        cols = torch.arange(w, device=device).expand(n, w)
        if pad > 0:
            offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=device)
            rows = rows + (offsets[:, :1] - pad)
            cols = cols + (offsets[:, 1:] - pad)
        if self.flip:
            flips = torch.randint(0, 2, (n,), generator=generator, device=device).bool()
            # Flipping the cropped window reverses its column order.
            cols = torch.where(flips[:, None], cols.flip(1), cols)
        # Positions that fall into the zero padding read a clamped (valid) pixel that is then
        # masked to zero: cheaper than materialising the padded batch.
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        rows = rows.clamp(0, h - 1)
        cols = cols.clamp(0, w - 1)
        out = torch.gather(images, 2, rows[:, None, :, None].expand(n, c, h, w))
        out = torch.gather(out, 3, cols[:, None, None, :].expand(n, c, h, w))
        return out.masked_fill(~inside[:, None], 0)
