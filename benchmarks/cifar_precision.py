"""ResNet-20 on CIFAR-10 in fp32 against bf16 autocast + channels-last, SGD and DessiLBI.

Usage (from the repository root; four runs advance one epoch at a time in turn, so their epoch
times are measured side by side under the same machine load):

    .venv/bin/python benchmarks/cifar_precision.py \\
        --data-dir ../shared/data/cifar10-jpeg --epochs 10 --threads 1

Every run starts from the shipped ``cifar10_resnet20`` config (crop 32 with padding 4 and flip,
lr 0.1, Nesterov 0.9, weight decay 1e-4, batch 64, DessiLBI ν 100, κ 1, λ 1, filter groups on
the convolutions, lasso on ``fc``) with a cosine schedule over ``--epochs``. Round ``k`` trains
every run up to epoch ``k`` (``train`` resumes each from its checkpoint), so an interrupted
benchmark continues where it stopped, and a rerun of a finished one only reads its run
directories back. The table goes to ``--out`` (markdown) and the raw figures next to it
(``.json``).

Epoch times (``epoch_time`` in ``metrics.jsonl``: the training loop, no evaluation) are compared
per epoch between runs of the same round; the ratio over the late epochs (the second half)
shows whether the speed holds once unselected weights have decayed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from typing import Any

import torch

from _runs import add_common_arguments, advance, fmt
from dessilbi.config import load_config

RUNS: dict[str, dict[str, Any]] = {
    "sgd_fp32": {"optimizer": "sgd"},
    "sgd_bf16": {"optimizer": "sgd", "precision": "bf16", "channels_last": True},
    "dessilbi_fp32": {"optimizer": "dessilbi"},
    "dessilbi_bf16": {"optimizer": "dessilbi", "precision": "bf16", "channels_last": True},
}
LABELS: dict[str, str] = {
    "sgd_fp32": "SGD, fp32",
    "sgd_bf16": "SGD, bf16 autocast + channels-last",
    "dessilbi_fp32": "DessiLBI, fp32",
    "dessilbi_bf16": "DessiLBI, bf16 autocast + channels-last",
}
PAIRS = (("sgd_bf16", "sgd_fp32"), ("dessilbi_bf16", "dessilbi_fp32"),
         ("dessilbi_fp32", "sgd_fp32"), ("dessilbi_bf16", "sgd_bf16"))


def _config(name: str, epochs_so_far: int, args: argparse.Namespace) -> Any:
    return load_config("cifar10_resnet20", {
        **RUNS[name],
        "data_dir": args.data_dir,
        "epochs": epochs_so_far,
        "schedule": "cosine",
        "schedule_epochs": args.epochs,
        "seed": args.seed,
        "device": "cpu",
        "out": args.runs_dir,
        "run_name": f"cifar10-resnet20-{name}-e{args.epochs}-s{args.seed}",
    })


def _ratios(hists: dict[str, list[dict[str, Any]]], a: str, b: str, epochs: range) -> float:
    """Median over ``epochs`` of the per-epoch time ratio of run ``a`` to run ``b``."""
    times = {n: {m["epoch"]: m["epoch_time"] for m in hists[n]} for n in (a, b)}
    return statistics.median(times[a][e] / times[b][e] for e in epochs)


def write_markdown(hists: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    done = min(len(h) for h in hists.values())
    # The first epoch pays for warm-up; it counts only while it is the only one.
    every = range(2, done + 1) if done > 1 else range(1, 2)
    late = range(max(every.start, done // 2 + 1), done + 1)
    lines = [
        "# ResNet-20 on CIFAR-10: fp32 against bf16 autocast + channels-last",
        "",
        f"{done} of {args.epochs} epochs, cosine lr 0.1 over {args.epochs} epochs, batch 64, "
        "Nesterov 0.9, wd 1e-4, crop + flip, CIFAR-10 JPEG copy; DessiLBI ν 100, λ 1, filter "
        f"groups, lasso on fc. CPU ({args.threads} thread(s), torch {torch.__version__}, "
        f"{platform.machine()}); the four runs advanced one epoch at a time in turn.",
        "",
        f"Produced by `.venv/bin/python benchmarks/cifar_precision.py --data-dir {args.data_dir} "
        f"--epochs {args.epochs} --threads {args.threads}`.",
        "",
        "| run | dense W (%) | sparse W̃ (%) | selected conv filters | median epoch time (s) |",
        "|---|---|---|---|---|",
    ]
    for name, hist in hists.items():
        last = hist[done - 1]
        convs = [v for k, v in last["selected"].items() if k != "fc.weight"]
        sel = f"{sum(v[0] for v in convs)} / {sum(v[1] for v in convs)}" if convs else "–"
        median = statistics.median(m["epoch_time"] for m in hist[1:done] or hist[:1])
        lines.append(f"| {LABELS[name]} | {fmt(last['test_acc'])} "
                     f"| {fmt(last['test_acc_sparse'])} | {sel} | {fmt(median, 1)} |")
    lines += [
        "",
        "Epoch-time ratios, median of the per-epoch ratios of runs measured in the same round "
        f"(all: epochs {every.start}–{every.stop - 1}; late: epochs {late.start}–{late.stop - 1}):",
        "",
        "| ratio | all epochs | late epochs |",
        "|---|---|---|",
    ]
    for a, b in PAIRS:
        lines.append(f"| {LABELS[a]} / {LABELS[b]} | {fmt(_ratios(hists, a, b, every))} "
                     f"| {fmt(_ratios(hists, a, b, late))} |")
    lines += ["", "Test accuracy (%) per epoch (W; W̃ for DessiLBI in brackets):", "",
              "| epoch | " + " | ".join(LABELS[n] for n in hists) + " |",
              "|---|" + "---|" * len(hists)]
    for e in range(done):
        cells = []
        for hist in hists.values():
            m = hist[e]
            sparse = f" ({fmt(m['test_acc_sparse'])})" if m["test_acc_sparse"] is not None else ""
            cells.append(f"{fmt(m['test_acc'])}{sparse}")
        lines.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, epochs=10, data_dir="../shared/data/cifar10-jpeg",
                         runs_dir="runs/bench-precision",
                         out="benchmarks/results/cifar_precision.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    hists: dict[str, list[dict[str, Any]]] = {}
    for k in range(1, args.epochs + 1):
        for name in RUNS:
            hists[name] = advance(_config(name, k, args))
        args.out.write_text(write_markdown(hists, args))
        args.out.with_suffix(".json").write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "runs": hists}, indent=1))
        print(f"round {k} done", flush=True)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
