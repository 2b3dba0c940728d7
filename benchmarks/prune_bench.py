"""Pruning on real data: DessiLBI's path order against L1-norm pruning of SGD and random masks,
before and after fine-tuning, and the compact networks' CPU speed against their FLOPs.

Usage (from the repository root)::

    .venv/bin/python benchmarks/prune_bench.py --task mnist
    .venv/bin/python benchmarks/prune_bench.py --task cifar
    .venv/bin/python benchmarks/prune_bench.py --task cifar --setting shipped

Source runs (trained first when missing; resumed when unfinished):

- ``mnist``: LeNet-5 on MNIST, ``mnist_lenet5_selective`` (conv3 coupled, ``selection_start:
  7``) and the same config with SGD, 30 epochs each;
- ``cifar``: ResNet-20 on the CIFAR-10 JPEG copy, the two runs of
  ``benchmarks/cifar_selective.py`` (``cifar10_resnet20_selective`` and SGD, 20 epochs, bf16):
  with ``--setting first`` (the default) the DessiLBI run of the config's first setting
  (selection from epoch 4, calibrated over epoch 1), with ``--setting shipped`` the one it ships
  (from epoch 7, calibrated over epoch 3: ``cifar_selective.py``'s ``late`` run); results go to
  ``prune_cifar[_shipped][_r<N>]``.

At each keep ratio every pruned layer keeps the same share of its filters: DessiLBI's first
filters in the path's order (entry step, then ‖W_g‖) on its own weights; the largest-L1-norm
filters of the SGD model; random filters (seed 0) of the SGD model. Each pruned network is
evaluated as it is (filters, biases and batch-norm affine zeroed) and after ``--finetune-epochs``
of SGD with the mask held (``dessilbi prune``'s fine-tuning), then compacted; its CPU latency at
batch 64 (one thread) is compared with the dense network's, against the FLOP reduction, as
trained and with every batch norm folded into its convolution (both networks).
Every finished cell is recorded in ``benchmarks/results/prune_<task>.json`` and skipped when
the benchmark is run again.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch

from _runs import advance, fmt, run_directory
from dessilbi.config import TrainConfig, load_config
from dessilbi.path_record import load_path
from dessilbi.runs import load_run
from dessilbi.subnet import (
    FilterMask,
    compact,
    l1_mask,
    load_mask,
    ordered_mask,
    random_mask,
)
from dessilbi.subnet.prune import example_input, finetune
from dessilbi.subnet.report import count_batch_norms, fold_batch_norms, latency, layer_flops
from selective_compare import _evaluator

RATIOS = (0.7, 0.5, 0.3)
METHODS = ("dessilbi", "l1_sgd", "random_sgd")


def source_configs(task: str, args: argparse.Namespace) -> dict[str, TrainConfig]:
    if task == "mnist":
        common = {"data_dir": args.data_dir or "../shared/data", "threads": 1,
                  "out": "runs/bench-prune"}
        return {name: load_config("mnist_lenet5_selective", {
            **common, "optimizer": name, "run_name": f"mnist-lenet5-selective-{name}"})
            for name in ("dessilbi", "sgd")}
    common = {"data_dir": args.data_dir or "../shared/data/cifar10-jpeg", "threads": 1,
              "device": "cpu", "out": "runs/bench-selective", "epochs": 20, "seed": 0}
    # The SGD run (and the first DessiLBI run) were made when the config started selection in
    # epoch 4, calibrated over 1: pinned so that they are found as they were recorded.
    first = {"selection_start": 4, "selection_calibration": 1}
    configs = {name: load_config("cifar10_resnet20_selective", {
        **common, **first, "optimizer": name,
        "run_name": f"cifar10-resnet20-selective-{name}-e20-s0"}) for name in ("dessilbi", "sgd")}
    if args.setting == "shipped":
        configs["dessilbi"] = load_config("cifar10_resnet20_selective", {
            **common, "run_name": "cifar10-resnet20-selective-late-e20-s0"})
    return configs


def ensure_trained(config: TrainConfig) -> Path:
    advance(config)  # a finished run (perhaps with callbacks of its own benchmark) is only read
    return run_directory(config)


def make_mask(method: str, ratio: float, runs: dict[str, Path], round_to: int = 1
              ) -> FilterMask:
    lbi = ordered_mask(load_path(runs["dessilbi"] / "path.pt"), ratio, round_to=round_to)
    if method == "dessilbi":
        return lbi
    counts = lbi.counts()
    if method == "l1_sgd":
        return l1_mask(load_run(runs["sgd"]).model.state_dict(), counts, str(runs["sgd"]))
    return random_mask({n: k.numel() for n, k in lbi.keep.items()}, counts, seed=0)


def cell(method: str, ratio: float, runs: dict[str, Path], args: argparse.Namespace,
         accuracy: dict[str, Any]) -> dict[str, Any]:
    source = runs["dessilbi" if method == "dessilbi" else "sgd"]
    mask = make_mask(method, ratio, runs, args.round_to)
    weights = load_run(source).model.state_dict()
    before = accuracy[str(source)](weights, mask.keep)
    tuned = finetune(source, mask, args.finetune_epochs,
                     {"optimizer": "sgd", "lr": args.finetune_lr, "schedule": "constant",
                      "selection_start": None, "out": str(source.parent)}, quiet=True)
    return {"method": method, "ratio": ratio, "kept": mask.kept, "total": mask.total,
            "before": before, "after": tuned.test_acc, "run": str(tuned.run_dir),
            **speed(tuned.run_dir, mask)}


def speed(run_dir: Path, mask: FilterMask) -> dict[str, Any]:
    """The fine-tuned network against its compact form: latency at batch 64 on one thread
    (fastest of 20 passes), as trained and with the batch norms folded into the convolutions
    (as deployed), FLOPs and parameters."""
    run = load_run(run_dir)
    example = example_input(run)
    small = compact(run.model, example, keep=mask.keep).model
    x = torch.randn(64, *example.shape[1:], generator=torch.Generator().manual_seed(0))
    dense_time, compact_time = latency(run.model, x, 1), latency(small, x, 1)
    folded = latency(fold_batch_norms(run.model), x, 1) / latency(fold_batch_norms(small), x, 1) \
        if count_batch_norms(run.model) else None  # nothing to fold (LeNet-5)
    dense_flops, compact_flops = layer_flops(run.model, example)[""], layer_flops(
        small, example)[""]
    return {"speedup": dense_time / compact_time, "speedup_folded": folded,
            "flop_reduction": dense_flops / compact_flops,
            "params": [sum(p.numel() for p in run.model.parameters()),
                       sum(p.numel() for p in small.parameters())]}


def write_markdown(task: str, args: argparse.Namespace, runs: dict[str, Path],
                   cells: dict[str, dict[str, Any]]) -> str:
    dense = {n: load_run(p).config for n, p in runs.items()}
    accs = {n: json.loads((p / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]
            for n, p in runs.items()}
    label = {"dessilbi": "DessiLBI path order", "l1_sgd": "L1 norm of SGD",
             "random_sgd": "random (SGD weights)"}
    lines = [f"# Pruning on {'MNIST (LeNet-5)' if task == 'mnist' else 'CIFAR-10 (ResNet-20)'}",
             "",
             f"Sources: DessiLBI ({dense['dessilbi'].epochs} epochs, {fmt(accs['dessilbi'])} %) "
             f"and SGD ({dense['sgd'].epochs} epochs, {fmt(accs['sgd'])} %), "
             f"`{runs['dessilbi'].name}` / `{runs['sgd'].name}`. Every pruned layer keeps the "
             f"given share of its filters; fine-tuning: {args.finetune_epochs} epoch(s) of SGD "
             f"at lr {args.finetune_lr:g} (constant) with the mask held. Speed: fastest of 20 "
             f"forward passes at batch 64, one thread, dense / compact ({platform.machine()}, "
             f"torch {torch.__version__}), as trained and with every batch norm folded into "
             f"its convolution (as a deployment runs it; both networks folded); target "
             f"speed-up ≥ 0.6 of the FLOP reduction.",
             "",
             *([f"Every layer's kept filters are rounded up to a multiple of {args.round_to} "
                "(whole channel blocks of the CPU kernels).", ""] if args.round_to > 1 else []),
             f"Produced by `.venv/bin/python benchmarks/prune_bench.py --task {task}"
             + (" --setting shipped" if task == "cifar" and args.setting == "shipped" else "")
             + (f" --round-to {args.round_to}" if args.round_to > 1 else "")
             + (f" --ratios {' '.join(f'{r:g}' for r in args.ratios)}"
                if tuple(args.ratios) != RATIOS else "")
             + "`.",
             "",
             "| keep | filters | method | pruned, no fine-tuning (%) | fine-tuned (%) | "
             "params | FLOP reduction | speed-up | speed-up / FLOP reduction | "
             "speed-up, BN folded | folded / FLOP reduction |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for ratio in args.ratios:
        for method in METHODS:
            c = cells.get(f"{method}-{ratio}")
            if c is None:
                continue
            lines.append(
                f"| {ratio:g} | {c['kept']} / {c['total']} | {label[method]} | "
                f"{fmt(c['before'])} | {fmt(c['after'])} | {c['params'][1]:,} of "
                f"{c['params'][0]:,} | {c['flop_reduction']:.2f}x | {c['speedup']:.2f}x | "
                f"{c['speedup'] / c['flop_reduction']:.2f} | {_folded(c)} |")
    return "\n".join(lines) + "\n"


def _folded(cell: dict[str, Any]) -> str:
    if cell.get("speedup_folded") is None:  # no batch norm, or recorded before
        return "– | –"
    return f"{cell['speedup_folded']:.2f}x | {cell['speedup_folded'] / cell['flop_reduction']:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=("mnist", "cifar"), required=True)
    parser.add_argument("--data-dir")
    parser.add_argument("--finetune-epochs", type=int)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--round-to", type=int, default=1,
                        help="round every layer's kept filters up to a multiple of this")
    parser.add_argument("--ratios", type=float, nargs="*", default=list(RATIOS))
    parser.add_argument("--setting", choices=("first", "shipped"), default="first",
                        help="cifar: the DessiLBI source run's selection setting")
    parser.add_argument("--remeasure-speed", action="store_true",
                        help="measure the recorded cells' speed again (on a quiet machine)")
    args = parser.parse_args()
    if args.finetune_epochs is None:
        args.finetune_epochs = 3 if args.task == "mnist" else 2
    torch.set_num_threads(1)
    suffix = ("_shipped" if args.task == "cifar" and args.setting == "shipped" else "") + (
        f"_r{args.round_to}" if args.round_to > 1 else "")
    out = Path(f"benchmarks/results/prune_{args.task}{suffix}.md")
    record = out.with_suffix(".json")
    cells = json.loads(record.read_text())["cells"] if record.is_file() else {}
    runs = {name: ensure_trained(c) for name, c in source_configs(args.task, args).items()}
    if args.remeasure_speed:
        for c in cells.values():
            c.update(speed(Path(c["run"]), load_mask(Path(c["run"]) / "mask.json")))
        record.write_text(json.dumps({"task": args.task, "cells": cells}, indent=1))
    accuracy = {str(p): _evaluator(p) for p in runs.values()}
    for ratio in args.ratios:
        for method in METHODS:
            key = f"{method}-{ratio}"
            if key in cells:
                continue  # recorded by an earlier sitting
            cells[key] = cell(method, ratio, runs, args, accuracy)
            record.write_text(json.dumps({"task": args.task, "cells": cells}, indent=1))
            out.write_text(write_markdown(args.task, args, runs, cells))
            print(f"{key}: {cells[key]['before']:.2f} -> {cells[key]['after']:.2f}", flush=True)
    out.write_text(write_markdown(args.task, args, runs, cells))
    print(out.read_text())


if __name__ == "__main__":
    main()
