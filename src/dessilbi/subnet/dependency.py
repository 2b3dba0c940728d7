"""Which tensors belong to a layer's output channels, read off torch-pruning's dependency graph.

A filter of a convolution (an output unit of a linear layer) is removed with its bias entry and
with the affine parameters of the normalisation layer that normalises its output channel: a
channel whose filter, bias and norm weight and bias are zero is exactly zero after the norm, so
the network computes what the network without that channel computes (where the channel is not
added to other layers' channels by a residual connection). A depthwise convolution that follows
carries the channel on (its filter and norm are zeroed too). These followers are found by
walking the graph from the layer through operations of one input (activations, pooling),
stopping at additions and concatenations, whose other inputs would share the channel.

Needs torch-pruning (``pip install 'dessilbi[subnet]'``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = [
    "LAYER_TYPES",
    "channel_followers",
    "channel_masks",
    "dependency_graph",
    "filter_norms",
    "is_depthwise",
    "on_filters",
    "zero_pruned_filters",
]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm)
#: The layers whose output channels are filters (what masks, compaction and ties are about).
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _torch_pruning():  # type: ignore[no-untyped-def]
    try:
        import torch_pruning  # type: ignore[import-untyped]
    except ImportError as exc:  # an optional extra
        raise ImportError("this needs torch-pruning: pip install 'dessilbi[subnet]'") from exc
    return torch_pruning


def dependency_graph(model: nn.Module, example_inputs: torch.Tensor):  # type: ignore[no-untyped-def]
    """torch-pruning's dependency graph of ``model``, traced in eval mode (batch-norm statistics
    untouched)."""
    tp = _torch_pruning()
    training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # the graph is read off autograd's
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs,
                                                         verbose=False), tp
    finally:
        model.train(training)


def channel_followers(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, list[str]]:
    """For every conv / linear weight (by parameter name), the modules whose output channels
    are its own: affine norm layers and depthwise convolutions reached through operations of
    one input (activations, pooling), up to the first addition, concatenation or other layer.
    """
    graph, tp = dependency_graph(model, example_inputs)
    names = {module: name for name, module in model.named_modules()}
    found = {}
    for module, node in graph.module2node.items():
        if isinstance(module, LAYER_TYPES) and module in names:
            followers = [names[m] for m in _followers(node, tp.ops.OPTYPE) if m in names]
            if followers:
                found[f"{names[module]}.weight"] = followers
    return found


def filter_norms(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, str]:
    """For every conv / linear weight whose output channels an affine norm layer normalises
    directly (through one-input operations), that layer's module name."""
    modules = dict(model.named_modules())
    out = {}
    for weight, followers in channel_followers(model, example_inputs).items():
        if isinstance(modules[followers[0]], _NORMS):
            out[weight] = followers[0]
    return out


