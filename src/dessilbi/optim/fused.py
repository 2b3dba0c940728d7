"""A compiled, fused DessiLBI step: one generated kernel per coupled tensor.

On a CPU every eager torch op is a separate pass over memory, and the unfused DessiLBI step needs
16-19 of them per coupled tensor (weight decay, momentum, the W step, the V step, and the proximal
map that recomputes Γ from V) against 8 for momentum SGD. :func:`fused_dessilbi` hands the same
update to ``torch.compile`` (TorchInductor: generated C++/OpenMP loops on CPU, Triton kernels on
CUDA), which fuses it per tensor: under the element structure into one pointwise loop that reads
W, Γ, V, the gradient and the momentum buffer once and writes W, V, Γ and the buffer once; under
the group structures into a per-group reduction (‖V_g‖ of the new V, computed from W, Γ and V)
followed by that same loop.

The semantics are exactly those of :func:`dessilbi.optim.functional.multi_tensor_dessilbi`; see
:class:`dessilbi.DessiLBI` for the algorithm. Cases that gain nothing from compiling are handed
to that foreach path unchanged:

- a param group with ``structure=None`` (uncoupled: plain SGD at step ``κ·lr``, which the foreach
  path already does in torch SGD's number of passes);
- a step in which some momentum buffer is still None (the first step of a parameter: ``b = g``);
- every step on a device type where compiling failed once (no C++ compiler, an unsupported
  platform or Python version, ...): a single ``RuntimeWarning`` says so, and the failure is
  remembered so that later steps do not pay for another attempt.

Compilation and caching:

- One compiled callable per *signature*: device, dtype, the shapes of the parameters, whether
  momentum buffers are used, and every hyperparameter but the learning rate, which are
  compile-time constants of the generated code. The first step with a new signature compiles it,
  a one-time cost that grows with the number of tensors in the group: on a 2-core CPU (torch
  2.13) about 2-5 s for a handful of tensors, 12-20 s for VGG-16's two coupled groups and
  25-45 s for ResNet-56's group of 57 conv weights. Inductor's on-disk cache
  (``TORCHINDUCTOR_CACHE_DIR``) cuts this to 2-4 s in later processes. Every later step only
  runs the generated kernels.
- The learning rate changes over training (LR schedulers), so it enters the compiled function as
  a 0-d tensor (one per device and dtype, refilled when the value changes): a new ``lr`` never
  triggers a recompilation.
- Dynamo keeps the compiled variants of a function per *code object* and, past
  ``torch._dynamo.config.recompile_limit`` (8) variants, stops compiling it (running eagerly, or
  raising under ``fullgraph=True``). Every param group with its own shapes or hyperparameters is
  a variant, so each signature gets its own copy of the step function's code object
  (``CodeType.replace``) and with it its own Dynamo cache holding a single entry: any number of
  groups compile independently, and no global Dynamo setting is touched.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch

from dessilbi.optim.functional import multi_tensor_dessilbi
from dessilbi.optim.proximal import group_axis, group_threshold

__all__ = ["clear_fused_cache", "fused_cache_size", "fused_compile_failed", "fused_dessilbi"]

# (params, grads, momentum buffers, vs, gammas, lr) -> the group factors (see _make_step).
_StepFn = Callable[
    [
        list[torch.Tensor],
        list[torch.Tensor],
        list[torch.Tensor],
        list[torch.Tensor],
        list[torch.Tensor],
        torch.Tensor,
    ],
    list[torch.Tensor],
]

# Signature -> compiled step. The signature is everything the generated code depends on.
_COMPILED: dict[tuple[object, ...], _StepFn] = {}
# (device, dtype) -> (current value, 0-d tensor holding it): the learning rate as a graph input.
_LR_TENSORS: dict[tuple[torch.device, torch.dtype], tuple[float, torch.Tensor]] = {}
# Device types ("cpu", "cuda", ...) on which compiling failed: they stay on the foreach path.
_FAILED_DEVICE_TYPES: set[str] = set()


def fused_dessilbi(
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
    """One DessiLBI step over a param group, fused and compiled with ``torch.compile``.

    Same arguments and effects as :func:`dessilbi.optim.functional.multi_tensor_dessilbi`:
    ``params``, ``vs`` and ``gammas`` are updated in place; ``momentum_buffers`` holds None for a
    parameter on its first step and receives the new buffers (existing buffers are updated in
    place). ``vs`` and ``gammas`` are ignored when ``structure`` is None. Every parameter passed
    must have a gradient (the optimizer leaves out those whose ``grad`` is None, and their
    momentum buffers, V and Γ stay as they are). See the module docstring for what is
    compiled, when it falls back to the foreach path, and the one-time compile cost.
    """
    hyper: dict[str, Any] = {
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
    }
    first_step = momentum != 0 and any(b is None for b in momentum_buffers)
    if structure is None or structure == "tied" or not params or first_step:  # tied: eager
        multi_tensor_dessilbi(params, grads, momentum_buffers, vs, gammas, **hyper)
        return

    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)

    for (device, dtype), idx in buckets.items():
        ws = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        v_b = [vs[i] for i in idx]
        gamma_b = [gammas[i] for i in idx]
        bufs = [cast(torch.Tensor, momentum_buffers[i]) for i in idx] if momentum != 0 else []
        if device.type not in _FAILED_DEVICE_TYPES and _run_compiled(
            ws, gs, bufs, v_b, gamma_b, device=device, dtype=dtype, hyper=hyper
        ):
            continue
        bucket_bufs: list[torch.Tensor | None] = list(bufs) if momentum != 0 else [None] * len(idx)
        multi_tensor_dessilbi(ws, gs, bucket_bufs, v_b, gamma_b, **hyper)
        if momentum != 0:
            for i, b in zip(idx, bucket_bufs, strict=True):
                momentum_buffers[i] = b


def _run_compiled(
    ws: list[torch.Tensor],
    gs: list[torch.Tensor],
    bufs: list[torch.Tensor],
    vs: list[torch.Tensor],
    gammas: list[torch.Tensor],
    *,
    device: torch.device,
    dtype: torch.dtype,
    hyper: dict[str, Any],
) -> bool:
    """Run the compiled step of one bucket (one device and dtype), compiling it on first use.

    Returns False, with nothing changed, where compiling failed: the caller then runs the
    foreach path, and the failure is remembered and reported once (:func:`_compile_failed`).
    """
    structure, lam, group_scaling = hyper["structure"], hyper["lam"], hyper["group_scaling"]
    shapes = tuple(tuple(w.shape) for w in ws)
    key = (
        device,
        dtype,
        shapes,
        float(hyper["kappa"]),
        float(hyper["nu"]),
        float(lam),
        float(hyper["momentum"]),
        float(hyper["dampening"]),
        bool(hyper["nesterov"]),
        float(hyper["weight_decay"]),
        structure,
        group_scaling,
    )
    step = _COMPILED.get(key)
    new = step is None
    try:
        if step is None:
            step = _compile_step(
                lam_gs=tuple(
                    group_threshold(lam, structure, shape, group_scaling) for shape in shapes
                ),
                kappa=float(hyper["kappa"]),
                nu=float(hyper["nu"]),
                momentum=float(hyper["momentum"]),
                dampening=float(hyper["dampening"]),
                nesterov=bool(hyper["nesterov"]),
                weight_decay=float(hyper["weight_decay"]),
                structure=structure,
            )
            _COMPILED[key] = step
        # A new step compiles on this call. Torch's own warnings from inside the compiler are
        # no business of the caller, and under ``-W error`` they would turn into a failed
        # compilation.
        quiet = warnings.catch_warnings() if new else contextlib.nullcontext()
        with torch.no_grad(), quiet:
            if new:
                warnings.simplefilter("ignore")
            step(ws, gs, bufs, vs, gammas, _lr_tensor(hyper["lr"], device, dtype))
    except Exception as exc:  # compile errors come in many types
        # Compiling happens before any generated kernel runs: nothing has changed yet, and the
        # foreach path does the whole step.
        _compile_failed(key, device, exc)
        return False
    return True


def fused_cache_size() -> int:
    """Number of compiled step functions held (one per signature seen so far)."""
    return len(_COMPILED)


def fused_compile_failed(device_type: str = "cpu") -> bool:
    """Whether compiling failed on ``device_type``, which then stays on the foreach path."""
    return device_type in _FAILED_DEVICE_TYPES


def clear_fused_cache() -> None:
    """Forget compiled steps, cached lr tensors and remembered failures (mainly for tests)."""
    _COMPILED.clear()
    _LR_TENSORS.clear()
    _FAILED_DEVICE_TYPES.clear()


def _compile_failed(key: tuple[object, ...], device: torch.device, exc: Exception) -> None:
    """Forget ``key``'s step, remember that ``device``'s type can't compile, and warn once."""
    _COMPILED.pop(key, None)
    if device.type in _FAILED_DEVICE_TYPES:
        return
    _FAILED_DEVICE_TYPES.add(device.type)
    warnings.warn(
        f"fused DessiLBI: torch.compile failed on {device.type} "
        f"({type(exc).__name__}: {str(exc).strip()[:300]}); using the unfused foreach path "
        "from now on.",
        RuntimeWarning,
        stacklevel=4,  # the caller of fused_dessilbi
    )


