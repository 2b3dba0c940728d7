"""Tied filters: layers whose output channels a residual addition joins, as one group each.

A channel of a residual stream can only be removed from every layer that writes it. With one Γ
per layer the tied layers disagree, and only the channels every one of them dropped can go
(measured on ResNet-20 with random 50 % masks: 1 of 16, 2 of 32 and 6 of 64 channels). The
``"tied"`` structure (:func:`dessilbi.optim.proximal.tied_prox`) makes filter ``i`` of all tied
layers one group with one norm, so whatever Γ zeroes can be removed exactly. Which layers are
tied is read off torch-pruning's dependency graph (``get_pruning_group`` of each layer's output
channels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dessilbi.subnet.dependency import LAYER_TYPES, dependency_graph, is_depthwise

__all__ = ["tie_filter_groups", "tied_sets"]

def tied_sets(model: nn.Module, example_inputs: torch.Tensor, names: Sequence[str]
              ) -> list[list[str]]:
    """Partition the weights ``names`` (conv / linear, by parameter name) into sets whose
    output channels are tied; singletons for untied layers; in the order of ``names``."""
    graph, _ = dependency_graph(model, example_inputs)
    modules = dict(model.named_modules())
    module_names = {id(m): n for n, m in modules.items()}
    wanted = set(names)
    parent = {n: n for n in names}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for name in names:
        module = modules[name.rpartition(".")[0]]
        out_fn = graph.get_pruner_of_module(module).prune_out_channels
        for dep, _ in graph.get_pruning_group(module, out_fn, idxs=[0]):
            other = dep.target.module
            owner = isinstance(other, LAYER_TYPES) and graph.is_out_channel_pruning_fn(dep.handler)
            if not owner:
                continue
            if is_depthwise(other):
                continue
            weight = f"{module_names.get(id(other), '?')}.weight"
            if weight in wanted:
                parent[root(weight)] = root(name)
    sets: dict[str, list[str]] = {}
    for name in names:
        sets.setdefault(root(name), []).append(name)
    return list(sets.values())


def tie_filter_groups(groups: list[dict[str, Any]], model: nn.Module,
                      example_inputs: torch.Tensor) -> list[dict[str, Any]]:
    """Param groups with every ``"filter"`` group split by :func:`tied_sets`: a ``"tied"``
    group per set of two or more tied layers, ``"filter"`` groups for the others (same
    options, ``param_names`` kept)."""
    out = []
    for group in groups:
        if group.get("structure") != "filter":
            out.append(group)
            continue
        names = list(group["param_names"])
        by_name = dict(zip(names, group["params"], strict=True))
        for members in tied_sets(model, example_inputs, names):
            structure = "tied" if len(members) > 1 else "filter"
            out.append({**group, "params": [by_name[n] for n in members],
                        "param_names": members, "structure": structure})
    return out
