"""Floating-point settings of a run: mixed precision, memory format, subnormal flushing.

**Subnormals.** The DessiLBI coupling pulls the weights of unselected groups geometrically toward
zero, so they (and their momentum buffers) end in the float32 subnormal range (below about
1.2e-38), where x86 CPUs compute many times slower: one forward and backward pass of LeNet-5 at
batch 128 took 32.6 ms as loaded from a late checkpoint against 10.5 ms with subnormals flushed.
:func:`flush_denormal` sets the CPU's flush-to-zero / denormals-are-zero modes for a block; the
training loop uses it on CPU (``flush_denormal: true``, the default). Users of the bare optimizer
call ``torch.set_flush_denormal(True)`` once, or train inside ``with flush_denormal():``. A
flushed value is one a float32 cannot represent at full precision anyway; the selection is
unchanged (Γ's support is decided by ‖V_g‖ against λ, far above that range).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch

__all__ = ["autocast_factory", "flush_denormal", "gradient_scaler", "input_preparer"]

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def flush_denormal(enabled: bool = True) -> Iterator[bool]:
    """Flush subnormal floats to zero on the CPU inside the block; yields whether it is on.

    The outermost block switches the mode off again on exit: torch cannot report the mode
    that was set before, so one set with ``torch.set_flush_denormal(True)`` outside the block
    ends with it too.
    """
    global _depth
    if not enabled:
        yield False
        return
    supported = torch.set_flush_denormal(True)
    _depth += 1
    try:
        yield supported
    finally:
        _depth -= 1
        if _depth == 0 and supported:
            torch.set_flush_denormal(False)


_depth = 0


def autocast_factory(
    precision: str, device: torch.device
) -> Callable[[], AbstractContextManager[object]]:
    """A factory of the autocast context of ``precision`` (``fp32``: a no-op context)."""
    if precision == "fp32":
        return contextlib.nullcontext
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"invalid precision: {precision!r} (expected fp32, bf16 or fp16)")
    dtype = _AUTOCAST_DTYPES[precision]
    return lambda: torch.autocast(device.type, dtype=dtype)


def gradient_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """The gradient scaler of a run: active under fp16 only (bf16 has float32's range).

    A step whose scaled gradients overflow is skipped by ``scaler.step(optimizer)``, so the
    optimizer's ``step`` is never called for it: W, V, Γ and the momentum buffers stay as
    they were, and the scale is lowered for the next step.
    """
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def input_preparer(
    normalize: Callable[..., torch.Tensor], channels_last: bool
) -> Callable[..., torch.Tensor]:
    """``normalize`` followed by the run's memory format (channels-last for 4-D inputs)."""
    if not channels_last:
        return normalize

    def prepare(*args: object) -> torch.Tensor:
        x = normalize(*args)
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

    return prepare
