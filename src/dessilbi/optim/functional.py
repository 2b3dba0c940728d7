"""The eager DessiLBI step over one param group: a per-tensor and a multi-tensor implementation.

Both functions take the same arguments and have the same effects (see :class:`dessilbi.DessiLBI`
for the algorithm):

- :func:`single_tensor_dessilbi` loops over the tensors one by one and reads like the equations;
- :func:`multi_tensor_dessilbi` applies each equation to a whole bucket (same device and dtype)
  with ``torch._foreach_*`` ops, in an order that spends no pass over memory on temporaries.

``params``, ``vs`` and ``gammas`` are updated in place. ``momentum_buffers`` holds None for a
parameter on its first step (then ``b = g``) and receives the new buffers; existing buffers are
updated in place. ``vs`` and ``gammas`` are ignored (may be empty) when ``structure`` is None.
Every parameter passed must have a gradient: the caller leaves out those whose ``grad`` is None.

Imports go one way, so that nothing here can form a cycle::

    proximal  <-  functional  <-  fused  <-  optimizer (the dispatcher ``dessilbi`` and the class)
"""

from __future__ import annotations

import math
from typing import cast

import torch

from dessilbi.optim.proximal import group_size, group_threshold, prox, tied_prox

__all__ = ["momentum_update", "multi_tensor_dessilbi", "single_tensor_dessilbi"]


def single_tensor_dessilbi(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor | None],
    vs: list[torch.Tensor],
    gammas: list[torch.Tensor],
    *,
    lr: float,
    kappa: float,
    nu: float,
    lam: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    structure: str | None,
    group_scaling: str,
) -> None:
    """One DessiLBI step over a param group, one tensor at a time (see the module docstring)."""
    for i, w in enumerate(params):
        g = grads[i]
        if weight_decay != 0:
            g = g.add(w, alpha=weight_decay)
        if momentum != 0:
            b = momentum_buffers[i]
            if b is None:
                b = torch.clone(g).detach()
                momentum_buffers[i] = b
            else:
                b.mul_(momentum).add_(g, alpha=1 - dampening)
            d = g.add(b, alpha=momentum) if nesterov else b
        else:
            d = g
        if structure is None:
            w.add_(d, alpha=-kappa * lr)
            continue
        v, gamma = vs[i], gammas[i]
        coupling = w - gamma  # W_k − Γ_k, taken before W moves
        w.add_(d + coupling / nu, alpha=-kappa * lr)
        v.add_(coupling, alpha=lr / nu)
        if structure != "tied":
            lam_g = group_threshold(lam, structure, w.shape, group_scaling)
            prox(v, structure, lam_g, kappa, out=gamma)
    if structure == "tied":
        _tied_gamma(params, vs, gammas, lam, kappa, group_scaling)


def multi_tensor_dessilbi(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor | None],
    vs: list[torch.Tensor],
    gammas: list[torch.Tensor],
    *,
    lr: float,
    kappa: float,
    nu: float,
    lam: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    structure: str | None,
    group_scaling: str,
) -> None:
    """One DessiLBI step over a param group with foreach ops, bucketed by device and dtype."""
    coupled = structure is not None
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)

    for idx in buckets.values():
        ws = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        # The update is ordered so that no tensor pass is spent on temporaries: everything that
        # needs W_k and Γ_k (the V update, weight decay, the coupling pull on W) runs before the
        # loss-gradient step moves W, and Γ is recomputed from V last.
        if coupled:
            v_b = [vs[i] for i in idx]
            gamma_b = [gammas[i] for i in idx]
            torch._foreach_add_(v_b, ws, alpha=lr / nu)
            torch._foreach_add_(v_b, gamma_b, alpha=-lr / nu)
        if weight_decay != 0:
            gs = cast(list[torch.Tensor], torch._foreach_add(gs, ws, alpha=weight_decay))
        if coupled:
            # W − (κ·lr/ν)(W − Γ), in one pass.
            torch._foreach_lerp_(ws, gamma_b, kappa * lr / nu)
        if momentum == 0:
            torch._foreach_add_(ws, gs, alpha=-kappa * lr)
        else:
            bufs = momentum_update(
                [momentum_buffers[i] for i in idx], gs, momentum=momentum, dampening=dampening
            )
            for i, b in zip(idx, bufs, strict=True):
                momentum_buffers[i] = b
            d = torch._foreach_add(gs, bufs, alpha=momentum) if nesterov else bufs
            torch._foreach_add_(ws, d, alpha=-kappa * lr)
        if coupled and structure != "tied":
            for w, v, gamma in zip(ws, v_b, gamma_b, strict=True):
                lam_g = group_threshold(lam, structure, w.shape, group_scaling)
                prox(v, cast(str, structure), lam_g, kappa, out=gamma)
    if structure == "tied":  # one norm across the tensors: after every V has moved
        _tied_gamma(params, vs, gammas, lam, kappa, group_scaling)


def _tied_gamma(params: list[torch.Tensor], vs: list[torch.Tensor], gammas: list[torch.Tensor],
                lam: float, kappa: float, group_scaling: str) -> None:
    """Γ of a ``"tied"`` group: one group lasso over filter ``i`` of every tensor, λ_g scaled
    by the size of the joint group under ``"sqrt_size"``."""
    size = sum(group_size("tied", w.shape) for w in params)
    lam_g = lam * math.sqrt(size) if group_scaling == "sqrt_size" else lam
    tied_prox(vs, lam_g, kappa, gammas)


def momentum_update(
    buffers: list[torch.Tensor | None],
    grads: list[torch.Tensor],
    *,
    momentum: float,
    dampening: float,
) -> list[torch.Tensor]:
    """``b = momentum·b + (1 − dampening)·g`` over a bucket; ``b = g`` for a fresh buffer.

    Existing buffers are updated in place; the returned list holds them and the new ones, in the
    order of ``buffers``.
    """
    old = [j for j, b in enumerate(buffers) if b is not None]
    if old:
        old_bufs = [cast(torch.Tensor, buffers[j]) for j in old]
        torch._foreach_mul_(old_bufs, momentum)
        torch._foreach_add_(old_bufs, [grads[j] for j in old], alpha=1 - dampening)
    return [
        b if b is not None else torch.clone(g).detach()
        for b, g in zip(buffers, grads, strict=True)
    ]
