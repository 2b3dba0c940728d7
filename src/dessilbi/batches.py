"""The data side of the training loop: the run's data sets, its batches, and evaluation."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dessilbi.config import ConfigError, TrainConfig
from dessilbi.data import (
    BatchAugment,
    DatasetInfo,
    FolderDataset,
    ImageDataset,
    dataset_info,
    load_dataset,
)
from dessilbi.distributed import DistInfo

__all__ = [
    "AnyDataset",
    "input_normalization",
    "TrainBatches",
    "evaluate",
    "example_input",
    "load_run_data",
    "stream_seed",
    "training_augment",
]

AnyDataset = ImageDataset | FolderDataset


def stream_seed(seed: int, epoch: int, purpose: str) -> int:
    """A 63-bit seed of its own for every (seed, epoch, purpose).

    Sums such as ``seed + epoch`` repeat streams across runs ((s, e+1) is (s+1, e)); a hash
    does not.
    """
    digest = hashlib.sha256(f"{purpose}:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class TrainBatches:
    """Training batches for one epoch, identical for a given (seed, epoch) on every run.

    In-memory sets are indexed on the training device; the data order of epoch ``e`` comes from
    a generator seeded from ``(seed, e)``, so resuming at an epoch boundary replays it exactly.
    Under DDP each global batch of ``batch_size`` is cut into equal shards, one per rank, so a
    step sees the same global batch as a single process would.
    """

    def __init__(
        self, data: AnyDataset, config: TrainConfig, dist_info: DistInfo, device: torch.device
    ) -> None:
        if config.batch_size % dist_info.world_size:
            raise ConfigError(
                f"invalid batch_size: {config.batch_size} is not divisible by the "
                f"{dist_info.world_size} processes"
            )
        self.data = data
        self.config = config
        self.dist = dist_info
        self.device = device
        self.local_batch = config.batch_size // dist_info.world_size
        if isinstance(data, ImageDataset):
            self.images = data.images.to(device)
            self.labels = data.labels.to(device)
        self.num_batches = len(data) // config.batch_size
        if self.num_batches == 0:
            raise ConfigError(
                f"invalid batch_size: {config.batch_size} exceeds the {len(data)} training images"
            )

    def loader_seed(self, epoch: int) -> int:
        """Seed of the worker processes' random augmentation in ``epoch`` (on-disk data)."""
        return stream_seed(self.config.seed, epoch, "loader")

    def order_seed(self, epoch: int) -> int:
        """Seed of the data order of ``epoch``: distinct for every (seed, epoch < 1,000,003).

        Kept as it was when the recorded results of this project were made, so they reproduce.
        """
        return self.config.seed * 1_000_003 + epoch

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches ``(images, labels)`` of ``epoch`` for this rank, on the device."""
        order_gen = torch.Generator().manual_seed(self.order_seed(epoch))
        order = torch.randperm(len(self.data), generator=order_gen)
        if isinstance(self.data, ImageDataset):
            lo = self.dist.rank * self.local_batch
            for b in range(self.num_batches):
                batch = order[b * self.config.batch_size : (b + 1) * self.config.batch_size]
                shard = batch[lo : lo + self.local_batch].to(self.device)
                yield self.images[shard], self.labels[shard]
            return
        # On-disk data: the same order, sharded the same way, read by worker processes.
        usable = order[: self.num_batches * self.config.batch_size].view(self.num_batches, -1)
        mine = usable[:, self.dist.rank * self.local_batch :][:, : self.local_batch].flatten()
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.data, mine.tolist()),
            batch_size=self.local_batch,
            shuffle=False,
            num_workers=self.config.workers,
            generator=torch.Generator().manual_seed(self.loader_seed(epoch)),
            pin_memory=self.device.type == "cuda",
        )
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device)


def input_normalization(config: TrainConfig, info: DatasetInfo) -> BatchAugment:
    """The test-time transform: per-channel normalisation, or [0, 1] scaling only."""
    mean, std = _mean_std(config, info)
    return BatchAugment(mean, std)


def _mean_std(
    config: TrainConfig, info: DatasetInfo
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if config.normalize:
        return tuple(info.mean), tuple(info.std)
    return (0.0,) * len(info.mean), (1.0,) * len(info.std)


def training_augment(config: TrainConfig, info: DatasetInfo, lazy: bool) -> BatchAugment:
    """The batched training transform: the data set's default augmentation, as configured.

    On-disk folders are augmented by their loader (random-resized crop and flip), so for them
    this only normalises, and the in-memory keys ``crop_padding`` / ``flip`` are refused.
    """
    if lazy:
        if config.crop_padding is not None or config.flip is not None:
            raise ConfigError(
                f"crop_padding and flip apply to in-memory data sets; {config.dataset} is read "
                "from disk with its own augmentation (random-resized crop and flip): leave "
                "them unset (augment: false turns it off)"
            )
        return input_normalization(config, info)
    if not config.augment:
        return input_normalization(config, info)
    padding = info.crop_padding if config.crop_padding is None else config.crop_padding
    flip = info.flip if config.flip is None else config.flip
    return BatchAugment(*_mean_std(config, info), padding, flip)


def example_input(config: TrainConfig) -> torch.Tensor:
    """One zero image of the config's data set (what a dependency graph is traced with)."""
    info = dataset_info(config.dataset, config.data_dir)
    return torch.zeros(1, info.in_channels, *info.image_size)


