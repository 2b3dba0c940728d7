"""What compaction bought, per layer: channels, parameters and FLOPs, and CPU latency.

FLOPs come from torch's ``FlopCounterMode`` (per module and in total); latency is the fastest of
timed forward passes in eval mode (the least disturbed by other work on a shared machine), at
batch 1 and 64, with one intra-op thread and with all. Latency is given as trained and with
every batch norm folded into the convolution before it, as a deployment runs the network
(onnxruntime folds them on export too): batch norm, like ReLU and the residual additions, costs
by activations and not by FLOPs, and folding leaves the convolutions' work to compare.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["compact_report", "count_batch_norms", "fold_batch_norms", "layer_flops", "latency"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def layer_flops(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, int]:
    """FLOPs per module name (``""``: the whole model) for one pass over ``example_inputs``."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(example_inputs)
    root = type(model).__name__
    out = {}
    for key, counts in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = "" if key == root else key.removeprefix(f"{root}.")
        out[name] = int(sum(counts.values()))
    return out


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every batch norm that directly follows a convolution
    folded into it (torch.fx's conv-bn fusion); the model itself is left as it is. A batch norm
    torch.fx does not fold (no running statistics, or a conv output read elsewhere too) stays:
    :func:`count_batch_norms` of the copy tells.

    Raises ``ValueError`` naming the model if torch.fx cannot trace or fuse it (data-dependent
    control flow)."""
    with warnings.catch_warnings():  # the module imports torch.jit's deprecated script_method
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.fx.experimental.optimization import fuse

    try:
        return fuse(copy.deepcopy(model).eval(), inplace=True)
    except Exception as error:  # torch.fx raises many types for untraceable code
        raise ValueError(f"cannot fold the batch norms of {type(model).__name__}: torch.fx "
                         f"could not trace or fuse it ({type(error).__name__}: {error})"
                         ) from error


def count_batch_norms(model: nn.Module) -> int:
    """The batch-norm layers in ``model``."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _latency_pairs(dense: nn.Module, compact_model: nn.Module
                   ) -> tuple[dict[str, tuple[nn.Module, nn.Module]], str]:
    """The (dense, compact) pairs to time, as trained and with the batch norms folded, and a
    note when folding was not possible or not complete."""
    pairs = {"as trained": (dense, compact_model)}
    norms = count_batch_norms(dense)
    if norms == 0:
        return pairs, ""
    try:
        folded = fold_batch_norms(dense), fold_batch_norms(compact_model)
    except ValueError as error:
        return pairs, f"Batch norms not folded: {error}."
    left = count_batch_norms(folded[0])
    label = "folded" if left == 0 else f"{norms - left} of {norms} folded"
    pairs[label] = folded
    return pairs, ""


@contextmanager
def _threads(count: int | None) -> Any:
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def latency(model: nn.Module, inputs: torch.Tensor, threads: int | None, repeats: int = 20
            ) -> float:
    """Seconds of the fastest of ``repeats`` forward passes (eval mode, no autograd) after two
    warm-up passes."""
    model.eval()
    times = []
    with _threads(threads), torch.inference_mode():
        for k in range(repeats + 2):
            start = time.perf_counter()
            model(inputs)
            if k >= 2:
                times.append(time.perf_counter() - start)
    return min(times)


def compact_report(dense: nn.Module, compact_model: nn.Module, example_inputs: torch.Tensor,
                   batches: Sequence[int] = (1, 64)) -> str:
    """A markdown report: per conv / linear layer, output channels, parameters and FLOPs of the
    dense and the compact network; then totals and CPU latency of both."""
    flops_dense = layer_flops(dense, example_inputs)
    flops_compact = layer_flops(compact_model, example_inputs)
    compact_modules = dict(compact_model.named_modules())
    lines = ["| layer | channels | parameters | FLOPs |", "|---|---|---|---|"]
    for name, module in dense.named_modules():
        if not isinstance(module, _LAYERS):
            continue
        small = compact_modules[name]
        channels = (f"{module.weight.shape[0]} → {small.weight.shape[0]}")
        params = f"{_count(module):,} → {_count(small):,}"
        lines.append(f"| {name} | {channels} | {params} | "
                     f"{flops_dense.get(name, 0):,} → {flops_compact.get(name, 0):,} |")
    total_dense, total_compact = _count(dense), _count(compact_model)
    lines += ["", f"Parameters: {total_dense:,} → {total_compact:,} "
              f"({total_compact / total_dense:.1%}); FLOPs per image: {flops_dense['']:,} → "
              f"{flops_compact['']:,} ({flops_compact[''] / flops_dense['']:.1%}, "
              f"{flops_dense[''] / flops_compact['']:.2f}x fewer).", "",
              "| batch | threads | batch norm | dense (ms) | compact (ms) | speed-up |",
              "|---|---|---|---|---|---|"]
    pairs, note = _latency_pairs(dense, compact_model)
    for batch in batches:
        x = example_inputs.new_zeros(batch, *example_inputs.shape[1:]).normal_()
        for threads in (1, None):
            label = "1" if threads == 1 else f"all ({torch.get_num_threads()})"
            for norm, (big, small) in pairs.items():
                slow, fast = latency(big, x, threads), latency(small, x, threads)
                lines.append(f"| {batch} | {label} | {norm} | {1e3 * slow:.2f} | "
                             f"{1e3 * fast:.2f} | {slow / fast:.2f}x |")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
