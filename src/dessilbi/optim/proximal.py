"""Proximal maps of the sparsity penalties and the group geometry they share.

A *structure* says how a weight tensor is cut into groups:

- ``"element"``: every entry is its own group (lasso).
- ``"filter"``: group ``i`` is the slice ``t[i, ...]`` (a conv output filter, a linear output
  neuron); the group lasso over dim 0.
- ``"channel"``: group ``j`` is the slice ``t[:, j, ...]`` (a conv input channel, a linear input
  feature); the group lasso over dim 1.
- ``"tied"``: filters tied across the tensors of one param group (layers whose output channels
  a residual addition joins): group ``i`` is the union of the slices ``t[i, ...]`` of every
  tensor in the group, with one norm ``sqrt(Σ_t ‖t[i, ...]‖²)`` (:func:`tied_prox`), so Γ
  zeroes filter ``i`` in all of them at once. Read per tensor it is ``"filter"``. The tensors
  may be 1-D: a batch norm's scale and shift, group ``i`` their entries ``i``.
- ``None``: the tensor is not coupled to a structure parameter at all.

The same helpers serve the optimizer (to compute Γ) and the path read-outs (to report which groups
are selected), so both always agree on what a group is.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "FILTER_STRUCTURES",
    "GROUP_SCALINGS",
    "STRUCTURES",
    "check_structure",
    "group_axis",
    "group_norms",
    "group_size",
    "group_threshold",
    "prox",
    "selects_channels",
    "tied_prox",
]

STRUCTURES: tuple[str | None, ...] = (None, "element", "filter", "channel", "tied")
#: The structures whose groups are output filters (of one tensor, or tied across tensors).
FILTER_STRUCTURES: tuple[str, ...] = ("filter", "tied")
GROUP_SCALINGS: tuple[str, ...] = ("none", "sqrt_size")


def selects_channels(structure: str | None, dim: int) -> bool:
    """Whether Γ on a tensor of ``dim`` dimensions with ``structure`` selects output channels:
    the filter structures, and single-entry groups of a 1-D tensor (a norm layer's scales)."""
    return structure in FILTER_STRUCTURES or (structure == "element" and dim == 1)


def check_structure(structure: str | None, shape: torch.Size | tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless ``structure`` is known and fits a tensor of ``shape``."""
    if structure not in STRUCTURES:
        raise ValueError(
            f"invalid structure: {structure!r} (expected 'filter', 'channel', 'element', 'tied' "
            "or None)"
        )
    # A tied group may join 1-D tensors (a batch norm's scale and shift, entry i of each).
    if structure == "tied" and len(shape) < 1:
        raise ValueError(f"invalid structure: 'tied' needs a tensor with at least 1 dimension, "
                         f"got shape {tuple(shape)}")
    if structure in ("filter", "channel") and len(shape) < 2:
        raise ValueError(
            f"invalid structure: {structure!r} needs a tensor with at least 2 dimensions, "
            f"got shape {tuple(shape)}; use 'element' or None for 1-D tensors"
        )


def group_axis(structure: str) -> int:
    """The dimension that indexes the groups of a group structure."""
    if structure in ("filter", "tied"):
        return 0
    if structure == "channel":
        return 1
    raise ValueError(f"{structure!r} is not a group structure")


def _reduce_dims(structure: str, ndim: int) -> tuple[int, ...]:
    axis = group_axis(structure)
    return tuple(d for d in range(ndim) if d != axis)


def _norms(t: torch.Tensor, structure: str, keepdim: bool = False) -> torch.Tensor:
    """Euclidean norm of every group of ``t`` under a group structure; for a 1-D tensor of a
    tied group, ``|t|`` (``vector_norm`` would read ``dim=()`` as every dimension)."""
    if t.dim() == 1:
        return t.abs()
    return torch.linalg.vector_norm(t, dim=_reduce_dims(structure, t.dim()), keepdim=keepdim)


def group_size(structure: str | None, shape: torch.Size | tuple[int, ...]) -> int:
    """Number of entries in one group (1 for ``"element"``)."""
    if structure in (None, "element"):
        return 1
    return math.prod(shape) // shape[group_axis(structure)]


def group_threshold(
    lam: float, structure: str | None, shape: torch.Size | tuple[int, ...], group_scaling: str
) -> float:
    """λ_g: ``lam`` itself, or ``lam * sqrt(group size)`` under ``group_scaling="sqrt_size"``."""
    if group_scaling == "sqrt_size":
        return lam * math.sqrt(group_size(structure, shape))
    return lam


def group_norms(t: torch.Tensor, structure: str) -> torch.Tensor:
    """Euclidean norm of every group of ``t`` as a 1-D tensor (``|t|`` flattened for elements)."""
    if structure == "element":
        return t.detach().abs().flatten()
    return _norms(t.detach(), structure)


def prox(
    v: torch.Tensor,
    structure: str,
    lam_g: float,
    kappa: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``kappa * prox_{lam_g Ω}(v)``, written into ``out`` when given.

    - element: ``sign(v) * max(|v| - lam_g, 0)`` (soft thresholding);
    - groups:  ``max(0, 1 - lam_g / ||v_g||) * v_g``, exactly zero when ``||v_g|| <= lam_g``
      (also for all-zero groups: no division by zero).
    """
    if out is None:
        out = torch.empty_like(v)
    if structure == "element":
        # softshrink is soft thresholding in one fused pass: v - lam for v > lam, v + lam for
        # v < -lam, 0 otherwise; bitwise the same numbers as sign(v) * max(|v| - lam, 0).
        torch._C._nn.softshrink(v, lam_g, out=out)  # type: ignore[call-arg]
        if kappa != 1.0:
            out.mul_(kappa)
        return out
    if lam_g == 0.0:
        return torch.mul(v, kappa, out=out)
    norms = _norms(v, structure, keepdim=True)
    # factor = 1 - lam_g/||v_g|| written as (n - lam_g)/n with n = max(||v_g||, lam_g): exactly 0
    # for every group at or under the threshold (zero-norm groups included), and no division by
    # zero. (1 - lam_g/n is not exact: torch computes scalar/tensor as scalar * (1/n), and
    # lam_g * (1/lam_g) is often not 1 in floating point.)
    n = norms.clamp_min_(lam_g)
    factor = (n - lam_g).div_(n)
    if kappa != 1.0:
        factor.mul_(kappa)
    return torch.mul(v, factor, out=out)


def tied_prox(vs: list[torch.Tensor], lam_g: float, kappa: float,
              outs: list[torch.Tensor]) -> None:
    """``kappa * prox`` of the group lasso whose group ``i`` is ``{v[i, ...] for v in vs}``:
    every ``outs[t][i]`` is ``max(0, 1 − lam_g/n_i)·vs[t][i]`` with ``n_i² = Σ_t ‖vs[t][i]‖²``,
    exactly zero in all tensors when ``n_i ≤ lam_g``."""
    squares = sum(_norms(v, "tied").square() for v in vs)
    assert isinstance(squares, torch.Tensor)
    n = squares.sqrt().clamp_min_(lam_g) if lam_g > 0 else squares.sqrt()
    factor = (n - lam_g).div_(n) if lam_g > 0 else torch.ones_like(n)
    if kappa != 1.0:
        factor.mul_(kappa)
    for v, out in zip(vs, outs, strict=True):
        torch.mul(v, factor.view(-1, *[1] * (v.dim() - 1)), out=out)
