"""The DessiLBI optimizer: SGD on the weights W, an inverse scale space on their twin Γ.

The class and the functional dispatcher :func:`dessilbi` live here; the step itself is in
:mod:`dessilbi.optim.functional` (eager) and :mod:`dessilbi.optim.fused` (compiled).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from dessilbi.optim.functional import multi_tensor_dessilbi, single_tensor_dessilbi
from dessilbi.optim.fused import fused_dessilbi
from dessilbi.optim.proximal import GROUP_SCALINGS, STRUCTURES, check_structure

__all__ = ["DessiLBI", "NonFiniteGradientError", "dessilbi"]

_NONFINITE_POLICIES = ("raise", "skip")
# The per-parameter state tensors, all of the parameter's shape.
_STATE_TENSORS = ("v", "gamma", "momentum_buffer")


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or Inf; the optimizer refused the step and changed nothing."""


class DessiLBI(Optimizer):
    r"""Deep structurally splitting linearized Bregman iteration (Fu et al., TPAMI 2022).

    Every coupled weight tensor ``W`` gets a structure parameter ``Γ`` of the same shape, tied to
    it by ``‖W − Γ‖² / (2ν)``. ``W`` follows (momentum) SGD on ``L(W) + ‖W − Γ‖²/(2ν)``; ``Γ``
    follows a linearised Bregman iteration: it starts at exactly zero and groups enter its support
    one after another, the most important first. ``W ⊙ 1[Γ ≠ 0]`` is the sparse network.

    One step, for a coupled parameter (``structure`` not None), with ``g`` in ``W.grad``::

        g  = g + weight_decay · W_k                            (if weight_decay > 0)
        b  = momentum · b + (1 − dampening) · g                (first step: b = g)
        d  = g + momentum · b   if nesterov   else   b         (d = g if momentum = 0)
        W_{k+1} = W_k − κ·lr·( d + (W_k − Γ_k) / ν )
        V_{k+1} = V_k + (lr / ν) · (W_k − Γ_k)
        Γ_{k+1} = κ · prox_{λΩ}( V_{k+1} )

    An uncoupled parameter (``structure=None``: biases, norm layers, anything excluded) takes
    ``W_{k+1} = W_k − κ·lr·d``: plain SGD at step ``κ·lr``. Momentum acts on the loss gradient
    only; ``V`` never sees it. The proximal maps (``λ_g = lam``, or ``lam·sqrt(group size)`` under
    ``group_scaling="sqrt_size"``):

    - ``"element"``: ``sign(V)·max(|V| − λ, 0)`` (lasso);
    - ``"filter"`` / ``"channel"``: ``max(0, 1 − λ_g/‖V_g‖)·V_g`` over the groups ``V[i, ...]`` /
      ``V[:, j, ...]`` (group lasso), exactly zero when ``‖V_g‖ ≤ λ_g``;
    - ``"tied"``: as ``"filter"``, with group ``i`` the filters ``V_t[i, ...]`` of every tensor
      ``t`` of the param group together (one norm; all tensors need the same number of filters,
      and a group steps all its tensors or none); 1-D tensors too, such as a batch norm's scale
      and shift (``structured_param_groups(norm="affine")``).

    State per parameter: ``"momentum_buffer"`` (when momentum > 0), and for coupled parameters
    ``"v"`` (V) and ``"gamma"`` (Γ), all tensors, so ``state_dict()`` restores a run exactly;
    :meth:`load_state_dict` refuses a state saved for other param groups or parameters.
    Parameters whose ``grad`` is None are skipped entirely, as in ``torch.optim.SGD``.

    Non-finite gradients: before anything is changed, every step checks that all gradients are
    finite. With ``nonfinite="raise"`` (default) it raises :class:`NonFiniteGradientError` and
    leaves parameters and state untouched; with ``nonfinite="skip"`` it warns and skips the step
    (useful with mixed precision, where an occasional overflow is expected).

    Performance note: on CPU, train the bare optimizer inside ``with dessilbi.flush_denormal():``
    or call ``dessilbi.set_flush_denormal(True)`` first (:func:`dessilbi.train.train` does this
    itself; ``torch.set_flush_denormal`` alone reaches only the calling thread, not torch's
    intra-op threads that already exist). Γ stays exactly zero on the
    groups that have not been selected, and the coupling pulls their weights towards it by a
    factor of about ``1 − κ·lr/ν`` per step. Over thousands of steps those weights decay
    geometrically into the float32 subnormal range (below about 1.2e-38). Many CPUs, x86 in
    particular, handle subnormal operands in a slow microcode path, tens of times slower per
    operation. This slows the optimizer step and the forward and backward passes through those
    weights. Flushing subnormals to zero loses nothing that matters, because these weights are
    zero in the sparse network ``W ⊙ 1[Γ ≠ 0]`` anyway. The setting changes only the CPU's
    floating-point mode and does nothing on GPUs.

    Args:
        params: parameters or param groups; :func:`dessilbi.structured_param_groups` builds groups
            with the right structure per layer type.
        lr: step size α (> 0).
        kappa: damping κ (> 0); ``Γ = κ·prox(V)`` and the W step is scaled by κ.
        nu: coupling strength ν (> 0); larger ν gives a sparser Γ at a given time.
        lam: sparsity threshold λ (≥ 0).
        momentum: heavy-ball momentum on the loss gradient, in [0, 1).
        dampening: dampening of the momentum, in [0, 1].
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        weight_decay: L2 penalty added to the loss gradient (≥ 0).
        structure: ``None``, ``"element"``, ``"filter"``, ``"channel"`` or ``"tied"`` (default
            for groups that don't set it).
        group_scaling: ``"none"`` or ``"sqrt_size"``.
        foreach: use the multi-tensor path (default when None); False selects the per-tensor
            path, which reads like the algorithm above.
        fused: compile the step of each coupled group into fused kernels with ``torch.compile``
            (see :mod:`dessilbi.optim.fused`): fewer passes over memory, at a one-time compile
            cost of seconds to a minute per group signature; falls back to the foreach path with
            a warning where compiling fails. Off by default.
        nonfinite: ``"raise"`` or ``"skip"``; see above.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        kappa: float = 1.0,
        nu: float = 100.0,
        lam: float = 1.0,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        structure: str | None = "element",
        group_scaling: str = "none",
        *,
        foreach: bool | None = None,
        fused: bool = False,
        nonfinite: str = "raise",
    ) -> None:
        if nonfinite not in _NONFINITE_POLICIES:
            raise ValueError(
                f"invalid nonfinite: {nonfinite!r} (expected 'raise' or 'skip')"
            )
        self.nonfinite = nonfinite
        defaults = {
            "lr": lr,
            "kappa": kappa,
            "nu": nu,
            "lam": lam,
            "momentum": momentum,
            "dampening": dampening,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "structure": structure,
            "group_scaling": group_scaling,
            "foreach": foreach,
            "fused": fused,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, validating its hyperparameters (``ValueError`` names the bad one)."""
        super().add_param_group(param_group)
        try:
            _validate_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`, refusing one saved for other parameters.

        ``torch.optim.Optimizer.load_state_dict`` assigns the saved state by position alone: a
        checkpoint loaded into reordered groups, or groups listing their parameters in another
        order, would silently hand one tensor's V, Γ and momentum buffer to another of the same
        shape. Before anything is loaded this checks that the saved param groups match the
        current ones: the same number of groups and of parameters per group, the same
        ``structure`` per group, the same ``param_names`` in the same order where both sides
        carry them (as the groups of :func:`dessilbi.structured_param_groups` do, and torch
        saves them), and every saved ``"v"``, ``"gamma"`` and ``"momentum_buffer"`` of the shape
        of the parameter it goes to. A mismatch raises ``ValueError`` naming the group and
        parameter, and nothing changes. As in torch, the saved hyperparameters replace the
        current ones, and load-state-dict pre-hooks run first (so a hook can still remap a
        checkpoint); the check sees their result.
        """
        hooks = self._optimizer_load_state_dict_pre_hooks
        state_dict = state_dict.copy()  # shallow, as torch does: hooks may edit their copy
        for hook in hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        _check_loadable(self.param_groups, state_dict)
        # The hooks have run; torch's implementation must not run them a second time.
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = hooks

    def _gather(
        self, group: dict[str, Any]
    ) -> tuple[
        list[torch.Tensor],
        list[torch.Tensor],
        list[torch.Tensor | None],
        list[torch.Tensor],
        list[torch.Tensor],
    ]:
        """Parameters with a gradient, their gradients and state, creating state lazily."""
        coupled = group["structure"] is not None
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        buffers: list[torch.Tensor | None] = []
        vs: list[torch.Tensor] = []
        gammas: list[torch.Tensor] = []
        tied = group["structure"] == "tied"
        for p in group["params"]:
            if p.grad is None:
                if tied and any(q.grad is not None for q in group["params"]):
                    raise ValueError(
                        "a 'tied' param group steps all its tensors together (one norm per "
                        "filter across them), but one of them has no gradient; leave the "
                        "whole group out, or tie only tensors that all get gradients"
                    )
                continue
            if p.grad.is_sparse:
                raise RuntimeError("DessiLBI does not support sparse gradients")
            state = self.state[p]
            params.append(p)
            grads.append(p.grad)
            buffers.append(state.get("momentum_buffer"))
            if coupled:
                if "v" not in state:
                    state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["gamma"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                vs.append(state["v"])
                gammas.append(state["gamma"])
        return params, grads, buffers, vs, gammas

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one DessiLBI step (optionally re-evaluating the loss with ``closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Checked before any state is created or changed, so a refused step leaves no trace.
        culprits = _nonfinite_gradients(
            [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        )
        if culprits:
            where = _describe(self.param_groups, culprits)
            if self.nonfinite == "raise":
                raise NonFiniteGradientError(
                    f"non-finite gradient (NaN or Inf) in {where}; the step was refused and "
                    "weights, V and Gamma are unchanged. Lower the learning rate or nu, or pass "
                    "nonfinite='skip' to skip such steps."
                )
            warnings.warn(
                f"DessiLBI skipped a step: non-finite gradient in {where}",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss

        for group in self.param_groups:
            params, grads, buffers, vs, gammas = self._gather(group)
            dessilbi(
                params,
                grads,
                buffers,
                vs,
                gammas,
                lr=group["lr"],
                kappa=group["kappa"],
                nu=group["nu"],
                lam=group["lam"],
                momentum=group["momentum"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                weight_decay=group["weight_decay"],
                structure=group["structure"],
                group_scaling=group["group_scaling"],
                foreach=group["foreach"],
                fused=group.get("fused", False),
            )
            if group["momentum"] != 0:
                for p, buffer in zip(params, buffers, strict=True):
                    self.state[p]["momentum_buffer"] = buffer
        return loss


def _validate_group(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter of a param group."""

    def bad(name: str, rule: str) -> ValueError:
        return ValueError(f"invalid {name}: {group[name]!r} ({rule})")

    if not group["lr"] > 0:
        raise bad("lr", "must be > 0")
    if not group["kappa"] > 0:
        raise bad("kappa", "must be > 0")
    if not group["nu"] > 0:
        raise bad("nu", "must be > 0")
    if not group["lam"] >= 0:
        raise bad("lam", "must be >= 0")
    if not 0 <= group["momentum"] < 1:
        raise bad("momentum", "must be in [0, 1)")
    if not 0 <= group["dampening"] <= 1:
        raise bad("dampening", "must be in [0, 1]")
    if not group["weight_decay"] >= 0:
        raise bad("weight_decay", "must be >= 0")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise bad("nesterov", "Nesterov momentum needs momentum > 0 and dampening = 0")
    if group["structure"] not in STRUCTURES:
        raise bad("structure", f"expected one of {STRUCTURES}")
    if group["group_scaling"] not in GROUP_SCALINGS:
        raise bad("group_scaling", f"expected one of {GROUP_SCALINGS}")
    for p in group["params"]:
        check_structure(group["structure"], p.shape)
    if group["structure"] == "tied" and len({p.shape[0] for p in group["params"]}) > 1:
        shapes = [tuple(p.shape) for p in group["params"]]
        raise bad("structure", f"'tied' needs the same number of filters in every tensor, got "
                  f"shapes {shapes}")


def _check_loadable(groups: list[dict[str, Any]], state_dict: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``state_dict`` was saved for param groups like ``groups``."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"cannot load the optimizer state: it was saved with {len(saved_groups)} param "
            f"groups, this optimizer has {len(groups)}; nothing was loaded"
        )
    saved_state = state_dict.get("state", {})
    for gi, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        _check_group_loadable(gi, group, saved, saved_state)


def _check_group_loadable(
    gi: int, group: dict[str, Any], saved: dict[str, Any], saved_state: dict[Any, Any]
) -> None:
    """The checks of :meth:`DessiLBI.load_state_dict` for param group ``gi``."""
    params, ids = group["params"], saved["params"]
    names, saved_names = group.get("param_names"), saved.get("param_names")
    if len(ids) != len(params):
        raise ValueError(
            f"cannot load the optimizer state: param group {gi} holds {len(params)} "
            f"parameters, the saved group {len(ids)}; nothing was loaded"
        )

    def label(pi: int) -> str:
        name = f"{names[pi]!r} " if names is not None and pi < len(names) else ""
        return f"parameter {name}(group {gi}, index {pi})"

    if names is not None and saved_names is not None:
        for pi in range(len(params)):
            saved_name = saved_names[pi] if pi < len(saved_names) else None
            if pi >= len(names) or names[pi] != saved_name:
                raise ValueError(
                    f"cannot load the optimizer state: the state for {label(pi)} was saved for "
                    f"{saved_name!r}; the param groups must list the same parameters in the "
                    "same order as when it was saved. Nothing was loaded"
                )
    if "structure" not in saved or saved["structure"] != group["structure"]:
        what = repr(saved["structure"]) if "structure" in saved else "none (not a DessiLBI state)"
        raise ValueError(
            f"cannot load the optimizer state: param group {gi} has structure "
            f"{group['structure']!r}, the saved group {what}; nothing was loaded"
        )
    for pi, (p, pid) in enumerate(zip(params, ids, strict=True)):
        state = saved_state.get(pid)
        if not isinstance(state, dict):
            continue
        for key in _STATE_TENSORS:
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.shape != p.shape:
                raise ValueError(
                    f"cannot load the optimizer state: the saved {key!r} of {label(pi)} has "
                    f"shape {tuple(value.shape)}, the parameter has shape {tuple(p.shape)}; "
                    "nothing was loaded"
                )


def _nonfinite_gradients(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients holding NaN or Inf (empty in the common case, found in one cheap pass)."""
    if not grads:
        return []
    # A sum is NaN or Inf when any entry is: one read-only reduction per tensor, far cheaper
    # than isfinite().all(). Low-precision gradients are summed in float32 so that a large but
    # finite half-precision gradient does not overflow.
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        acc = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else None
        by_device.setdefault(g.device, []).append(g.sum(dtype=acc))
    if all(bool(torch.stack(sums).isfinite().all()) for sums in by_device.values()):
        return []
    # Rare path: name the culprits exactly (a finite sum can also overflow; recheck per entry).
    return [g for g in grads if not bool(torch.isfinite(g).all())]


def _describe(groups: list[dict[str, Any]], culprits: list[torch.Tensor]) -> str:
    bad = {id(g) for g in culprits}
    places = [
        f"param group {gi} parameter {pi} (shape {tuple(p.shape)})"
        for gi, group in enumerate(groups)
        for pi, p in enumerate(group["params"])
        if p.grad is not None and id(p.grad) in bad
    ]
    return ", ".join(places[:5]) + (f" and {len(places) - 5} more" if len(places) > 5 else "")


def dessilbi(
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
    foreach: bool | None = None,
    fused: bool = False,
) -> None:
    """Functional DessiLBI step over one param group (see :class:`DessiLBI` for the algorithm).

    Updates ``params``, ``vs`` and ``gammas`` in place. ``momentum_buffers`` holds None for a
    parameter on its first step; the new buffers are written back into the list. ``vs`` and
    ``gammas`` are ignored (may be empty) when ``structure`` is None; parameters whose
    gradient is None must be left out. ``fused`` selects the compiled path
    (:func:`dessilbi.optim.fused.fused_dessilbi`), ``foreach=False`` the per-tensor one
    (:func:`dessilbi.optim.functional.single_tensor_dessilbi`), else the multi-tensor path
    (:func:`dessilbi.optim.functional.multi_tensor_dessilbi`) is used.

    This dispatcher lives here, above both :mod:`~dessilbi.optim.functional` and
    :mod:`~dessilbi.optim.fused`, so that the imports of the package go one way only.
    """
    if foreach is None:
        foreach = not torch.jit.is_scripting()
    impl: Callable[..., None] = (
        fused_dessilbi
        if fused
        else multi_tensor_dessilbi
        if foreach
        else single_tensor_dessilbi
    )
    impl(
        params,
        grads,
        momentum_buffers,
        vs,
        gammas,
        lr=lr,
        kappa=kappa,
        nu=nu,
        lam=lam,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        structure=structure,
        group_scaling=group_scaling,
    )