def on_filters(model: nn.Module, keep: Mapping[str, torch.Tensor],
               example_inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """``keep`` with every mask on a batch norm's scale or shift (``norm_structure``: Γ on the
    batch-norm affine parameters selects channels) moved to the conv / linear weight whose
    output channels that norm normalises; a layer masked both ways keeps the channels both keep.

    Raises:
        ValueError: a mask on a norm's scale or shift of the wrong length, or on a norm that
            no conv / linear layer feeds directly (after an addition, say), so no filter can be
            removed with its channel; a mask on anything that is neither a layer's weight nor a
            norm's scale or shift.
    """
    modules = dict(model.named_modules())
    norm_names = []
    for name, kept in keep.items():
        module_name, _, param = name.rpartition(".")
        module = modules.get(module_name)
        if isinstance(module, _NORMS) and param in ("weight", "bias"):
            if kept.dim() != 1 or kept.numel() != module.weight.shape[0]:
                raise ValueError(f"{name}: mask of shape {tuple(kept.shape)}, expected "
                                 f"[{module.weight.shape[0]}] (one entry per channel)")
            norm_names.append(name)
        elif module is not None and not (isinstance(module, LAYER_TYPES) and param == "weight"):
            raise ValueError(f"{name}: masks are kept per conv / linear weight or batch-norm "
                             "scale or shift; this is none of them")
    if not norm_names:
        return dict(keep)
    # A norm's shift (norm_structure: affine) selects the same channels as its scale.
    producer = {f"{norm}.{param}": weight
                for weight, norm in filter_norms(model, example_inputs).items()
                for param in ("weight", "bias")}
    out: dict[str, torch.Tensor] = {}
    for name, kept in keep.items():
        if name in norm_names and name not in producer:
            raise ValueError(f"{name}: no conv or linear layer feeds this norm directly, so its "
                             "channels are no layer's filters")
        target = producer.get(name, name)
        kept = kept.to(torch.bool)
        out[target] = out[target] & kept.to(out[target].device) if target in out else kept
    return out


def is_depthwise(module: nn.Module) -> bool:
    """A convolution whose every channel is its own group (its channels are its input's)."""
    return isinstance(module, LAYER_TYPES[:3]) and 1 < module.groups == module.in_channels == \
        module.out_channels


def _followers(node, optype) -> list[nn.Module]:  # type: ignore[no-untyped-def]
    """The norms and depthwise convs that carry ``node``'s output channels one to one."""
    found: list[nn.Module] = []
    current = node
    for _ in range(32):  # activations, dropout, pooling between the layers
        if len(current.outputs) != 1:
            break
        nxt = current.outputs[0]
        module = nxt.module
        if len(nxt.inputs) != 1:
            break  # an addition or concatenation: other layers share the channel
        if isinstance(module, _NORMS):
            if not getattr(module, "affine", True):
                break
            found.append(module)
        elif is_depthwise(module):
            found.append(module)
        elif nxt.type != optype.ELEMENTWISE:
            break  # another layer
        current = nxt
    return found


def zero_pruned_filters(model: nn.Module, keep: Mapping[str, torch.Tensor],
                        example_inputs: torch.Tensor) -> None:
    """Zero the pruned filters of ``model`` in place, with their bias entries and the affine
    parameters of their norm channels (see the module docstring).

    Args:
        model: the network.
        keep: per conv / linear weight name, a bool tensor ``[out_channels]``, True where kept
            (or per norm scale name, see :func:`on_filters`).
        example_inputs: an input batch to trace the network with (e.g. one zero image).

    Raises:
        KeyError: a name in ``keep`` that is no parameter of ``model``.
        ValueError: a mask whose length is not the layer's number of output channels.
    """
    params = dict(model.named_parameters())
    keep = on_filters(model, keep, example_inputs)
    for name, kept in keep.items():  # every mask checked before anything is changed
        if name not in params:
            raise KeyError(f"{name}: no such parameter in the model")
        if kept.dim() != 1 or kept.numel() != params[name].shape[0]:
            raise ValueError(f"{name}: mask of shape {tuple(kept.shape)}, expected "
                             f"[{params[name].shape[0]}] (one entry per output channel)")
    modules = dict(model.named_modules())
    followers = channel_followers(model, example_inputs)
    with torch.no_grad():
        for name, kept in keep.items():
            layer = modules[name.rpartition(".")[0]]
            chain = [layer] + [modules[f] for f in followers.get(name, [])]
            _zero_channels(chain, ~kept.to(device=params[name].device, dtype=torch.bool))


def _zero_channels(chain: list[nn.Module], dropped: torch.Tensor) -> None:
    """Zero the ``dropped`` output channels of every module in ``chain``: weight and bias of a
    layer or depthwise conv, the affine weight and bias of a norm."""
    for module in chain:
        for tensor in (getattr(module, "weight", None), getattr(module, "bias", None)):
            if isinstance(tensor, torch.Tensor):
                tensor[dropped] = 0


def channel_masks(model: nn.Module, keep: Mapping[str, torch.Tensor],
                  example_inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entry masks (True: kept) of every parameter :func:`zero_pruned_filters` would touch, in
    each parameter's shape: the pruned filters, their biases, the followers' channels. For
    holding a pruned network fixed (:class:`~dessilbi.callbacks.FixedMask`)."""
    modules = dict(model.named_modules())
    keep = on_filters(model, keep, example_inputs)
    followers = channel_followers(model, example_inputs)
    masks: dict[str, torch.Tensor] = {}
    for name, kept in keep.items():
        layer_name = name.rpartition(".")[0]
        chain = [layer_name, *followers.get(name, [])]
        for module_name in chain:
            for key, param in modules[module_name].named_parameters(recurse=False):
                if key not in ("weight", "bias"):
                    continue
                full = f"{module_name}.{key}" if module_name else key
                view = [-1] + [1] * (param.dim() - 1)
                mask = kept.to(torch.bool).view(view).expand(param.shape).clone()
                masks[full] = masks[full] & mask if full in masks else mask
    return masks
