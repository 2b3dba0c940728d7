"""Read-outs of the sparse structure along the DessiLBI path.

Everything here takes the model (for parameter names) and the optimizer (for Γ and the structure
of each parameter) and reads; nothing changes the run, except :func:`sparse_weights`, which swaps
the sparse weights in for the duration of a ``with`` block and restores the dense ones bitwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from dessilbi.optim.proximal import group_norms

__all__ = [
    "CoupledTensor",
    "PathRecorder",
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


def coupled_tensors(model: nn.Module, optimizer: Optimizer) -> list[CoupledTensor]:
    """The coupled weight tensors of ``model`` under ``optimizer``, in ``named_parameters`` order.

    Before a parameter's first step its Γ is zero by definition, and is reported as such.
    """
    structure_of = {
        id(p): group.get("structure") for group in optimizer.param_groups for p in group["params"]
    }
    found = []
    for name, param in model.named_parameters():
        structure = structure_of.get(id(param))
        if structure is None:
            continue
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


class PathRecorder:
    """Records the sparse-structure path of a run: when groups enter Γ's support, and per epoch
    the group norms of W and the support of Γ.

    Call :meth:`update_step` after every optimizer step (cheap: one reduction over each Γ) to
    keep the first *step* at which each group became nonzero, and :meth:`record_epoch` at the end
    of every epoch. Groups may leave the support again: the per-epoch supports show the current
    state, the entry step/epoch the first entry. :meth:`state_dict` holds only tensors, lists and
    strings, so it is saved with the checkpoint and loads with ``weights_only=True``.
    """

    def __init__(self, model: nn.Module, optimizer: Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        tensors = coupled_tensors(model, optimizer)
        self.names = [t.name for t in tensors]
        self.structures = [t.structure for t in tensors]
        self._params = [t.weight for t in tensors]
        self.entry_step = {t.name: torch.full((t.group_support.numel(),), -1) for t in tensors}
        self.entry_epoch = {t.name: torch.full((t.group_support.numel(),), -1) for t in tensors}
        self.epochs: list[int] = []
        self.norms: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        self.support: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}

    def _supports(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param, structure in zip(self.names, self._params, self.structures, strict=True):
            gamma = self.optimizer.state.get(param, {}).get("gamma")
            if gamma is not None:
                yield name, group_norms(gamma, structure) > 0

    def update_step(self, step: int) -> None:
        """Note ``step`` as the entry step of every group that is nonzero for the first time."""
        for name, support in self._supports():
            # Kept on Γ's device: this runs every step and must not sync with a GPU.
            entry = self.entry_step[name]
            if entry.device != support.device:
                entry = self.entry_step[name] = entry.to(support.device)
            # masked_fill_, not boolean indexing: indexing with a mask syncs with a GPU.
            entry.masked_fill_(support & entry.lt(0), step)

    def record_epoch(self, epoch: int) -> None:
        """Append the group norms of W and the support of Γ at the end of ``epoch``."""
        supports = {name: support.cpu() for name, support in self._supports()}
        for name, param, structure in zip(self.names, self._params, self.structures, strict=True):
            support = supports.get(name)
            if support is None:
                support = torch.zeros_like(self.entry_step[name], dtype=torch.bool)
            entered = self.entry_step[name].cpu() >= 0
            epoch_entry = self.entry_epoch[name]
            epoch_entry[(entered | support) & (epoch_entry < 0)] = epoch
            self.norms[name].append(group_norms(param, structure).float().cpu())
            self.support[name].append(support)
        self.epochs.append(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Everything recorded so far; per layer the epochs are stacked (``[E, groups]``)."""
        def stack(rows: list[torch.Tensor], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            if rows:
                return torch.stack(rows)
            return torch.zeros((0, like.numel()), dtype=dtype)

        return {
            "names": list(self.names),
            "structures": list(self.structures),
            "epochs": torch.tensor(self.epochs, dtype=torch.long),
            "entry_step": {n: t.cpu().clone() for n, t in self.entry_step.items()},
            "entry_epoch": {n: t.clone() for n, t in self.entry_epoch.items()},
            "group_norms": {
                n: stack(self.norms[n], self.entry_step[n], torch.float32) for n in self.names
            },
            "support": {
                n: stack(self.support[n], self.entry_step[n], torch.bool) for n in self.names
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a recording made by :meth:`state_dict` for the same coupled layers."""
        if list(state["names"]) != self.names:
            raise ValueError(
                "the recorded path is for other layers: "
                f"{list(state['names'])[:3]}... vs {self.names[:3]}..."
            )
        self.epochs = [int(e) for e in state["epochs"]]
        self.entry_step = {n: t.clone() for n, t in state["entry_step"].items()}
        self.entry_epoch = {n: t.clone() for n, t in state["entry_epoch"].items()}
        self.norms = {n: list(state["group_norms"][n].unbind(0)) for n in self.names}
        self.support = {n: list(state["support"][n].unbind(0)) for n in self.names}
