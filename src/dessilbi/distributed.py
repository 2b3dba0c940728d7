"""The process layout of a run: single process, or one rank of a torchrun / DDP job."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dessilbi.config import ConfigError

__all__ = ["DistInfo", "gather_states", "init_distributed"]


@dataclass(frozen=True)
class DistInfo:
    """This process's rank among ``world_size`` (read from torchrun's environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether more than one process trains (DistributedDataParallel)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run's files; the others only compute."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistInfo:
        """The layout torchrun's environment gives (one process without it)."""
        return cls(rank=int(os.environ.get("RANK", "0")),
                   world_size=int(os.environ.get("WORLD_SIZE", "1")),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """The process layout and the device to train on; joins the process group under torchrun."""
    info = DistInfo.from_env()
    use_cuda = device_pref.startswith("cuda") or (
        device_pref == "auto" and torch.cuda.is_available()
    )
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"invalid device: {device_pref!r} (CUDA is not available here)")
    if use_cuda:
        device = torch.device(device_pref if ":" in device_pref else f"cuda:{info.local_rank}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if info.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return info, device


def gather_states(state: Any, info: DistInfo) -> list[Any]:
    """Every rank's value of ``state`` (e.g. RNG states: ranks draw different augmentations)."""
    if not info.enabled:
        return [state]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, state)
    return gathered
