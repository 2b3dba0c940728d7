"""ResNet-20 on CIFAR-10: SGD against DessiLBI under the same budget, on real data.

Usage (from the repository root; the two trainings run one after the other, each about half an
hour on a shared 2-core CPU with 15 epochs and one torch thread):

    .venv/bin/python benchmarks/cifar_resnet20.py \\
        --data-dir /work/shared/data/cifar10-jpeg --epochs 15 --batch-size 64 --threads 1

Options: ``--only sgd dessilbi`` (a subset), ``--runs-dir`` (where the run directories go;
rerunning a finished run only reads it back, an interrupted one continues from its checkpoint),
``--out`` (the markdown table; the raw figures go next to it as ``.json``).

What it measures: both runs start from the shipped ``cifar10_resnet20`` config (CIFAR-10 from the
JPEG copy, crop 32 with padding 4 and horizontal flip, lr 0.1, Nesterov momentum 0.9, weight
decay 1e-4 on weights, none on biases and batch norm) with the same seed, batch size and a cosine
schedule over the whole budget:

- SGD: ``torch.optim.SGD`` with the settings above;
- DessiLBI: ν = 100, κ = 1, λ = 1, filter groups on every convolution, lasso on the classifier.

It reports the test accuracy of the dense weights W (both runs) and of the sparse network
W̃ = W ⊙ 1[Γ ≠ 0] (DessiLBI), the mean epoch time (metrics ``epoch_time``: the training loop only,
first epoch left out as warm-up), the selected filters per layer at the end, and the path of
accuracies and selected filters epoch by epoch.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch

from _runs import fmt, mean_epoch_time, median_epoch_time, read_history
from dessilbi.config import load_config
from dessilbi.train import train

RUNS: dict[str, dict[str, Any]] = {
    "sgd": {"optimizer": "sgd"},
    "dessilbi": {"optimizer": "dessilbi", "nu": 100, "kappa": 1, "lam": 1},
}
LABELS = {
    "sgd": "SGD (Nesterov 0.9, wd 1e-4)",
    "dessilbi": "DessiLBI (ν 100, Nesterov 0.9, wd 1e-4)",
}




def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    overrides = {
        **RUNS[name],
        "data_dir": args.data_dir,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "schedule": "cosine",
        "seed": args.seed,
        "device": "cpu",
        "out": args.runs_dir,
        "run_name": f"cifar10-resnet20-{name}-e{args.epochs}-b{args.batch_size}-s{args.seed}",
    }
    config = load_config("cifar10_resnet20", overrides)
    result = train(config, quiet=True)
    history = read_history(Path(result.run_dir))
    last = history[-1]
    return {
        "name": name,
        "label": LABELS[name],
        "config": config.to_dict(),
        "run_dir": str(result.run_dir),
        "epochs": last["epoch"],
        "test_acc": last["test_acc"],
        "test_acc_sparse": last["test_acc_sparse"],
        "selected": last["selected"],
        "mean_epoch_time": mean_epoch_time(history),
        "median_epoch_time": median_epoch_time(history),
        "total_train_time": sum(m["epoch_time"] for m in history),
        "history": history,
    }



def write_markdown(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "# ResNet-20 on CIFAR-10: SGD vs DessiLBI",
        "",
        f"Budget: {args.epochs} epochs, batch {args.batch_size}, lr 0.1 with a cosine schedule "
        f"over the {args.epochs} epochs, Nesterov momentum 0.9, weight decay 1e-4 (weights only), "
        f"seed {args.seed}; data augmentation crop 32 (padding 4) + horizontal flip; CIFAR-10 "
        "from the JPEG copy (quality 75). DessiLBI: ν = 100, κ = 1, λ = 1, filter groups on all "
        "convolutions, lasso on `fc`. CPU "
        f"({torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}).",
        "",
        "Produced by `.venv/bin/python benchmarks/cifar_resnet20.py "
        f"--data-dir {args.data_dir} --epochs {args.epochs} --batch-size {args.batch_size} "
        f"--threads {args.threads}`.",
        "",
        "| optimizer | epochs | dense W test acc (%) | sparse W̃ test acc (%) "
        "| selected conv filters | mean epoch time (s) | epoch time / SGD "
        "| median epoch time (s) | median / SGD |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sgd = results.get("sgd")
    for name in RUNS:
        if name not in results:
            continue
        r = results[name]
        convs = [(k, v) for k, v in r["selected"].items() if k != "fc.weight"]
        sel = (f"{sum(v[0] for _, v in convs)} / {sum(v[1] for _, v in convs)}"
               if convs else "–")
        ratio = r["mean_epoch_time"] / sgd["mean_epoch_time"] if sgd else None
        median = r.get("median_epoch_time")
        median_ratio = (median / sgd["median_epoch_time"]
                        if sgd and median and sgd.get("median_epoch_time") else None)
        lines.append(
            f"| {r['label']} | {r['epochs']} | {fmt(r['test_acc'])} "
            f"| {fmt(r['test_acc_sparse'])} | {sel} | {fmt(r['mean_epoch_time'], 1)} "
            f"| {fmt(ratio)} | {fmt(median, 1)} | {fmt(median_ratio)} |"
        )
    lines += ["", "Epoch times exclude the first epoch (warm-up) and all evaluation; the "
              "machine was shared with other work, so the median is the steadier figure."]
    if "dessilbi" in results:
        r = results["dessilbi"]
        lines += [
            "",
            "## Selected groups per layer (DessiLBI, end of training)",
            "",
            "Conv layers: filters (groups W[i, ...]); `fc.weight`: single weights (lasso).",
            "",
            "| layer | selected / total |",
            "|---|---|",
        ]
        for layer, (sel_n, total) in r["selected"].items():
            lines.append(f"| {layer} | {sel_n} / {total} |")
        lines += [
            "",
            "## Path, epoch by epoch",
            "",
            "| epoch | SGD test acc (%) | DessiLBI dense (%) | DessiLBI sparse W̃ (%) "
            "| selected conv filters |",
            "|---|---|---|---|---|",
        ]
        sgd_hist = {m["epoch"]: m for m in results.get("sgd", {}).get("history", [])}
        for m in r["history"]:
            convs = [v for k, v in m["selected"].items() if k != "fc.weight"]
            sgd_m = sgd_hist.get(m["epoch"])
            lines.append(
                f"| {m['epoch']} | {fmt(sgd_m['test_acc'] if sgd_m else None)} "
                f"| {fmt(m['test_acc'])} | {fmt(m['test_acc_sparse'])} "
                f"| {sum(v[0] for v in convs)} / {sum(v[1] for v in convs)} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: on a shared 2-core machine torch's "
                        "default of 2 threads ran 3-5x slower)")
    parser.add_argument("--data-dir", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--runs-dir", default="runs/bench-cifar")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cifar_resnet20.md"))
    parser.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    json_path = args.out.with_suffix(".json")
    results: dict[str, dict[str, Any]] = {}
    if json_path.is_file():  # keep runs done by an earlier --only invocation
        results = {
            name: r for name, r in json.loads(json_path.read_text()).get("runs", {}).items()
            if (r["config"]["epochs"], r["config"]["batch_size"], r["config"]["seed"])
            == (args.epochs, args.batch_size, args.seed)
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        print(f"== {name}", flush=True)
        results[name] = run_one(name, args)
        r = results[name]
        print(f"{name}: dense {r['test_acc']:.2f}% sparse {fmt(r['test_acc_sparse'])}% "
              f"epoch {r['mean_epoch_time']:.1f} s", flush=True)
        json_path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "runs": results}, indent=1))
        args.out.write_text(write_markdown(results, args))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