def _lr_tensor(lr: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The 0-d tensor holding ``lr`` on ``device``, refilled only when the value changed."""
    lr = float(lr)  # a tensor lr (torch optimizers allow one) becomes a plain number here
    key = (device, dtype)
    cached = _LR_TENSORS.get(key)
    if cached is not None and cached[0] == lr:
        return cached[1]
    if cached is None:
        t = torch.full((), lr, device=device, dtype=dtype)
    else:
        t = cached[1]
        t.fill_(lr)
    _LR_TENSORS[key] = (lr, t)
    return t


def _compile_step(
    *,
    lam_gs: tuple[float, ...],
    kappa: float,
    nu: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    structure: str,
) -> _StepFn:
    """``torch.compile`` the step of one signature, on its own code object (own Dynamo cache).

    Dynamo caches compiled variants per code object, and every closure made by
    :func:`_make_step` shares one: without the private copy a handful of param groups (one
    variant each) would exhaust ``recompile_limit``.
    """
    step = _make_step(
        lam_gs=lam_gs,
        kappa=kappa,
        nu=nu,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        structure=structure,
    )
    private = types.FunctionType(
        step.__code__.replace(),
        step.__globals__,
        step.__name__,
        step.__defaults__,
        step.__closure__,
    )
    return cast(_StepFn, torch.compile(private, fullgraph=True, dynamic=False))


def _make_step(
    *,
    lam_gs: tuple[float, ...],
    kappa: float,
    nu: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    structure: str,
) -> _StepFn:
    """The eager step of one signature, every argument a trace-time constant.

    Only the tensors and the 0-d ``lr`` are inputs. It returns the group factors of the group
    structures, ``κ·max(0, 1 − λ_g/‖V_g‖)`` per group, which the caller drops: as graph outputs
    they are computed once per group into a buffer of their own, instead of being re-derived
    (a square root and a division) for every element in the loop that writes Γ, and they keep
    Inductor's CPU backend off a code path that crashes on this graph (outer-loop fusion with
    a local buffer for the in-place update of V: ``KeyError: 'bufN'``, pytorch/pytorch#196570,
    open as of torch 2.14).
    """

    def step(
        ws: list[torch.Tensor],
        gs: list[torch.Tensor],
        bs: list[torch.Tensor],
        vs: list[torch.Tensor],
        gammas: list[torch.Tensor],
        lr: torch.Tensor,
    ) -> list[torch.Tensor]:
        w_rate = lr * kappa  # the W step κ·lr
        v_rate = lr / nu  # the V step lr/ν
        factors = []
        for i in range(len(ws)):
            w, g, v, gamma = ws[i], gs[i], vs[i], gammas[i]
            if weight_decay != 0:
                g = g + weight_decay * w
            if momentum != 0:
                b = bs[i] * momentum + g * (1 - dampening)
                d = g + momentum * b if nesterov else b
                bs[i].copy_(b)
            else:
                d = g
            coupling = w - gamma  # W_k − Γ_k, from the old W and Γ
            v_new = v + v_rate * coupling
            w.copy_(w - w_rate * (d + coupling / nu))
            v.copy_(v_new)
            lam_g = lam_gs[i]
            if structure == "element":
                gamma_new = torch.nn.functional.softshrink(v_new, lam_g)
                if kappa != 1.0:
                    gamma_new = gamma_new * kappa
            elif lam_g == 0.0:
                gamma_new = v_new * kappa
            else:
                factor = _group_factor(v_new, structure, lam_g, kappa)
                factors.append(factor)
                gamma_new = v_new * factor
            gamma.copy_(gamma_new)
        return factors

    return step


def _group_factor(v: torch.Tensor, structure: str, lam_g: float, kappa: float) -> torch.Tensor:
    """``κ·max(0, 1 − λ_g/‖V_g‖)`` per group (keepdim), the same numbers as ``proximal.prox``.

    Exactly 0 at or under the threshold, zero-norm groups included, by selection rather than
    arithmetic; the clamp keeps the discarded branch finite (no division by zero).
    """
    norms = torch.linalg.vector_norm(v, dim=_reduce_dims(structure, v.dim()), keepdim=True)
    factor = torch.where(norms > lam_g, 1.0 - lam_g / norms.clamp_min(lam_g), 0.0)
    return factor * kappa if kappa != 1.0 else factor


def _reduce_dims(structure: str, ndim: int) -> Sequence[int]:
    axis = group_axis(structure)
    return [d for d in range(ndim) if d != axis]
