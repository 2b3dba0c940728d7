"""A subnetwork for a FLOPs or parameter budget, read off the path: no ratio to tune per layer.

The path orders every filter of every coupled layer by when Γ selected it (entry step; groups
that never entered last) and, among groups of one step, by ‖W_g‖ at the chosen epoch, largest
first. A prefix of that order is a point on the path; :func:`budget_mask` takes the longest
prefix whose compact network (:func:`~dessilbi.subnet.compact.compact`) fits the budget, found
by bisection over the prefix length (about log₂(filters) compactions). Every layer keeps at
least one filter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dessilbi.path_record import PathRecord
from dessilbi.subnet.compact import compact
from dessilbi.subnet.masks import FilterMask, _epoch, _filter_layers, path_order
from dessilbi.subnet.report import layer_flops

__all__ = ["budget_mask", "global_order"]


def global_order(record: PathRecord, epoch: int) -> list[tuple[str, int]]:
    """(layer, filter) pairs of every filter-coupled layer in the path's order at ``epoch``:
    entry step ascending (entered after ``epoch`` or never: last), then the layer's own order."""
    step = record.steps[record.epochs.index(epoch)]
    keyed = []
    for name in _filter_layers(record, epoch):
        entry = record.entry_step(name).double()
        entry[(entry < 0) | (entry > step)] = math.inf
        for rank, g in enumerate(path_order(record, name, epoch).tolist()):
            keyed.append((float(entry[g]), rank, name, g))
    keyed.sort()
    return [(name, g) for _, _, name, g in keyed]


def _prefix_mask(order: list[tuple[str, int]], count: int, sizes: dict[str, int]
                 ) -> dict[str, torch.Tensor]:
    keep = {n: torch.zeros(s, dtype=torch.bool) for n, s in sizes.items()}
    for name, g in order[:count]:
        keep[name][g] = True
    for name, kept in keep.items():  # no layer without filters: its first in the order stays
        if not bool(kept.any()):
            kept[next(g for n, g in order if n == name)] = True
    return keep


def budget_mask(record: PathRecord, model: nn.Module, example_inputs: torch.Tensor, *,
                flops: float | None = None, params: float | None = None,
                epoch: int | None = None) -> FilterMask:
    """The longest prefix of the path's order whose compact network has at most ``flops``
    FLOPs per example input and ``params`` parameters (either or both; absolute counts).

    Raises:
        ValueError: no budget given, or not even one filter per layer fits it.
    """
    if flops is None and params is None:
        raise ValueError("budget_mask needs flops= or params= (or both)")
    at = _epoch(record, epoch)
    order = global_order(record, at)
    sizes = {n: record.group_shape(n, at)[0] for n in _filter_layers(record, at)}

    def fits(count: int) -> bool:
        small = compact(model, example_inputs, keep=_prefix_mask(order, count, sizes)).model
        ok = params is None or sum(p.numel() for p in small.parameters()) <= params
        return ok and (flops is None or layer_flops(small, example_inputs)[""] <= flops)

    if not fits(0):
        raise ValueError(f"no subnetwork with one filter per layer fits the budget "
                         f"(flops={flops}, params={params})")
    lo, hi = 0, len(order)  # fits(lo) holds; find the largest such count
    if fits(hi):
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return FilterMask(_prefix_mask(order, lo, sizes),
                      {"method": "budget", "epoch": at, "flops": flops, "params": params,
                       "filters_in_order": lo, "path": record.source})
