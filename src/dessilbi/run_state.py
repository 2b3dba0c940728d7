"""What a training run consists of while it runs: the object callbacks see and change."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from dessilbi.config import TrainConfig
from dessilbi.distributed import DistInfo
from dessilbi.models import build_model

__all__ = ["Architecture", "ModelFactory", "OptimizerFactory", "TrainingRun"]


@dataclass
class Architecture:
    """How to build a run's model: a registered builder and its arguments, and for a compact
    network the filters kept of each layer.

    Saved in every checkpoint, so a run whose model changed shape in training (a layer widened
    by network growing, say) is rebuilt with its current shape on resume. Callbacks that change
    the model's shape update :attr:`kwargs` (e.g. ``widths``) through
    :meth:`TrainingRun.replace_model`. A compact network (:func:`dessilbi.compact`) is
    described by :attr:`kept`: per conv / linear weight name, the kept output channels of the
    registered model's layer; :meth:`build` removes the others with the same torch-pruning
    calls, so the description is plain values (``weights_only`` loadable, no pickled code).
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    kept: dict[str, list[int]] | None = None

    def build(self) -> nn.Module:
        """A freshly initialised model (weights from torch's global RNG)."""
        model = build_model(self.name, **self.kwargs)
        return model if self.kept is None else self._compacted(model)

    def _compacted(self, model: nn.Module) -> nn.Module:
        # The subnet package needs torch-pruning, an optional extra: imported only here.
        from dessilbi.subnet.compact import compact
        from dessilbi.subnet.masks import keep_from_indices

        kept = self.kept or {}
        params = dict(model.named_parameters())
        unknown = [name for name in kept if name not in params]
        if unknown:
            raise ValueError(f"compact architecture of {self.name}: no layer {unknown[0]}")
        keep = keep_from_indices(kept, {name: params[name].shape[0] for name in kept})
        size = int(self.kwargs.get("image_size", 32))  # build_model's defaults
        example = torch.zeros(1, int(self.kwargs.get("in_channels", 3)), size, size)
        return compact(model, example, keep=keep).model.train()

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for the checkpoint (``weights_only`` loadable)."""
        out: dict[str, Any] = {"name": self.name, "kwargs": dict(self.kwargs)}
        if self.kept is not None:
            out["kept"] = {n: list(k) for n, k in self.kept.items()}
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Architecture:
        """The inverse of :meth:`to_dict`."""
        kept = values.get("kept")
        return cls(str(values["name"]), dict(values.get("kwargs", {})),
                   None if kept is None else {str(n): [int(i) for i in k]
                                              for n, k in kept.items()})


#: ``factory(architecture)`` -> a fresh model (default: :meth:`Architecture.build`).
ModelFactory = Callable[[Architecture], nn.Module]
#: ``factory(config, model)`` -> the optimizer (default: :func:`dessilbi.train.build_optimizer`).
OptimizerFactory = Callable[[TrainConfig, nn.Module], Optimizer]


@dataclass
class TrainingRun:
    """The live state of a run, handed to every callback.

    Attributes:
        config: the resolved configuration.
        run_dir: the run directory (files are written by rank 0 only).
        device: the training device.
        dist: this process's rank and the world size.
        model: the user's model (never the DDP wrapper: names without ``module.``).
        net: what the loop calls: ``model`` or its DDP wrapper.
        optimizer: the optimizer stepping ``model``'s parameters.
        scheduler: the learning-rate schedule (stepped once per epoch).
        lr_multiplier: the schedule as a function of the epoch.
        architecture: how ``model`` is built (saved in the checkpoint).
        optimizer_factory: builds an optimizer for a model (used by :meth:`replace_model`).
        wrap: wraps a model for the loop (DDP under torchrun, identity otherwise).
        epoch: epochs finished so far (during epoch ``e``, counted from 1: ``e - 1``).
        step: optimizer steps taken so far.
    """

    config: TrainConfig
    run_dir: Path
    device: torch.device
    dist: DistInfo
    model: nn.Module
    net: nn.Module
    optimizer: Optimizer
    scheduler: LambdaLR
    lr_multiplier: Callable[[int], float]
    architecture: Architecture
    optimizer_factory: OptimizerFactory
    wrap: Callable[[nn.Module], nn.Module]
    epoch: int = 0
    step: int = 0

    def replace_model(
        self,
        model: nn.Module,
        architecture: Architecture,
        optimizer: Optimizer | None = None,
    ) -> None:
        """Continue training ``model`` (e.g. a widened copy) in place of the current one.

        ``architecture`` must build a model of ``model``'s shape (it is what resume builds).
        Without ``optimizer`` a fresh one comes from the run's optimizer factory; a callback
        that carries optimizer state over (padding V, Γ and momentum for new filters) passes
        its own. The learning-rate schedule continues where it was.
        """
        model = model.to(self.device)
        if self.config.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        optimizer = optimizer or self.optimizer_factory(self.config, model)
        # A fresh schedule over the new param groups, advanced to the current epoch.
        scheduler = LambdaLR(optimizer, self.lr_multiplier)
        scheduler.last_epoch = self.scheduler.last_epoch
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * self.lr_multiplier(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        self.model, self.net, self.optimizer, self.scheduler = (
            model, self.wrap(model), optimizer, scheduler
        )
        self.architecture = architecture
