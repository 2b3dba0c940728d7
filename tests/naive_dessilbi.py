"""A slow, literal DessiLBI written straight from DESIGN.md section 1: the test oracle.

Nothing here is shared with ``dessilbi.optim``: the proximal maps loop over the groups one by
one, and the step is one plain Python loop over the parameters, in the order the design notes
write the equations. It is meant to be obviously right, not fast.

Usage::

    oracle = NaiveDessiLBI([{"params": [w1, w2], "structure": "filter", "lr": 0.1, ...}, ...])
    ...compute w1.grad, w2.grad...
    oracle.step()

The oracle updates the given tensors in place (under ``torch.no_grad``) and keeps its state in
``oracle.state[param] = {"v": ..., "gamma": ..., "momentum_buffer": ...}``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

DEFAULTS: dict[str, Any] = {
    "lr": 0.1,
    "kappa": 1.0,
    "nu": 100.0,
    "lam": 1.0,
    "momentum": 0.0,
    "dampening": 0.0,
    "nesterov": False,
    "weight_decay": 0.0,
    "structure": "element",
    "group_scaling": "none",
}


def naive_group_size(structure: str, shape: tuple[int, ...]) -> int:
    """Entries per group: 1 for elements; all entries of ``t[i, ...]`` / ``t[:, j, ...]``."""
    if structure == "element":
        return 1
    axis = 0 if structure in ("filter", "tied") else 1
    return math.prod(shape) // shape[axis]


def naive_threshold(lam: float, structure: str, shape: tuple[int, ...], scaling: str) -> float:
    """λ_g = λ, or λ·sqrt(group size) under ``"sqrt_size"``."""
    if scaling == "sqrt_size":
        return lam * math.sqrt(naive_group_size(structure, shape))
    return lam


def naive_prox(v: torch.Tensor, structure: str, lam_g: float, kappa: float = 1.0) -> torch.Tensor:
    """``kappa * prox_{λΩ}(v)``, one group at a time.

    element: ``sign(v)·max(|v| − λ, 0)``; group: ``max(0, 1 − λ_g/‖v_g‖)·v_g``, and exactly 0
    when ``‖v_g‖ ≤ λ_g``.
    """
    if structure == "element":
        return kappa * torch.sign(v) * torch.clamp(v.abs() - lam_g, min=0.0)
    axis = 0 if structure == "filter" else 1
    out = torch.zeros_like(v)
    for i in range(v.shape[axis]):
        v_g = v.select(axis, i)
        norm = math.sqrt(float((v_g * v_g).sum()))
        if norm <= lam_g:
            continue  # the whole group stays exactly zero
        out.select(axis, i).copy_(kappa * (1.0 - lam_g / norm) * v_g)
    return out


def naive_tied_prox(vs: list[torch.Tensor], lam: float, kappa: float, scaling: str
                    ) -> list[torch.Tensor]:
    """The group lasso whose group ``i`` is filter ``i`` of every tensor in ``vs`` together:
    one norm over all their entries, one factor for all of them."""
    size = sum(naive_group_size("tied", tuple(v.shape)) for v in vs)
    lam_g = lam * math.sqrt(size) if scaling == "sqrt_size" else lam
    outs = [torch.zeros_like(v) for v in vs]
    for i in range(vs[0].shape[0]):
        norm = math.sqrt(sum(float((v[i] * v[i]).sum()) for v in vs))
        if norm <= lam_g:
            continue  # filter i stays exactly zero in every tensor
        for v, out in zip(vs, outs, strict=True):
            out[i].copy_(kappa * (1.0 - lam_g / norm) * v[i])
    return outs


class NaiveDessiLBI:
    """The DessiLBI step of DESIGN.md section 1, one parameter at a time."""

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        self.param_groups = []
        for group in groups:
            full = dict(DEFAULTS)
            full.update(group)
            full["params"] = list(group["params"])
            self.param_groups.append(full)
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr = group["lr"]
            kappa = group["kappa"]
            nu = group["nu"]
            momentum = group["momentum"]
            structure = group["structure"]
            for w in group["params"]:
                if w.grad is None:
                    continue  # parameters without a gradient are skipped entirely
                state = self.state.setdefault(w, {})
                g = w.grad.clone()
                if group["weight_decay"] > 0:
                    g = g + group["weight_decay"] * w
                if momentum > 0:
                    if "momentum_buffer" not in state:
                        b = g.clone()  # first step: b = g
                    else:
                        b = momentum * state["momentum_buffer"] + (1 - group["dampening"]) * g
                    state["momentum_buffer"] = b
                    d = g + momentum * b if group["nesterov"] else b
                else:
                    d = g
                if structure is None:
                    w.copy_(w - kappa * lr * d)
                    continue
                if "v" not in state:
                    state["v"] = torch.zeros_like(w)
                    state["gamma"] = torch.zeros_like(w)
                w_old = w.clone()
                gamma_old = state["gamma"]
                w.copy_(w_old - kappa * lr * (d + (w_old - gamma_old) / nu))
                state["v"] = state["v"] + (lr / nu) * (w_old - gamma_old)
                if structure == "tied":
                    continue  # Γ after every V of the group has moved
                lam_g = naive_threshold(
                    group["lam"], structure, tuple(w.shape), group["group_scaling"]
                )
                state["gamma"] = naive_prox(state["v"], structure, lam_g, kappa)
            if structure == "tied" and any(w.grad is not None for w in group["params"]):
                tied = [w for w in group["params"] if w.grad is not None]
                gammas = naive_tied_prox([self.state[w]["v"] for w in tied], group["lam"],
                                         kappa, group["group_scaling"])
                for w, gamma in zip(tied, gammas, strict=True):
                    self.state[w]["gamma"] = gamma
