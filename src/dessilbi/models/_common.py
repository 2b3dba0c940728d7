"""Helpers shared by the model definitions: weight initialisation and argument checks."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn


def init_weights(model: nn.Module) -> None:
    """Initialise ``model`` in place with the scheme used throughout the zoo.

    * ``nn.Conv2d``: Kaiming-normal with ``mode="fan_in"`` (the default of
      :func:`torch.nn.init.kaiming_normal_`, as in the reference CIFAR ResNet code), which keeps
      the forward activation variance roughly constant through ReLU layers; this matters for the
      BatchNorm-free nets (LeNet-5, plain VGG-16). Conv biases, where present, start at zero.
    * ``nn.BatchNorm2d``: weight 1, bias 0 (an identity affine transform at the start).
    * ``nn.Linear``: left at PyTorch's default (Kaiming-uniform), bias kept as well; it already
      behaves well for the small classifier heads used here.

    Every random draw comes from torch's global generator, so the result is fully determined by
    :func:`torch.manual_seed` and the order in which modules were created.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def equalize_filter_norms(model: nn.Module, example: torch.Tensor | None = None) -> int:
    """Scale every ``nn.Conv2d`` filter of ``model`` to its layer's RMS filter norm, in place;
    returns the number of layers changed.

    Behind a batch norm (in training mode) a filter's scale does not change what the network
    computes, so this changes nothing but where each filter starts. It matters to DessiLBI's
    selection: the coupling's pull leaves ``W_g(0)/κ`` in V, and with equal norms that offset
    is the same for every filter of a layer, so the order in which a layer's filters enter is
    set by what the data add (:mod:`dessilbi.selection`), not by the draw of the
    initialisation (whose norms spread by about 1/√(2·fan-in): 14 % for a 3×3 RGB filter).
    Given ``example`` (a batch of inputs), a network whose output would move by more than
    :data:`SCALE_TOLERANCE` is refused with a ``ValueError`` and left as it was; without it
    nothing is checked (training passes one, so a run is always checked).
    """
    if example is not None:
        _refuse_if_output_moves(model, _equalize_convs, example, "equal_filter_norms",
                                "a convolution without a batch norm after it")
    return _equalize_convs(model)


@torch.no_grad()
def _equalize_convs(model: nn.Module) -> int:
    changed = 0
    for module in model.modules():
        if not isinstance(module, nn.Conv2d):
            continue
        weight = module.weight
        norms = weight.flatten(1).norm(dim=1)
        if bool((norms == 0).any()):
            continue  # a zero filter has no direction to keep
        target = norms.square().mean().sqrt()
        weight.mul_((target / norms).view(-1, *([1] * (weight.dim() - 1))))
        changed += 1
    return changed


#: How far (relative to its largest value) the output of a network in training mode may move
#: when :func:`scale_filter_norms` or :func:`equalize_filter_norms` rescale its filters: the
#: batch norms' ε moves it a little (VGG-16-BN at a scale of 0.1: 0.25 %; at 0.03: 2.9 %).
SCALE_TOLERANCE = 1e-2


def scale_filter_norms(model: nn.Module, scale: float, example: torch.Tensor) -> int:
    """Multiply every ``nn.Conv2d`` filter of ``model`` by ``scale``, in place; returns the
    number of layers changed.

    For networks whose convolutions all feed batch norms (VGG-BN, ResNets): there it changes
    what the network computes at the start only through the norms' ε, but it moves where W
    starts, and with it the offset W(0)/κ that DessiLBI's pull leaves in V
    (:mod:`dessilbi.selection`). Training is not the same: a filter's gradient scales by
    1/scale, so the first steps turn it further. Checked on ``example`` (a batch of inputs,
    training mode, on copies): a network whose output moves by more than
    :data:`SCALE_TOLERANCE` is refused with a ``ValueError`` and left as it was.
    """
    if scale == 1:
        return 0
    _refuse_if_output_moves(model, lambda m: _scale_convs(m, scale), example,
                            f"filter_norm_scale {scale:g}", "a convolution without a batch "
                            "norm after it, or a scale so small that the norms' epsilon matters")
    return _scale_convs(model, scale)


def _refuse_if_output_moves(model: nn.Module, change: Callable[[nn.Module], object],
                            example: torch.Tensor, what: str, causes: str) -> None:
    """Raise ``ValueError`` (saying ``what`` did it and its likely ``causes``) if ``change``
    moves the output of ``model`` (training mode, on copies) by more than
    :data:`SCALE_TOLERANCE` of its size on ``example``."""
    example = example.to(next(model.parameters()).device)
    reference, changed = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    change(changed)
    with torch.no_grad():
        before, after = reference(example), changed(example)
    moved = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
    if not moved <= SCALE_TOLERANCE:
        raise ValueError(
            f"{what} changes what {type(model).__name__} computes (its output in training "
            f"mode moved by {moved:.1%} of its size): {causes}")


@torch.no_grad()
def _scale_convs(model: nn.Module, scale: float) -> int:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        conv.weight.mul_(scale)
    return len(convs)


def check_positive(name: str, value: int) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive integer (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_widths(widths: Sequence[int] | None, default: Sequence[int], what: str) -> list[int]:
    """Return ``widths`` (or ``default`` when ``None``) as a validated list of channel counts.

    ``what`` names the model in error messages. The length must match ``default`` because each
    entry maps to a fixed layer/stage of the architecture.
    """
    if widths is None:
        return list(default)
    result = list(widths)
    if len(result) != len(default):
        raise ValueError(f"{what} expects {len(default)} widths, got {len(result)}: {result!r}")
    for i, w in enumerate(result):
        check_positive(f"{what} widths[{i}]", w)
    return result
