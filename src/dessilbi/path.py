"""Read-outs of the sparse structure along the DessiLBI path, live from a model and optimizer.

Everything here takes the model (for parameter names) and the optimizer (for Γ and the structure
of each parameter) and reads; nothing changes the run, except :func:`sparse_weights`, which swaps
the sparse weights in for the duration of a ``with`` block and restores the dense ones bitwise.
Names never carry a DistributedDataParallel / DataParallel ``module.`` prefix: they are the
``param_names`` of :func:`dessilbi.structure.structured_param_groups`. The recording of the
path over a run (``path.pt``) is :mod:`dessilbi.path_record`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer

from dessilbi.optim.proximal import group_norms
from dessilbi.structure import unwrap_model

__all__ = [
    "CoupledTensor",
    "coupled_parameters",
    "coupled_tensors",
    "group_support",
    "selected_groups",
    "sparse_weights",
    "support_masks",
    "weight_group_norms",
]


@dataclass(frozen=True)
class CoupledTensor:
    """A weight tensor coupled to a structure parameter, with its current Γ."""

    name: str
    weight: torch.Tensor
    gamma: torch.Tensor
    structure: str

    @property
    def mask(self) -> torch.Tensor:
        """``1[Γ ≠ 0]`` with the weight's shape (bool)."""
        return self.gamma != 0

    @property
    def group_support(self) -> torch.Tensor:
        """Per group: True when the group is selected (Γ_g ≠ 0). 1-D bool."""
        return group_norms(self.gamma, self.structure) > 0

    @property
    def weight_group_norms(self) -> torch.Tensor:
        """Per group: ‖W_g‖₂ (``|W|`` per entry under the element structure). 1-D."""
        return group_norms(self.weight, self.structure)


def coupled_parameters(
    model: nn.Module, optimizer: Optimizer
) -> list[tuple[str, torch.Tensor, str]]:
    """``(name, parameter, structure)`` of every coupled parameter, in ``named_parameters`` order
    of the unwrapped model; parameters the optimizer does not hold are not coupled.

    Raises ``ValueError`` when the optimizer holds parameters but none of the model's (built
    for another model, or for a copy of this one): the read-outs would silently be empty.
    """
    structure_of = {
        id(p): group.get("structure") for group in optimizer.param_groups for p in group["params"]
    }
    found: list[tuple[str, torch.Tensor, str]] = []
    held = False
    for name, param in unwrap_model(model).named_parameters():
        held = held or id(param) in structure_of
        structure = structure_of.get(id(param))
        if structure is not None:
            found.append((name, param, structure))
    if structure_of and not held:
        raise ValueError(
            "the optimizer holds none of the model's parameters (was it built for another "
            "model, or for a copy of this one?)"
        )
    return found


def coupled_tensors(model: nn.Module, optimizer: Optimizer) -> list[CoupledTensor]:
    """The coupled weight tensors of ``model`` under ``optimizer``, in ``named_parameters`` order.

    A DistributedDataParallel / DataParallel wrapper is looked through: names are those of the
    wrapped model (the ``param_names`` of ``structured_param_groups``). Before a parameter's first
    step its Γ is zero by definition, and is reported as such.
    """
    found = []
    for name, param, structure in coupled_parameters(model, optimizer):
        gamma = optimizer.state.get(param, {}).get("gamma")
        if gamma is None:
            gamma = torch.zeros_like(param)
        found.append(CoupledTensor(name, param, gamma, structure))
    return found


def support_masks(model: nn.Module, optimizer: Optimizer) -> dict[str, torch.Tensor]:
    """Per coupled tensor: the bool mask ``Γ ≠ 0`` (same shape as the weight)."""
    return {t.name: t.mask for t in coupled_tensors(model, optimizer)}


def group_support(model: nn.Module, optimizer: Optimizer) -> dict[str, torch.Tensor]:
    """Per coupled tensor: a 1-D bool tensor, True for each selected group."""
    return {t.name: t.group_support for t in coupled_tensors(model, optimizer)}


def selected_groups(model: nn.Module, optimizer: Optimizer) -> dict[str, tuple[int, int]]:
    """Per coupled tensor: ``(selected groups, total groups)``."""
    result = {}
    for t in coupled_tensors(model, optimizer):
        support = t.group_support
        result[t.name] = (int(support.sum()), support.numel())
    return result


def weight_group_norms(model: nn.Module, optimizer: Optimizer) -> dict[str, torch.Tensor]:
    """Per coupled tensor: the group norms ‖W_g‖₂ of the (dense) weights."""
    return {t.name: t.weight_group_norms for t in coupled_tensors(model, optimizer)}


@contextmanager
def sparse_weights(model: nn.Module, optimizer: Optimizer) -> Iterator[nn.Module]:
    """Swap every coupled W for ``W̃ = W ⊙ 1[Γ ≠ 0]`` inside the block; restore W exactly after.

    Example::

        with sparse_weights(model, optimizer):
            sparse_accuracy = evaluate(model)
    """
    tensors = coupled_tensors(model, optimizer)
    saved = [t.weight.detach().clone() for t in tensors]
    try:
        with torch.no_grad():
            for t in tensors:
                t.weight.mul_(t.mask)
        yield model
    finally:
        with torch.no_grad():
            for t, dense in zip(tensors, saved, strict=True):
                t.weight.copy_(dense)
