"""Filter masks: which groups of each coupled layer a subnetwork keeps, and where that came from.

A :class:`FilterMask` holds, per coupled layer (by weight name), a bool tensor over its groups
(filters for the ``"filter"`` structure) and a ``source`` saying how it was chosen. Masks come

- from the path of a DessiLBI run: :func:`support_mask` (supp Γ at the last or any recorded
  epoch) and :func:`ordered_mask` (a keep ratio per layer or overall, filled in the paper's
  order: entry step ascending, then ‖W_g‖ descending, never-selected groups last);
- from any trained weights, as baselines with the same per-layer counts: :func:`l1_mask`
  (largest L1 norm) and :func:`random_mask` (seeded).

A mask is saved as a small JSON file (:meth:`FilterMask.save`, :func:`load_mask`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dessilbi.optim.proximal import selects_channels
from dessilbi.path_record import PathRecord
from dessilbi.structure import distinct_group_names

__all__ = [
    "MASK_FORMAT",
    "FilterMask",
    "MaskFileError",
    "l1_mask",
    "load_mask",
    "ordered_mask",
    "random_mask",
    "support_mask",
]

MASK_FORMAT = "dessilbi.mask"
_MASK_VERSION = 1


class MaskFileError(ValueError):
    """A mask file that is missing, damaged or of another format; the message names it."""


@dataclass
class FilterMask:
    """Kept groups per coupled layer (True: kept), with where the mask came from."""

    keep: dict[str, torch.Tensor]
    source: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Kept groups per layer."""
        return {name: int(kept.sum()) for name, kept in self.keep.items()}

    @property
    def kept(self) -> int:
        return sum(self.counts().values())

    @property
    def total(self) -> int:
        return sum(kept.numel() for kept in self.keep.values())

    def save(self, file: str | os.PathLike[str]) -> Path:
        """Write the mask as JSON (kept indices per layer) and return the file."""
        path = Path(file)
        layers = {name: {"groups": kept.numel(), "kept": kept.nonzero().view(-1).tolist()}
                  for name, kept in self.keep.items()}
        text = json.dumps({"format": MASK_FORMAT, "version": _MASK_VERSION,
                           "source": self.source, "layers": layers}, indent=1)
        from dessilbi.run_files import atomic_write_text

        atomic_write_text(text + "\n", path)
        return path


def load_mask(file: str | os.PathLike[str]) -> FilterMask:
    """Read a mask written by :meth:`FilterMask.save` (``MaskFileError`` naming the file)."""
    path = Path(file)
    if not path.is_file():
        raise MaskFileError(f"{path}: no mask file there")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != MASK_FORMAT or data.get("version") != _MASK_VERSION:
            raise ValueError(f"not a {MASK_FORMAT} version {_MASK_VERSION} file")
        layers = data["layers"]
        keep = keep_from_indices({n: layer["kept"] for n, layer in layers.items()},
                                 {n: layer["groups"] for n, layer in layers.items()})
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise MaskFileError(f"{path}: cannot be read as a mask ({exc})") from exc
    return FilterMask(keep, dict(data.get("source", {})))


def keep_from_indices(kept: Mapping[str, Sequence[int]], sizes: Mapping[str, int]
                      ) -> dict[str, torch.Tensor]:
    """Bool masks ``[sizes[name]]``, True at the ``kept[name]`` indices (the form in which mask
    files and compact architectures store them)."""
    out = {}
    for name, indices in kept.items():
        mask = torch.zeros(int(sizes[name]), dtype=torch.bool)
        mask[torch.tensor(list(indices), dtype=torch.long)] = True
        out[name] = mask
    return out


def _filter_layers(record: PathRecord, epoch: int) -> list[str]:
    """The layers coupled at ``epoch`` whose groups are output channels: filter-structured
    weights and norm scales (channel groups are inputs, element groups of a weight single
    entries: neither removes a filter). A norm's shift tied to its scale (``norm_structure:
    affine``) is left out: the scale's mask stands for the channel, ordered once."""
    return [n for n in distinct_group_names(record.names)
            if selects_channels(record.structure(n), len(record.group_shape(n, epoch)))
            and any(record.group_shape(n, epoch))]


def _epoch(record: PathRecord, epoch: int | None) -> int:
    if not record.epochs:
        raise ValueError(f"{record.source}: no epoch recorded yet")
    return record.epochs[-1] if epoch is None else epoch


def support_mask(record: PathRecord, epoch: int | None = None) -> FilterMask:
    """supp(Γ) of every filter-coupled layer at ``epoch`` (default: the last recorded)."""
    at = _epoch(record, epoch)
    keep = {n: record.support(n, at) for n in _filter_layers(record, at)}
    return FilterMask(keep, {"method": "support", "epoch": at, "path": record.source})