def load_run_data(config: TrainConfig, dist_info: DistInfo) -> tuple[AnyDataset, AnyDataset]:
    """The training and test sets of ``config`` (only rank 0 downloads; the others wait)."""
    info = dataset_info(config.dataset, config.data_dir)
    if info.lazy:
        if config.data_dir is None:
            raise ConfigError(f"invalid data_dir: None (the {config.dataset} data set needs one)")
        if config.train_subset is not None:
            raise ConfigError(f"invalid train_subset: {config.train_subset} (only for in-memory "
                              f"data sets; {config.dataset} is read from disk)")
        test_split = "val" if Path(config.data_dir, "val").is_dir() else "test"
        # augment: false gives the training images the test transform (resize, centre crop).
        return (
            FolderDataset(config.data_dir, "train", train=config.augment,
                          crop_size=info.image_size[0]),
            FolderDataset(config.data_dir, test_split, train=False, crop_size=info.image_size[0]),
        )
    if config.download and dist_info.enabled and not dist_info.is_main:
        dist.barrier()
    train_set = load_dataset(config.dataset, config.data_dir, "train", download=config.download)
    test_set = load_dataset(config.dataset, config.data_dir, "test", download=config.download)
    if config.download and dist_info.enabled and dist_info.is_main:
        dist.barrier()
    return _subset(train_set, config), test_set


def _subset(train_set: ImageDataset, config: TrainConfig) -> ImageDataset:
    """``train_subset`` images of ``train_set`` drawn with the run's seed (the same on every
    rank, and for every optimizer trained with that seed)."""
    if config.train_subset is None:
        return train_set
    if config.train_subset > len(train_set):
        raise ConfigError(f"invalid train_subset: {config.train_subset} (the {config.dataset} "
                          f"training set has {len(train_set)} images)")
    gen = torch.Generator().manual_seed(config.seed)
    pick = torch.randperm(len(train_set), generator=gen)[: config.train_subset].sort().values
    return dataclasses.replace(train_set, images=train_set.images[pick],
                               labels=train_set.labels[pick])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: AnyDataset,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    autocast: Callable[[], AbstractContextManager[object]],
    config: TrainConfig,
    dist_info: DistInfo,
    device: torch.device,
) -> float:
    """Top-1 accuracy in percent; under DDP each rank scores a slice and the counts are summed.

    ``prepare`` turns a raw batch into the model's input (normalisation, memory format);
    ``autocast`` gives the run's precision context.
    """
    model.eval()
    n = len(data)
    lo = n * dist_info.rank // dist_info.world_size
    hi = n * (dist_info.rank + 1) // dist_info.world_size
    correct = torch.zeros((), dtype=torch.long, device=device)
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    if isinstance(data, ImageDataset):
        size = config.eval_batch_size
        batches = ((data.images[s : min(s + size, hi)], data.labels[s : min(s + size, hi)])
                   for s in range(lo, hi, size))
    else:
        batches = iter(torch.utils.data.DataLoader(
            torch.utils.data.Subset(data, range(lo, hi)),
            batch_size=config.eval_batch_size,
            num_workers=config.workers,
        ))
    for images, labels in batches:
        with autocast():
            logits = model(prepare(images.to(device)))
        correct += (logits.argmax(1) == labels.to(device)).sum()
    if dist_info.enabled:
        dist.all_reduce(correct)
    return 100.0 * int(correct) / n
