"""Which parameters of a model are coupled to a structure parameter, and how.

The decision is made from module types and parameter roles, never from hand-written layer-name
lists: convolution weights get the ``conv`` structure, linear weights the ``linear`` structure,
and biases and normalisation parameters stay uncoupled in a group of their own (so that weight
decay can be switched off for them, as the reference code did).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from dessilbi.optim.proximal import STRUCTURES

__all__ = ["NORM_STRUCTURES", "NORM_TYPES", "distinct_group_names", "structured_param_groups",
           "unwrap_model"]

#: Structures of batch-norm parameters: their scales (``"element"``), scales and shifts as one
#: group per channel (``"affine"``), or uncoupled.
NORM_STRUCTURES: tuple[str | None, ...] = (None, "element", "affine")

_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: Module types whose parameters count as normalisation parameters (uncoupled, no decay).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*, lazy variants
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside any DistributedDataParallel / DataParallel wrappers.

    Parameter names of the result carry no ``module.`` prefix; every name-keyed read-out
    (``structured_param_groups``' ``param_names``, :mod:`dessilbi.path`) uses these names, so they
    agree whether or not the model was wrapped. Other wrappers are left alone: their names keep
    whatever prefix they add, consistently in all of these functions.
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _check_channel_groups(module_name: str, module: nn.Module) -> None:
    """Refuse the channel structure on a grouped / depthwise convolution.

    Its weight is ``[out, in / groups, ...]``: slice ``W[:, j]`` mixes input channel ``j`` of
    every group (and a depthwise conv has one such slice in all), so the groups would not be
    input channels at all.
    """
    groups = getattr(module, "groups", 1)
    if groups != 1:
        raise ValueError(
            f"{module_name or '<model>'} ({type(module).__name__} groups={groups}): channel "
            "structure needs groups=1; use conv='filter' or exclude it"
        )


def structured_param_groups(
    model: nn.Module,
    conv: str | None = "filter",
    linear: str | None = "element",
    exclude: Sequence[str] = (),
    weight_decay: float | None = None,
    norm_weight_decay: float | None = 0.0,
    norm: str | None = None,
) -> list[dict[str, Any]]:
    """Param groups for :class:`dessilbi.DessiLBI`, with the structure decided per layer type.

    Args:
        model: any ``nn.Module``; a DDP / DataParallel wrapper is looked through, so names and
            patterns never carry its ``module.`` prefix.
        conv: structure of ``Conv1d/2d/3d`` weights (``"filter"``, ``"channel"``, ``"element"``
            or None to leave them uncoupled).
        linear: structure of ``Linear`` weights.
        norm: structure of the scales (affine weights) of batch norms: ``"element"`` couples
            each channel's scale γ_c as a group of its own (the quantity network slimming ranks
            channels by; unlike a filter's norm behind a batch norm, the loss is not invariant
            to it), with their shifts uncoupled; ``"affine"`` couples each channel's scale and
            shift (γ_c, β_c) as one group (a ``"tied"`` param group per batch norm), so that an
            unselected channel is pulled to zero output, not to a constant β_c; None leaves them
            uncoupled. Other norms stay uncoupled (a layer or group norm's channels are no
            filters that could be removed).
        exclude: glob patterns (``fnmatch``, case-sensitive) matched against module names
            (``"features.0"``, ``"fc*"``) and parameter names (``"fc.weight"``); matching
            parameters stay uncoupled.
        weight_decay: if given, set on the groups of weights (coupled and uncoupled);
            otherwise they use the optimizer's default.
        norm_weight_decay: weight decay of the group of biases, normalisation parameters and
            other 1-D parameters (0 by default; None means the optimizer's default).

    Returns:
        A list of param-group dicts (empty groups omitted), each with ``"params"``,
        ``"param_names"`` and ``"structure"``, in this order: coupled conv weights, coupled
        linear weights, coupled norm scales (with ``norm_weight_decay``; under ``"affine"``
        one group per batch norm), other uncoupled
        weights, biases and normalisation parameters.
        Every parameter appears exactly once (shared parameters by their first name).

    Raises:
        ValueError: for an unknown structure, or for ``conv="channel"`` on a grouped or
            depthwise convolution that is not excluded (its ``W[:, j]`` slices are no input
            channels); the message names the layer.
    """
    for argument, structure in (("conv", conv), ("linear", linear)):
        if structure not in STRUCTURES:
            raise ValueError(
                f"invalid {argument}: {structure!r} (expected 'filter', 'channel', 'element' or "
                "None)"
            )
    if norm not in NORM_STRUCTURES:
        raise ValueError(f"invalid norm: {norm!r} (expected 'element', 'affine' or None)")
    buckets: dict[str, list[tuple[str, nn.Parameter]]] = {
        "conv": [],
        "linear": [],
        "norm": [],
        "other": [],
        "no_decay": [],
    }
    # Patterns and names refer to the user's model, not to a DDP / DataParallel wrapper.
    model = unwrap_model(model)
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            # Any other wrapper that keeps the model under ``.module`` is matched without it too.
            names = {module_name, full_name}
            names |= {n.removeprefix("module.") for n in names}
            excluded = any(fnmatchcase(n, pattern) for n in names for pattern in exclude)
            is_weight = param_name == "weight" and not excluded
            if is_weight and isinstance(module, _CONV_TYPES) and conv is not None:
                if conv == "channel":
                    _check_channel_groups(module_name, module)
                buckets["conv"].append((full_name, param))
            elif is_weight and isinstance(module, nn.Linear) and linear is not None:
                buckets["linear"].append((full_name, param))
            elif _coupled_norm_param(module, param_name, param, norm) and not excluded:
                buckets["norm"].append((full_name, param))
            elif param.dim() <= 1 or isinstance(module, NORM_TYPES):
                buckets["no_decay"].append((full_name, param))
            else:
                buckets["other"].append((full_name, param))

    structures = {"conv": conv, "linear": linear, "norm": norm, "other": None, "no_decay": None}
    groups: list[dict[str, Any]] = []
    for key, members in _split_affine(buckets, norm).items():
        if not members:
            continue
        group: dict[str, Any] = {
            "params": [p for _, p in members],
            "param_names": [n for n, _ in members],
            "structure": "tied" if key.startswith("affine:") else structures[key],
        }
        decay = norm_weight_decay if key in ("norm", "no_decay") or key.startswith("affine:") \
            else weight_decay
        if decay is not None:
            group["weight_decay"] = decay
        groups.append(group)
    return groups


def _coupled_norm_param(module: nn.Module, param_name: str, param: nn.Parameter,
                        norm: str | None) -> bool:
    """Whether ``norm`` couples this parameter: a batch norm's scale, and under ``"affine"``
    its shift too."""
    if norm is None or not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False
    roles = ("weight", "bias") if norm == "affine" else ("weight",)
    return param_name in roles and param.dim() == 1


def _split_affine(buckets: dict[str, list[tuple[str, nn.Parameter]]], norm: str | None
                  ) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Under ``norm="affine"``, the coupled norm parameters as one bucket per batch norm
    (``"affine:<module>"``, its scale and shift: one tied group per channel); else as given."""
    if norm != "affine":
        return buckets
    out: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for key, members in buckets.items():
        if key != "norm":
            out[key] = members
            continue
        for name, param in members:
            out.setdefault(f"affine:{name.rpartition('.')[0]}", []).append((name, param))
    return out


def distinct_group_names(names: Iterable[str]) -> list[str]:
    """``names`` of coupled tensors without the batch-norm shifts whose scale is among them:
    under ``norm="affine"`` a channel's group spans its scale and its shift, so counting or
    ordering the groups of both would count each channel twice. :func:`structured_param_groups`
    couples no other bias, so a ``.bias`` recorded next to its ``.weight`` is such a shift; a
    hand-written param group that couples a layer's bias with its weight is read the same way."""
    names = list(names)
    present = set(names)
    return [n for n in names
            if not (n.endswith(".bias") and f"{n.removesuffix('.bias')}.weight" in present)]
