"""Weight masks: which entries of which parameters a sparse network keeps.

A mask maps parameter names (as ``model.named_parameters()`` gives them, without DDP's
``module.`` prefix) to bool tensors of the parameter's shape, True where the entry is kept. A
*mask provider* computes the masks of a model at a point of training; the training loop evaluates
the sparse network ``W ⊙ mask`` through one, e.g. :func:`gamma_support` for DessiLBI's
``W̃ = W ⊙ 1[Γ ≠ 0]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.optim import Optimizer

from dessilbi.path import support_masks
from dessilbi.structure import unwrap_model

__all__ = [
    "Masks",
    "MaskProvider",
    "apply_masks",
    "check_masks",
    "gamma_support",
    "masked_weights",
]

Masks = Mapping[str, torch.Tensor]
#: ``provider(model, optimizer)`` -> the masks of the current sparse network.
MaskProvider = Callable[[nn.Module, Optimizer], Masks]


def gamma_support(model: nn.Module, optimizer: Optimizer) -> dict[str, torch.Tensor]:
    """DessiLBI's sparse network: ``1[Γ ≠ 0]`` for every coupled weight."""
    return support_masks(unwrap_model(model), optimizer)


def check_masks(model: nn.Module, masks: Masks) -> dict[str, nn.Parameter]:
    """The masked parameters by name; ``ValueError`` naming an unknown name or a wrong shape."""
    params = dict(unwrap_model(model).named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"mask for {name!r}: the model has no parameter of that name")
        if mask.dtype != torch.bool or mask.shape != params[name].shape:
            raise ValueError(
                f"mask for {name!r}: expected a bool tensor of shape "
                f"{tuple(params[name].shape)}, got {mask.dtype} {tuple(mask.shape)}"
            )
    return {name: params[name] for name in masks}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks, optimizer: Optimizer | None = None) -> None:
    """Zero every masked-out entry in place; with ``optimizer``, its per-parameter state too.

    Zeroing the optimizer's tensors of the parameter's shape (momentum buffers, Adam's moments,
    DessiLBI's V and Γ) means a pruned entry carries nothing that could revive it later.
    """
    for name, param in check_masks(model, masks).items():
        keep = masks[name].to(param.device)
        param.mul_(keep)
        if optimizer is None:
            continue
        for key, value in optimizer.state.get(param, {}).items():
            # Per-entry state only: not step counters (a 0-d parameter's shape is theirs too).
            per_entry = isinstance(value, torch.Tensor) and value.is_floating_point()
            if key != "step" and per_entry and value.shape == param.shape:
                value.mul_(keep)


@contextmanager
def masked_weights(model: nn.Module, masks: Masks) -> Iterator[nn.Module]:
    """Swap every masked parameter for ``W ⊙ mask`` inside the block; restore W exactly after."""
    params = check_masks(model, masks)
    saved = {name: p.detach().clone() for name, p in params.items()}
    try:
        with torch.no_grad():
            for name, p in params.items():
                p.mul_(masks[name].to(p.device))
        yield model
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
