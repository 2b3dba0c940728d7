"""Learning-rate schedules as functions of the epoch (``LambdaLR`` keeps no callables in its
state, so a checkpoint holds only numbers and the schedule is rebuilt from the config)."""

from __future__ import annotations

import math
from collections.abc import Callable

from dessilbi.config import TrainConfig

__all__ = ["lr_multiplier"]


def lr_multiplier(config: TrainConfig) -> Callable[[int], float]:
    """The factor on ``config.lr`` in each epoch (counted from 0).

    The cosine schedule runs over ``config.schedule_epochs`` (which the config resolves to
    ``epochs`` when unset, and which a resume cannot silently change).
    """
    if config.schedule == "step":
        return lambda epoch: config.lr_decay ** (epoch // config.lr_step)
    if config.schedule == "multistep":
        milestones = sorted(config.milestones)
        return lambda epoch: config.lr_decay ** sum(epoch >= m for m in milestones)
    if config.schedule == "cosine":
        total = config.schedule_epochs or config.epochs
        return lambda epoch: 0.5 * (1 + math.cos(math.pi * min(epoch, total) / total))
    return lambda epoch: 1.0
