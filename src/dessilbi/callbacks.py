"""Hooks into the one training loop, with state that resumes bitwise.

A :class:`Callback` sees the :class:`~dessilbi.run_state.TrainingRun` (model, optimizer,
counters) after every optimizer step and at the end of every epoch. Whatever it returns from
:meth:`Callback.state_dict` is saved in the checkpoint under its :attr:`Callback.name` and handed
back to :meth:`Callback.load_state_dict` on resume, so a mask held fixed, a growth schedule or a
stabilisation criterion continues exactly where it was. State must be made of tensors, numbers,
strings, lists and dicts (checkpoints load with ``weights_only=True``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dessilbi.masks import Masks, apply_masks

if TYPE_CHECKING:
    from dessilbi.run_state import TrainingRun

__all__ = ["Callback", "FixedMask"]


class Callback:
    """Base class of training-loop hooks; override what you need (all default to no-ops)."""

    @property
    def name(self) -> str:
        """The key of this callback's state in the checkpoint (unique within a run)."""
        return type(self).__name__

    def on_train_start(self, run: TrainingRun) -> None:
        """Once, after the model and optimizer are built (and restored on resume)."""

    def on_step_end(self, run: TrainingRun) -> None:
        """After every optimizer step (``run.step`` already counts it)."""

    def on_epoch_end(self, run: TrainingRun) -> dict[str, Any] | None:
        """After an epoch's training, before evaluation and the checkpoint.

        ``run.epoch`` is the number of the finished epoch. Changes made here (a wider model, a
        new mask) are evaluated and saved with this epoch. A returned dict is merged into the
        epoch's line of ``metrics.jsonl`` (JSON values only).
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        """What this callback needs to continue after a resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class FixedMask(Callback):
    """Hold a mask fixed: masked-out weights are set back to exactly zero after every step.

    Momentum and weight decay would otherwise move a pruned weight off zero again; re-zeroing
    it after each step (together with the optimizer state of its entries: momentum buffers,
    Adam moments, DessiLBI's V and Γ) keeps the subnetwork fixed through fine-tuning. Masks map
    parameter names (no ``module.`` prefix) to bool tensors of the parameter's shape, True where
    an entry is kept; biases and normalisation parameters may be masked too.
    """

    def __init__(self, masks: Masks, name: str = "FixedMask") -> None:
        self.masks = {name: mask.detach().cpu().clone() for name, mask in masks.items()}
        self._name = name
        self._on_device: dict[str, torch.Tensor] = {}

    @property
    def name(self) -> str:
        return self._name

    def on_train_start(self, run: TrainingRun) -> None:
        self._on_device = {n: m.to(run.device) for n, m in self.masks.items()}
        apply_masks(run.model, self._on_device, run.optimizer)

    def on_step_end(self, run: TrainingRun) -> None:
        apply_masks(run.model, self._on_device, run.optimizer)

    def on_epoch_end(self, run: TrainingRun) -> dict[str, Any]:
        kept = sum(int(m.sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        return {"mask_kept": [kept, total]}

    def state_dict(self) -> dict[str, Any]:
        return {"masks": dict(self.masks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["masks"]
        differ = sorted(set(saved) ^ set(self.masks)) or [
            n for n in saved if not torch.equal(saved[n], self.masks[n])
        ]
        if differ:
            raise ValueError(
                f"{self.name}: the run was trained with other masks ({', '.join(differ)} "
                "differ); resume with the masks it started with"
            )
