"""Physical compaction: the pruned filters removed, with everything that depends on them.

:func:`compact` zeroes the pruned filters of a copy of the model (with their biases and norm
affine, :func:`~dessilbi.subnet.dependency.zero_pruned_filters`), then removes every channel that
is zero in *all* the layers that share it, through torch-pruning's dependency graph
(``DependencyGraph``, ``get_pruning_group``, ``check_pruning_group``, ``Group.prune``): the next
layers' inputs, batch norms, and the layers tied to it by residual additions are sliced
consistently. A channel pruned in one layer but kept by a tied one stays (zeroed where pruned),
since only the intersection can be removed exactly. The compact model computes what the masked
model computes.

Given an optimizer, its per-parameter state (DessiLBI's V and Γ, momentum buffers, Adam's
moments) is sliced with the index lists of the same pruning groups, and a new optimizer of the
same class over the compact model carries it, so training continues from the same state.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from dessilbi.optim.proximal import selects_channels
from dessilbi.path import group_support
from dessilbi.structure import unwrap_model
from dessilbi.subnet.dependency import (
    LAYER_TYPES,
    dependency_graph,
    is_depthwise,
    on_filters,
    zero_pruned_filters,
)

__all__ = ["CompactResult", "compact"]

@dataclass
class CompactResult:
    """What :func:`compact` returns.

    Attributes:
        model: the compact model (a new module; the input model is left as it was), eval mode.
        optimizer: a new optimizer over ``model`` with the sliced state (None without one).
        removed: per masked layer (weight name), the original indices of the removed channels.
        kept_entries: per parameter name, a bool mask in the *original* parameter's shape, True
            for the entries the compact model still has (for a masked model of the same
            subnetwork, e.g. :class:`~dessilbi.callbacks.FixedMask`).
    """

    model: nn.Module
    optimizer: Optimizer | None
    removed: dict[str, list[int]]
    kept_entries: dict[str, torch.Tensor]


class _Tracker:
    """Follows every parameter through the pruning: original indices left per dimension, and
    the optimizer state (copies), sliced together."""

    def __init__(self, model: nn.Module, state: Mapping[str, dict[str, Any]]) -> None:
        self.model = model
        self.origin = {n: [torch.arange(s) for s in p.shape] for n, p in model.named_parameters()}
        self.state = {n: dict(s) for n, s in state.items()}

    def shapes(self, modules: list[nn.Module]) -> dict[str, tuple[int, ...]]:
        names = {id(m): n for n, m in self.model.named_modules()}
        return {f"{names[id(m)]}.{k}" if names[id(m)] else k: tuple(p.shape)
                for m in modules for k, p in m.named_parameters(recurse=False)}

    def removed(self, before: Mapping[str, tuple[int, ...]], idxs_of: Mapping[str, list[int]]
                ) -> None:
        """After a prune: delete ``idxs_of[name]`` in every dimension of ``name`` that shrank."""
        params = dict(self.model.named_parameters())
        for name, old in before.items():
            new = tuple(params[name].shape)
            for dim, (a, b) in enumerate(zip(old, new, strict=True)):
                if a == b:
                    continue
                idxs = sorted(set(idxs_of[name]))
                if a - b != len(idxs):
                    raise RuntimeError(f"{name}: dim {dim} lost {a - b} entries, not {len(idxs)}")
                keep = torch.ones(a, dtype=torch.bool)
                keep[idxs] = False
                self.origin[name][dim] = self.origin[name][dim][keep]
                for key, value in self.state.get(name, {}).items():
                    if isinstance(value, torch.Tensor) and tuple(value.shape) == old:
                        self.state[name][key] = value[(slice(None),) * dim + (keep.to(
                            value.device),)]
                old = tuple(b if d == dim else s for d, s in enumerate(old))

    def kept_entries(self, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
        out = {}
        for name, origin in self.origin.items():
            mask = torch.zeros(shapes[name], dtype=torch.bool)
            if origin:
                mask[torch.meshgrid(*origin, indexing="ij")] = True
            else:
                mask.fill_(True)  # a 0-d parameter
            out[name] = mask
        return out


def _state_by_name(model: nn.Module, optimizer: Optimizer | None) -> dict[str, dict[str, Any]]:
    if optimizer is None:
        return {}
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                           for k, v in optimizer.state[p].items()}
            for group in optimizer.param_groups for p in group["params"]
            if p in optimizer.state and id(p) in names}


@torch.no_grad()
def _input_magnitudes(net: nn.Module, inputs: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per conv / linear module (by id): the largest |input| of each input feature over one
    forward pass of ``inputs`` (channels of a conv, the last dimension of a linear)."""
    seen: dict[int, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().abs()
        dims = [d for d in range(x.dim()) if d != (x.dim() - 1 if isinstance(
            module, nn.Linear) else 1)]
        seen[id(module)] = x.amax(dim=dims).float().cpu()

    handles = [m.register_forward_pre_hook(hook) for m in net.modules()
               if isinstance(m, LAYER_TYPES)]
    try:
        net.eval()(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _removable(graph: Any, group: Any, keep_now: Mapping[str, torch.Tensor],
               names: Mapping[int, str], count: int, inputs: Mapping[int, torch.Tensor]
               ) -> list[int]:
    """Positions (into the root's index list) of channels that can go without changing what
    the network computes: pruned in every layer that produces them, and exactly zero wherever a
    layer reads them (a norm's shift or an activation with f(0) ≠ 0 in between keeps them).
    Channels no layer reads (the network's outputs) stay."""
    ok = [True] * count
    read = False
    for dep, idxs in group:
        module = dep.target.module
        if not isinstance(module, LAYER_TYPES):
            continue
        if graph.is_out_channel_pruning_fn(dep.handler):
            if is_depthwise(module):
                continue  # its channels are its input's: they go with the layer that feeds it
            kept = keep_now.get(f"{names.get(id(module), '?')}.weight")
            if kept is None or len(idxs) != count:
                return []  # an unmasked layer shares these channels, or an index map we skip
            for k, i in enumerate(idxs):
                ok[k] = ok[k] and not bool(kept[int(i)])
            continue
        read = True
        magnitude = inputs.get(id(module))
        if magnitude is None:
            return []
        values = magnitude[[int(i) for i in idxs]]
        if len(idxs) == count:
            ok = [a and float(v) == 0.0 for a, v in zip(ok, values, strict=True)]
        elif bool(values.any()):
            return []  # a flattened read of a nonzero channel, by an index map we do not split
    return [k for k in range(count) if ok[k]] if read else []


def compact(model: nn.Module, example_inputs: torch.Tensor, optimizer: Optimizer | None = None,
            keep: Mapping[str, torch.Tensor] | None = None) -> CompactResult:
    """Remove the pruned filters of ``model`` physically (see the module docstring).

    Args:
        model: the network (a DDP wrapper is looked through); not modified.
        example_inputs: an input batch to trace the network (e.g. one zero image).
        optimizer: optional; its state is sliced into a new optimizer for the compact model.
        keep: per conv / linear weight name, bool ``[out_channels]`` (True: kept), or per
            batch-norm scale name for the filters that norm follows
            (:func:`~dessilbi.subnet.dependency.on_filters`); default: the groups Γ selected
            (needs a DessiLBI ``optimizer``; filter-structured layers and coupled norm scales).
            ``removed`` in the result is keyed by the conv / linear weights.

    Raises:
        ValueError: no ``keep`` and no optimizer to read Γ from, or a bad mask.
    """
    model = unwrap_model(model)
    if keep is None:
        if optimizer is None:
            raise ValueError("compact needs keep= masks, or a DessiLBI optimizer to read Γ from")
        keep = _filter_support(model, optimizer)
    keep = on_filters(model, keep, example_inputs)
    state = _state_by_name(model, optimizer)
    net = copy.deepcopy(model).eval()
    zero_pruned_filters(net, keep, example_inputs)
    shapes = {n: p.shape for n, p in net.named_parameters()}
    tracker = _Tracker(net, state)
    removed = _prune(net, example_inputs, keep, tracker)
    new_optimizer = None if optimizer is None else _rebuilt(optimizer, model, net, tracker)
    return CompactResult(net, new_optimizer, removed, tracker.kept_entries(shapes))


def _filter_support(model: nn.Module, optimizer: Optimizer) -> dict[str, torch.Tensor]:
    structures = {n: g.get("structure") for g in optimizer.param_groups
                  for n in g.get("param_names", [])}
    params = dict(model.named_parameters())
    return {n: s.cpu() for n, s in group_support(model, optimizer).items()
            if selects_channels(structures.get(n, "filter"), params[n].dim())}


def _prune(net: nn.Module, example_inputs: torch.Tensor, keep: Mapping[str, torch.Tensor],
           tracker: _Tracker) -> dict[str, list[int]]:
    graph, _ = dependency_graph(net, example_inputs)
    modules = dict(net.named_modules())
    names = {id(m): n for n, m in modules.items()}
    keep_now = {n: k.detach().cpu().bool().clone() for n, k in keep.items()}
    # A random batch: a channel that is zero on it for every image is zero by construction.
    probe = torch.randn(2, *example_inputs.shape[1:], generator=torch.Generator().manual_seed(0)
                        ).to(example_inputs)
    origin_of = {n: torch.arange(k.numel()) for n, k in keep_now.items()}
    removed: dict[str, list[int]] = {n: [] for n in keep}
    inputs: dict[int, torch.Tensor] | None = None
    for weight in keep:
        module = modules[weight.rpartition(".")[0]]
        pruned = (~keep_now[weight]).nonzero().view(-1).tolist()
        if not pruned:
            continue
        out_fn = graph.get_pruner_of_module(module).prune_out_channels
        group = graph.get_pruning_group(module, out_fn, idxs=pruned)
        if inputs is None:  # measured again only after a prune changed the network
            inputs = _input_magnitudes(net, probe)
        positions = _removable(graph, group, keep_now, names, len(pruned), inputs)
        if not positions:
            continue
        group = graph.get_pruning_group(module, out_fn, idxs=[pruned[k] for k in positions])
        if not graph.check_pruning_group(group):
            continue  # it would leave a layer without channels
        items = [(dep.target.module, [int(i) for i in idxs]) for dep, idxs in group]
        before = tracker.shapes([m for m, _ in items])
        idxs_of = {}
        for m, idxs in items:
            for k, _ in m.named_parameters(recurse=False):
                idxs_of[f"{names[id(m)]}.{k}" if names[id(m)] else k] = idxs
        group.prune()
        inputs = None
        tracker.removed(before, idxs_of)
        for m, idxs in items:  # the owners' masks and origins follow their channels
            owner = f"{names.get(id(m), '?')}.weight"
            if owner in keep_now and isinstance(m, LAYER_TYPES) and \
                    keep_now[owner].numel() - len(idxs) == m.weight.shape[0]:
                left = torch.ones(keep_now[owner].numel(), dtype=torch.bool)
                left[idxs] = False
                removed[owner] += origin_of[owner][~left].tolist()
                keep_now[owner], origin_of[owner] = keep_now[owner][left], origin_of[owner][left]
    return {n: sorted(r) for n, r in removed.items()}


def _rebuilt(optimizer: Optimizer, model: nn.Module, net: nn.Module, tracker: _Tracker
             ) -> Optimizer:
    """An optimizer of ``optimizer``'s class and hyperparameters over ``net``, with the state
    of ``tracker`` (sliced)."""
    old_names = {id(p): n for n, p in model.named_parameters()}
    params = dict(net.named_parameters())
    groups = []
    for group in optimizer.param_groups:
        names = [old_names[id(p)] for p in group["params"]]
        options = {k: v for k, v in group.items() if k != "params"}
        groups.append({**options, "params": [params[n] for n in names]})
    # Only the defaults the class takes: torch's load_state_dict adds others ("differentiable").
    accepted = inspect.signature(type(optimizer)).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    fresh = type(optimizer)(groups, **{k: v for k, v in optimizer.defaults.items()
                                       if takes_any or k in accepted})
    for attribute in ("nonfinite",):  # DessiLBI's settings outside the param groups
        if hasattr(optimizer, attribute):
            setattr(fresh, attribute, getattr(optimizer, attribute))
    for name, values in tracker.state.items():
        fresh.state[params[name]] = values
    return fresh