def _recorded_norms(record: PathRecord, name: str, index: int, groups: int) -> torch.Tensor:
    """‖W_g‖ of ``name``'s groups at epoch ``index``; for a norm's scale tied to its shift
    (``norm_structure: affine``), the group's joint norm sqrt(γ_c² + β_c²)."""
    norms = record.group_norms(name)[index, :groups].double().nan_to_num(0.0)
    shift = f"{name.removesuffix('.weight')}.bias"
    if record.structure(name) == "tied" and name.endswith(".weight") and shift in record.names:
        norms = torch.hypot(norms, record.group_norms(shift)[index, :groups].double()
                            .nan_to_num(0.0))
    return norms


def path_order(record: PathRecord, name: str, epoch: int) -> torch.Tensor:
    """Group indices of layer ``name`` in the paper's order: entry step ascending (groups
    entered after ``epoch`` or never come last), ties by ‖W_g‖ at ``epoch`` descending (a norm's
    scale and shift tied: by their joint norm; a norm's scales as elements, whose per-entry
    norms the path does not keep: by channel index)."""
    index = record.epochs.index(epoch)
    step = record.steps[index]
    groups = record.group_shape(name, epoch)[0]
    entry = record.entry_step(name)[:groups].double()
    entry[(entry < 0) | (entry > step)] = math.inf
    if record.structure(name) == "element":
        # A norm's scales: the path keeps no per-entry norms, so ties stay in channel order.
        norms = torch.zeros(groups, dtype=torch.float64)
    else:
        norms = _recorded_norms(record, name, index, groups)
    # Sort by norm first, then stably by entry: entry ascending, norm descending among ties.
    by_norm = norms.argsort(descending=True, stable=True)
    return by_norm[entry[by_norm].argsort(stable=True)]


def ordered_mask(record: PathRecord, keep: float | Mapping[str, float],
                 epoch: int | None = None, round_to: int = 1) -> FilterMask:
    """The first groups in the paper's order (:func:`path_order`) at ``epoch``.

    ``keep`` is a ratio in (0, 1] for every layer, or a ratio per layer name (layers not named
    keep everything); each layer keeps ``ceil(ratio · groups)`` groups, at least one, rounded
    up to a multiple of ``round_to`` (at most all): CPU and GPU convolution kernels work on
    channel blocks (8 or 16 floats wide), so a layer of 5 channels costs about what one of 8
    does.
    """
    if round_to < 1:
        raise ValueError(f"round_to: {round_to!r} (expected an integer >= 1)")
    at = _epoch(record, epoch)
    out = {}
    for name in _filter_layers(record, at):
        ratio = keep.get(name, 1.0) if isinstance(keep, Mapping) else keep
        if not 0 < ratio <= 1:
            raise ValueError(f"keep ratio of {name}: {ratio!r} (expected a ratio in (0, 1])")
        order = path_order(record, name, at)
        count = max(1, math.ceil(ratio * order.numel()))
        count = min(order.numel(), math.ceil(count / round_to) * round_to)
        kept = torch.zeros(order.numel(), dtype=torch.bool)
        kept[order[:count]] = True
        out[name] = kept
    ratios = dict(keep) if isinstance(keep, Mapping) else keep
    source = {"method": "path_order", "epoch": at, "keep": ratios, "path": record.source}
    return FilterMask(out, source if round_to == 1 else {**source, "round_to": round_to})


def l1_mask(weights: Mapping[str, torch.Tensor], counts: Mapping[str, int],
            source: str = "weights") -> FilterMask:
    """Per layer, the ``counts[layer]`` filters of largest L1 norm in ``weights`` (the
    baseline of Li et al., "Pruning filters for efficient ConvNets"); for a norm layer's scales,
    the channels of largest |γ| (that of network slimming, Liu et al. 2017)."""
    keep = {}
    for name, count in counts.items():
        weight = weights[name].detach().float()
        # A norm layer's scales (1-D): |γ_c|, network slimming's criterion.
        norms = weight.abs().reshape(weight.shape[0], -1).sum(1).cpu()
        kept = torch.zeros(norms.numel(), dtype=torch.bool)
        kept[norms.argsort(descending=True, stable=True)[:count]] = True
        keep[name] = kept
    return FilterMask(keep, {"method": "l1", "counts": dict(counts), "weights": source})


def random_mask(sizes: Mapping[str, int], counts: Mapping[str, int], seed: int) -> FilterMask:
    """Per layer, ``counts[layer]`` of its ``sizes[layer]`` filters drawn at random (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for name, count in counts.items():
        kept = torch.zeros(sizes[name], dtype=torch.bool)
        kept[torch.randperm(sizes[name], generator=gen)[:count]] = True
        keep[name] = kept
    return FilterMask(keep, {"method": "random", "counts": dict(counts), "seed": seed})
