"""Median optimizer-step time of DessiLBI against torch's SGD on real parameter sets.

Usage: python benchmarks/step_speed.py [--steps 30] [--warmup 5] [--models vgg16 resnet56]

For each parameter set (VGG-16 for CIFAR, ≈15M parameters; ResNet-56, ≈0.85M) it fills every
gradient with fixed random numbers and times, in one process and interleaved step by step so that
machine noise hits all of them alike:
  - torch.optim.SGD(momentum=0.9, foreach=True)
  - DessiLBI (momentum 0.9, conv filter groups, linear lasso) on the foreach path
  - DessiLBI on the per-tensor path
  - DessiLBI with fused=True (torch.compile; its one-time compile happens in the warm-up and is
    reported separately)
It prints the median times, the ratios to SGD, and the optimizer-state bytes per byte of coupled
parameters.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from dessilbi import DessiLBI, structured_param_groups
from dessilbi.models import build_model


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )


def bench(name: str, steps: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    models = {key: build_model(name) for key in ("sgd", "foreach", "per_tensor", "fused")}
    for model in models.values():
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-2
    optimizers: dict[str, torch.optim.Optimizer] = {
        "sgd": torch.optim.SGD(models["sgd"].parameters(), lr=0.01, momentum=0.9, foreach=True),
        "foreach": DessiLBI(
            structured_param_groups(models["foreach"]), lr=0.01, momentum=0.9, foreach=True
        ),
        "per_tensor": DessiLBI(
            structured_param_groups(models["per_tensor"]), lr=0.01, momentum=0.9, foreach=False
        ),
        "fused": DessiLBI(
            structured_param_groups(models["fused"]), lr=0.01, momentum=0.9, fused=True
        ),
    }
    for opt in optimizers.values():
        opt.step()  # first step: state is created (the fused path compiles on the second)
    compile_s = _timed(optimizers["fused"].step)
    for _ in range(warmup):
        for opt in optimizers.values():
            opt.step()
    times: dict[str, list[float]] = {key: [] for key in optimizers}
    for _ in range(steps):
        for key, opt in optimizers.items():
            times[key].append(_timed(opt.step))
    median = {key: statistics.median(values) for key, values in times.items()}

    n_params = sum(p.numel() for p in models["sgd"].parameters())
    coupled = [
        p for g in optimizers["foreach"].param_groups if g["structure"] for p in g["params"]
    ]
    coupled_bytes = sum(p.numel() * p.element_size() for p in coupled)
    result = {
        "params_millions": n_params / 1e6,
        "sgd_ms": median["sgd"] * 1e3,
        "foreach_ms": median["foreach"] * 1e3,
        "per_tensor_ms": median["per_tensor"] * 1e3,
        "foreach_ratio": median["foreach"] / median["sgd"],
        "per_tensor_ratio": median["per_tensor"] / median["sgd"],
        "fused_ms": median["fused"] * 1e3,
        "fused_ratio": median["fused"] / median["sgd"],
        "compile_s": compile_s,
        "state_bytes_per_coupled_byte": _state_bytes(optimizers["foreach"]) / coupled_bytes,
        "sgd_state_bytes_per_param_byte": _state_bytes(optimizers["sgd"]) / (n_params * 4),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet56"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps")
    header = (
        "| params | M | SGD ms | foreach ms | per-tensor ms | fused ms | foreach/SGD "
        "| per-tensor/SGD | fused/SGD | fused compile s | state bytes per coupled byte |"
    )
    print(header)
    print("|---" * 11 + "|")
    for name in args.models:
        r = bench(name, args.steps, args.warmup)
        print(
            f"| {name} | {r['params_millions']:.2f} | {r['sgd_ms']:.2f} | {r['foreach_ms']:.2f} "
            f"| {r['per_tensor_ms']:.2f} | {r['fused_ms']:.2f} | {r['foreach_ratio']:.2f} "
            f"| {r['per_tensor_ratio']:.2f} | {r['fused_ratio']:.2f} | {r['compile_s']:.1f} "
            f"| {r['state_bytes_per_coupled_byte']:.2f} |"
        )


if __name__ == "__main__":
    main()
