"""Which tensors belong to a layer's output channels, read off torch-pruning's dependency graph.

A filter of a convolution (an output unit of a linear layer) is removed with its bias entry and
with the affine parameters of the normalisation layer that normalises its output channel: a
channel whose filter, bias and norm weight and bias are zero is exactly zero after the norm, so
the network computes what the network without that channel computes (where the channel is not
added to other layers' channels by a residual connection). The norm is found by following the
graph from the layer through operations of one input (activations, pooling), stopping at
additions and concatenations, whose other inputs would share the channel.

Needs torch-pruning (``pip install 'dessilbi[subnet]'``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["filter_norms", "zero_pruned_filters"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm)


def _torch_pruning():  # type: ignore[no-untyped-def]
    try:
        import torch_pruning  # type: ignore[import-untyped]
    except ImportError as exc:  # an optional extra
        raise ImportError("this needs torch-pruning: pip install 'dessilbi[subnet]'") from exc
    return torch_pruning


def filter_norms(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, str]:
    """For every conv / linear weight (by parameter name) whose output channels are normalised
    by an affine norm layer directly (through one-input operations), that layer's module name.

    Traces ``model`` once on ``example_inputs`` in eval mode (batch-norm statistics untouched).
    """
    tp = _torch_pruning()
    training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # the graph is read off autograd's
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs,
                                                          verbose=False)
    finally:
        model.train(training)
    module_names = {module: name for name, module in model.named_modules()}
    found = {}
    for module, node in graph.module2node.items():
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        norm = _norm_after(node, tp.ops.OPTYPE)
        if norm is not None and module in module_names and norm in module_names:
            found[f"{module_names[module]}.weight"] = module_names[norm]
    return found


def _norm_after(node, optype) -> nn.Module | None:  # type: ignore[no-untyped-def]
    """The affine norm module reached from ``node`` through one-input, one-output operations,
    if the layer's output goes nowhere else."""
    current = node
    for _ in range(16):  # activations, dropout, pooling between a layer and its norm
        if len(current.outputs) != 1:
            return None
        nxt = current.outputs[0]
        module = nxt.module
        if isinstance(module, _NORMS):
            affine = getattr(module, "affine", True)
            return module if affine and len(nxt.inputs) == 1 else None
        if nxt.type != optype.ELEMENTWISE or len(nxt.inputs) != 1:
            return None  # an addition, a concatenation, another layer
        current = nxt
    return None


def zero_pruned_filters(model: nn.Module, keep: Mapping[str, torch.Tensor],
                        example_inputs: torch.Tensor) -> None:
    """Zero the pruned filters of ``model`` in place, with their bias entries and the affine
    parameters of their norm channels (see the module docstring).

    Args:
        model: the network.
        keep: per conv / linear weight name, a bool tensor ``[out_channels]``, True where kept.
        example_inputs: an input batch to trace the network with (e.g. one zero image).

    Raises:
        KeyError: a name in ``keep`` that is no parameter of ``model``.
        ValueError: a mask whose length is not the layer's number of output channels.
    """
    params = dict(model.named_parameters())
    for name, kept in keep.items():  # every mask checked before anything is changed
        if name not in params:
            raise KeyError(f"{name}: no such parameter in the model")
        if kept.dim() != 1 or kept.numel() != params[name].shape[0]:
            raise ValueError(f"{name}: mask of shape {tuple(kept.shape)}, expected "
                             f"[{params[name].shape[0]}] (one entry per output channel)")
    modules = dict(model.named_modules())
    norms = filter_norms(model, example_inputs)
    with torch.no_grad():
        for name, kept in keep.items():
            _zero_filters(params[name], modules, norms.get(name), name, kept)


def _zero_filters(weight: nn.Parameter, modules: Mapping[str, nn.Module], norm_name: str | None,
                  name: str, kept: torch.Tensor) -> None:
    dropped = ~kept.to(device=weight.device, dtype=torch.bool)
    weight[dropped] = 0
    bias = getattr(modules[name.rpartition(".")[0]], "bias", None)
    if isinstance(bias, torch.Tensor):
        bias[dropped] = 0
    norm = modules.get(norm_name) if norm_name else None
    if norm is not None:
        for affine in (norm.weight, norm.bias):
            if isinstance(affine, torch.Tensor):
                affine[dropped] = 0
