"""Which parameters of a model are coupled to a structure parameter, and how.

The decision is made from module types and parameter roles, never from hand-written layer-name
lists: convolution weights get the ``conv`` structure, linear weights the ``linear`` structure,
and biases and normalisation parameters stay uncoupled in a group of their own (so that weight
decay can be switched off for them, as the reference code did).
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from dessilbi.optim.proximal import check_structure

__all__ = ["NORM_TYPES", "structured_param_groups"]

_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: Module types whose parameters count as normalisation parameters (uncoupled, no decay).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*, lazy variants
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def structured_param_groups(
    model: nn.Module,
    conv: str | None = "filter",
    linear: str | None = "element",
    exclude: Sequence[str] = (),
    weight_decay: float | None = None,
    norm_weight_decay: float | None = 0.0,
) -> list[dict[str, Any]]:
    """Param groups for :class:`dessilbi.DessiLBI`, with the structure decided per layer type.

    Args:
        model: any ``nn.Module``; a DDP / DataParallel wrapper is looked through, so names and
            patterns never carry its ``module.`` prefix.
        conv: structure of ``Conv1d/2d/3d`` weights (``"filter"``, ``"channel"``, ``"element"``
            or None to leave them uncoupled).
        linear: structure of ``Linear`` weights.
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
        linear weights, other uncoupled weights, biases and normalisation parameters.
        Every parameter appears exactly once (shared parameters by their first name).
    """
    for structure in (conv, linear):
        if structure is not None:
            check_structure(structure, (2, 2))
    buckets: dict[str, list[tuple[str, nn.Parameter]]] = {
        "conv": [],
        "linear": [],
        "other": [],
        "no_decay": [],
    }
    # Patterns and names refer to the user's model, not to a DDP / DataParallel wrapper.
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
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
                buckets["conv"].append((full_name, param))
            elif is_weight and isinstance(module, nn.Linear) and linear is not None:
                buckets["linear"].append((full_name, param))
            elif param.dim() <= 1 or isinstance(module, NORM_TYPES):
                buckets["no_decay"].append((full_name, param))
            else:
                buckets["other"].append((full_name, param))

    structures = {"conv": conv, "linear": linear, "other": None, "no_decay": None}
    groups: list[dict[str, Any]] = []
    for key, members in buckets.items():
        if not members:
            continue
        group: dict[str, Any] = {
            "params": [p for _, p in members],
            "param_names": [n for n, _ in members],
            "structure": structures[key],
        }
        decay = norm_weight_decay if key == "no_decay" else weight_decay
        if decay is not None:
            group["weight_decay"] = decay
        groups.append(group)
    return groups
