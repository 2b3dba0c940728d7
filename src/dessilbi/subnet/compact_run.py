"""A run continued on its compact network: ``dessilbi prune RUN --compact --as-run``.

:func:`compact_run` takes a run's last checkpoint, removes the pruned filters from the model
(:func:`~dessilbi.subnet.compact.compact`) and slices the optimizer's state with the same
indices (DessiLBI's V, Γ and momentum; SGD's momentum), and writes the result as a run
directory of its own: the source's config, metrics and checkpoint fields (epoch, step, schedule,
random states, callbacks), the compact weights and optimizer state, and an
:class:`~dessilbi.run_state.Architecture` that describes the compact network by the filters
kept. ``dessilbi train --resume OUT --epochs N`` then trains on from the same state, through the
one training loop; the path of Γ starts afresh there (its groups are the compact network's), the
source run's ``path.pt`` keeps the path up to the compaction.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dessilbi.path_record import PathRecorder
from dessilbi.run_files import atomic_save, load_checkpoint
from dessilbi.run_state import Architecture
from dessilbi.runs import load_run
from dessilbi.subnet.compact import compact
from dessilbi.subnet.dependency import on_filters
from dessilbi.subnet.masks import FilterMask, load_mask

__all__ = ["compact_run"]

#: Callbacks whose state does not depend on the shapes of the weights after calibration.
_SHAPE_FREE_CALLBACKS = ("StartEpochThresholds",)
#: The fixed mask of a ``dessilbi prune`` fine-tuning run: once every channel it holds at zero
#: is removed, it has nothing left to hold.
_PRUNE_MASK = "PruneMask"


def compact_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str],
                mask: FilterMask | None = None) -> Path:
    """Write the run ``run_dir`` continued on its compact network into the new directory
    ``out``, and return it.

    Args:
        run_dir: a run directory with a checkpoint: a DessiLBI run, or a fine-tuning run of
            ``dessilbi prune`` (its ``mask.json`` is then the default mask).
        out: the new run directory (must not exist yet).
        mask: the filters to keep (default: the fine-tuning run's mask, else Γ's support in
            the checkpoint).

    Raises:
        ValueError: ``out`` exists; the checkpoint holds the state of callbacks tied to the
            full network's shapes (a calibration still under way, a callback of a user's); a
            fine-tuning run whose mask holds channels that cannot be removed.
    """
    source, target = Path(run_dir), Path(out)
    if target.exists():
        raise ValueError(f"{target}: exists already; a compact run is written into a new "
                         "directory (remove it, or continue it with dessilbi train --resume)")
    ckpt = load_checkpoint(source / "checkpoint.pt")
    callbacks = _callback_states(source, ckpt)
    if mask is None and _PRUNE_MASK in callbacks:
        mask = load_mask(source / "mask.json")
    loaded = load_run(source, with_optimizer=True)
    from dessilbi.batches import example_input

    example = example_input(loaded.config)
    # Masks on norm scales (norm_structure) become masks of the filters those norms follow.
    keep = None if mask is None else on_filters(loaded.model, mask.keep, example)
    result = compact(loaded.model.eval(), example, loaded.optimizer, keep)
    assert result.optimizer is not None  # an optimizer was given
    if callbacks.pop(_PRUNE_MASK, None) is not None:
        _check_all_removed(source, keep, result.removed)
    architecture = Architecture(loaded.architecture.name, dict(loaded.architecture.kwargs),
                                _kept(loaded.model, result.removed, loaded.architecture.kept))
    result.model.train()
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy2(source / name, staging / name)
    # A fresh path: the recorder keeps groups by index, and the compact network's are others.
    atomic_save(PathRecorder(result.model, result.optimizer).state_dict(), staging / "path.pt")
    atomic_save({**ckpt, "architecture": architecture.to_dict(),
                 "model": result.model.state_dict(), "optimizer": result.optimizer.state_dict(),
                 "callbacks": callbacks}, staging / "checkpoint.pt")
    staging.rename(target)  # complete or absent: never a half-written run directory
    return target


def _kept(model: nn.Module, removed: dict[str, list[int]],
          before: dict[str, list[int]] | None) -> dict[str, list[int]]:
    """Per layer, the indices into the registered model's layer of the channels kept: those
    ``model`` (compacted ``before`` already, if given) keeps after ``removed`` go."""
    params = dict(model.named_parameters())
    kept = dict(before or {})
    for name, idxs in removed.items():
        if not idxs:
            continue
        positions = sorted(set(range(params[name].shape[0])) - set(idxs))
        origin = kept.get(name)  # the registered model's index of each current channel
        kept[name] = positions if origin is None else [origin[i] for i in positions]
    return kept


def _callback_states(source: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's callback states, if the compact run can carry them on."""
    states = dict(ckpt.get("callbacks") or {})
    tied = [name for name in states if name not in (*_SHAPE_FREE_CALLBACKS, _PRUNE_MASK)]
    if tied:
        raise ValueError(f"{source}: its checkpoint holds the state of {', '.join(tied)}, "
                         "which may depend on the full network's shapes")
    thresholds = states.get("StartEpochThresholds")
    if isinstance(thresholds, dict) and not thresholds.get("lams"):
        raise ValueError(f"{source}: its selection_start calibration is still under way "
                         f"(epoch {ckpt['epoch']}); compact it once selection has started")
    return states


def _check_all_removed(source: Path, keep: dict[str, torch.Tensor] | None,
                       removed: dict[str, list[int]]) -> None:
    assert keep is not None
    for name, kept in keep.items():
        pruned = (~kept).nonzero().view(-1).tolist()
        if sorted(removed.get(name, [])) != pruned:
            raise ValueError(f"{source}: its fixed mask holds channels of {name} at zero that "
                             "cannot be removed (tied to kept ones), so the compact run could "
                             "not keep them at zero; compact the run the mask was taken from")
