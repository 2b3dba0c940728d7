"""Floating-point settings of a run: mixed precision, memory format, subnormal flushing.

**Subnormals.** The DessiLBI coupling pulls the weights of unselected groups geometrically toward
zero, so they (and their momentum buffers) end in the float32 subnormal range (below about
1.2e-38), where x86 CPUs compute many times slower: one forward and backward pass of LeNet-5 at
batch 128 took 32.6 ms as loaded from a late checkpoint against 10.5 ms with subnormals flushed.
:func:`flush_denormal` sets the CPU's flush-to-zero / denormals-are-zero modes for a block; the
training loop uses it on CPU (``flush_denormal: true``, the default). Users of the bare optimizer
train inside ``with flush_denormal():`` or call :func:`set_flush_denormal` (``True``) once;
``torch.set_flush_denormal(True)`` alone reaches only the calling thread, not the intra-op
threads that already exist. A
flushed value is one a float32 cannot represent at full precision anyway; the selection is
unchanged (Γ's support is decided by ‖V_g‖ against λ, far above that range).
"""

from __future__ import annotations

import contextlib
import ctypes
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "autocast_factory",
    "flush_denormal",
    "flush_denormal_active",
    "gradient_scaler",
    "input_preparer",
    "intra_op_threads",
    "set_flush_denormal",
]

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def flush_denormal_active() -> bool:
    """Whether subnormal results are flushed to zero on the calling thread right now."""
    return float(torch.tensor([1e-39]).mul(1.0)) == 0.0


def set_flush_denormal(on: bool) -> bool:
    """``torch.set_flush_denormal(on)`` on the calling thread *and* torch's OpenMP threads.

    The CPU's flush-to-zero mode is a per-thread setting: torch's own call reaches only the
    calling thread, so with several intra-op threads whose pool already exists, the work that
    lands on the other threads would stay slow. Where torch runs on GNU OpenMP (its Linux
    builds), the mode is also set inside one parallel region over the whole pool. Returns
    whether the CPU supports the mode.
    """
    supported = torch.set_flush_denormal(on)
    if supported and torch.get_num_threads() > 1:
        _on_openmp_threads(on)
    return supported


@contextlib.contextmanager
def flush_denormal(enabled: bool = True) -> Iterator[bool]:
    """Flush subnormal floats to zero on the CPU inside the block; yields whether it is on.

    On exit the mode is put back as it was found on the calling thread (so nested blocks and a
    mode the caller set beforehand are left alone).
    """
    if not enabled:
        yield False
        return
    was_on = flush_denormal_active()
    supported = was_on or set_flush_denormal(True)
    try:
        yield supported
    finally:
        if supported and not was_on:
            set_flush_denormal(False)


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """Use ``count`` torch intra-op threads inside the block (None: leave it as it is)."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_GOMP: list[Any] = []  # the GNU OpenMP runtime torch uses, once found (None: there is none)


def _on_openmp_threads(on: bool) -> None:
    """Run ``torch.set_flush_denormal(on)`` on every thread of torch's OpenMP pool."""
    if not _GOMP:
        _GOMP.append(_find_gomp())
    gomp = _GOMP[0]
    if gomp is None:
        return
    def on_this_thread(_: object) -> None:
        torch.set_flush_denormal(on)

    callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(on_this_thread)
    # GOMP_parallel(fn, data, num_threads, flags): fn runs once on each thread of the team,
    # the same pool that torch's own parallel regions reuse.
    gomp.GOMP_parallel(callback, None, ctypes.c_uint(torch.get_num_threads()), ctypes.c_uint(0))


def _find_gomp() -> Any:
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    bundled = sorted(Path(torch.__file__).parent.glob("lib/libgomp*.so*"))
    for candidate in [*map(str, bundled), "libgomp.so.1"]:
        try:
            lib = ctypes.CDLL(candidate)
        except OSError:
            continue
        if hasattr(lib, "GOMP_parallel"):
            return lib
    return None


def autocast_factory(
    precision: str, device: torch.device
) -> Callable[[], AbstractContextManager[object]]:
    """A factory of the autocast context of ``precision`` (``fp32``: a no-op context)."""
    if precision == "fp32":
        return contextlib.nullcontext
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"invalid precision: {precision!r} (expected fp32, bf16 or fp16)")
    dtype = _AUTOCAST_DTYPES[precision]
    if precision == "fp16" and device.type == "cpu":
        warnings.warn(
            "precision fp16 on a CPU: float16 kernels are emulated there and ran about 100x "
            "slower than fp32 on the digits run; use --precision bf16 on CPUs (fp16 is for CUDA)",
            RuntimeWarning, stacklevel=2,
        )
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
