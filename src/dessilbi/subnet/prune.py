"""From a training run to a fine-tuned, compact network: ``dessilbi prune``.

:func:`choose_mask` reads a mask off a run (Γ's support at an epoch, the paper's order with a
keep ratio, or a mask file); :func:`finetune` trains the pruned network through the one training
loop with the mask held fixed (pruned filters, their biases and norm affine stay exactly zero;
checkpoints, resume and records as for ``train``); :func:`save_compact` writes the compact
network as weights plus a JSON description (the registered architecture and the kept channels)
that :func:`load_compact` rebuilds with ``weights_only=True`` and no unpickled code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dessilbi.callbacks import FixedMask
from dessilbi.config import load_config
from dessilbi.path_record import load_path
from dessilbi.run_files import atomic_save, atomic_write_text
from dessilbi.run_state import Architecture
from dessilbi.runs import LoadedRun, load_run
from dessilbi.subnet.compact import CompactResult, compact
from dessilbi.subnet.dependency import channel_masks, zero_pruned_filters
from dessilbi.subnet.masks import (
    FilterMask,
    keep_from_indices,
    load_mask,
    ordered_mask,
    support_mask,
)

__all__ = ["choose_mask", "example_input", "finetune", "load_compact", "mask_hash", "save_compact"]

COMPACT_FORMAT = "dessilbi.compact"


def example_input(run: LoadedRun) -> torch.Tensor:
    """One zero image of the run's data set (what the dependency graph is traced with)."""
    from dessilbi.batches import example_input as config_example

    return config_example(run.config)


def choose_mask(run_dir: str | os.PathLike[str], *, epoch: int | None = None,
                keep: float | None = None, mask_file: str | os.PathLike[str] | None = None,
                flops: float | None = None, params: float | None = None,
                round_to: int = 1) -> FilterMask:
    """A run's mask: ``mask_file``; else the paper's order filled to ``keep`` at ``epoch``
    (each layer's count rounded up to a multiple of ``round_to``); else the longest stretch of
    the path whose compact network has at most the share ``flops`` of the dense FLOPs and
    ``params`` of its parameters; else Γ's support at ``epoch`` (default: the last recorded
    epoch)."""
    if round_to != 1 and keep is None:
        raise ValueError("--round-to rounds the counts of --keep, and only those: use it with "
                         "--keep")
    others = (keep, epoch, flops, params)
    if mask_file is not None and any(x is not None for x in others):
        raise ValueError("--mask gives the mask itself; leave out --keep, --epoch and budgets")
    if mask_file is not None:
        return load_mask(mask_file)
    if keep is not None and (flops is not None or params is not None):
        raise ValueError("--keep and a budget (--flops, --params) exclude each other")
    record = load_path(Path(run_dir) / "path.pt")
    if flops is not None or params is not None:
        return _budget(run_dir, record, epoch, flops, params)
    if keep is None:
        return support_mask(record, epoch)
    return ordered_mask(record, keep, epoch, round_to)


def _budget(run_dir: str | os.PathLike[str], record: Any, epoch: int | None,
            flops: float | None, params: float | None) -> FilterMask:
    from dessilbi.subnet.budget import budget_mask
    from dessilbi.subnet.report import layer_flops

    run = load_run(run_dir)
    example = example_input(run)
    total_params = sum(p.numel() for p in run.model.parameters())
    total_flops = layer_flops(run.model, example)[""]
    return budget_mask(record, run.model, example, epoch=epoch,
                       flops=None if flops is None else flops * total_flops,
                       params=None if params is None else params * total_params)


def mask_hash(mask: FilterMask, overrides: dict[str, Any]) -> str:
    """6 hex digits of the kept filters and the fine-tuning overrides: another mask or another
    lr is another run directory."""
    blob = json.dumps({"keep": {n: k.nonzero().view(-1).tolist() for n, k in mask.keep.items()},
                       "overrides": overrides}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:6]


def finetune(run_dir: str | os.PathLike[str], mask: FilterMask, epochs: int,
             overrides: dict[str, Any] | None = None, quiet: bool = False) -> Any:
    """Fine-tune the pruned network of ``run_dir`` for ``epochs`` with ``mask`` held fixed.

    Starts from the run's last weights with the pruned filters, biases and norm channels zeroed;
    the optimizer, lr and the rest come from the run's config unless ``overrides`` say
    otherwise. The run directory is ``<run>-prune-<mask hash>-<optimizer>-e<epochs>`` beside
    the run (``run_name`` in ``overrides`` sets another); the same call again resumes or
    reports it finished. Returns :func:`dessilbi.train.train`'s result.
    """
    from dessilbi.train import train

    source = load_run(run_dir)
    example = example_input(source)
    model = source.model
    zero_pruned_filters(model, mask.keep, example)
    masks = channel_masks(model, mask.keep, example)
    overrides = dict(overrides or {})
    values = {**source.config.to_dict(), "epochs": epochs, "init_from": None,
              "selection_start": None, "schedule_epochs": None, "run_name": None,
              "out": str(source.run_dir.parent), **overrides}
    if values["run_name"] is None:
        values["run_name"] = (f"{source.run_dir.name}-prune-{mask_hash(mask, overrides)}-"
                              f"{values['optimizer']}-e{epochs}")
    config = load_config(None, values)
    out_dir = Path(config.out) / config.run_directory_name()
    resume = out_dir if (out_dir / "checkpoint.pt").is_file() else None
    out_dir.mkdir(parents=True, exist_ok=True)
    mask.save(out_dir / "mask.json")  # before training: an interrupted run has it too
    # The source's architecture: a compact run's network is fine-tuned as it is.
    return train(config, resume_dir=resume, init_weights=model.state_dict(),
                 architecture=source.architecture,
                 callbacks=[FixedMask(masks, name="PruneMask")], quiet=quiet)


def save_compact(result: CompactResult, architecture: Architecture, keep: FilterMask,
                 folder: str | os.PathLike[str]) -> Path:
    """Write ``folder/model.pt`` (the compact weights) and ``folder/compact.json`` (the
    architecture and the kept filters, from which :func:`load_compact` rebuilds the network)."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    atomic_save(result.model.state_dict(), root / "model.pt")
    description = {"format": COMPACT_FORMAT, "version": 1,
                   "architecture": architecture.to_dict(),
                   "kept": {n: k.nonzero().view(-1).tolist() for n, k in keep.keep.items()},
                   "groups": {n: k.numel() for n, k in keep.keep.items()},
                   "source": keep.source}
    atomic_write_text(json.dumps(description, indent=1) + "\n", root / "compact.json")
    return root


def load_compact(folder: str | os.PathLike[str], example_inputs: torch.Tensor) -> nn.Module:
    """The compact network saved by :func:`save_compact` (eval mode)."""
    root = Path(folder)
    try:
        description = json.loads((root / "compact.json").read_text())
        if description.get("format") != COMPACT_FORMAT:
            raise ValueError(f"not a {COMPACT_FORMAT} description")
        architecture = Architecture.from_dict(description["architecture"])
        keep = keep_from_indices(description["kept"], description["groups"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{root / 'compact.json'}: cannot be read ({exc})") from exc
    with torch.random.fork_rng(devices=[]):
        skeleton = architecture.build()
    net = compact(skeleton, example_inputs, keep=keep).model  # the shapes, not the weights
    state = torch.load(root / "model.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.eval()
