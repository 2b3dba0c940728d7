"""ResNet-20 on CIFAR-10: SGD against DessiLBI under the same budget, on real data.

Usage (from the repository root; the trainings run one after the other, each about 35 minutes on
a shared 2-core CPU with 20 epochs and one torch thread):

    .venv/bin/python benchmarks/cifar_resnet20.py \\
        --data-dir ../shared/data/cifar10-jpeg --epochs 20 --batch-size 64 --threads 1

Options: ``--only sgd dessilbi dessilbi_lam4`` (a subset), ``--runs-dir`` (where the run
directories go; rerunning a finished run only reads it back, an interrupted one continues from
its checkpoint), ``--out`` (the markdown table; the raw figures go next to it as ``.json``).

What it measures: every run starts from the shipped ``cifar10_resnet20`` config (CIFAR-10 from the
JPEG copy, crop 32 with padding 4 and horizontal flip, lr 0.1, Nesterov momentum 0.9, weight
decay 1e-4 on weights, none on biases and batch norm) with the same seed, batch size and a cosine
schedule over the whole budget:

- ``sgd``: ``torch.optim.SGD`` with the settings above;
- ``dessilbi``: ν = 100, κ = 1, λ = 1 (the reference code's CIFAR settings), filter groups on
  every convolution, lasso on the classifier;
- ``dessilbi_lam4``: the same with λ = 4. With Kaiming-initialised filters (‖W_g‖ ≈ 1.4) and
  ν = 100, V_g ≈ (α/ν)·Σ W_g passes λ = 1 for every filter within two epochs, whatever the
  loss says; λ = 4 leaves the selection to the gradients.

It reports the test accuracy of the dense weights W (all runs) and of the sparse network
W̃ = W ⊙ 1[Γ ≠ 0] (DessiLBI), the epoch time (metrics ``epoch_time``: the training loop only),
the selected filters per layer at the end, and the path of accuracies and selected filters epoch
by epoch.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch

from _runs import add_common_arguments, fmt, mean_epoch_time, median_epoch_time, read_history
from dessilbi.config import load_config
from dessilbi.train import train

RUNS: dict[str, dict[str, Any]] = {
    "sgd": {"optimizer": "sgd"},
    "dessilbi": {"optimizer": "dessilbi", "nu": 100, "kappa": 1, "lam": 1},
    "dessilbi_lam4": {"optimizer": "dessilbi", "nu": 100, "kappa": 1, "lam": 4},
}
LABELS: dict[str, str] = {
    "sgd": "SGD (Nesterov 0.9, wd 1e-4)",
    "dessilbi": "DessiLBI (ν 100, λ 1, Nesterov 0.9, wd 1e-4)",
    "dessilbi_lam4": "DessiLBI (ν 100, λ 4, Nesterov 0.9, wd 1e-4)",
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



def _conv_selected(selected: dict[str, list[int]]) -> str:
    convs = [v for k, v in selected.items() if k != "fc.weight"]
    return f"{sum(v[0] for v in convs)} / {sum(v[1] for v in convs)}" if convs else "–"


def write_markdown(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lbi = [n for n in RUNS if n in results and RUNS[n]["optimizer"] == "dessilbi"]
    lines = [
        "# ResNet-20 on CIFAR-10: SGD vs DessiLBI",
        "",
        f"Budget: {args.epochs} epochs, batch {args.batch_size}, lr 0.1 with a cosine schedule "
        f"over the {args.epochs} epochs, Nesterov momentum 0.9, weight decay 1e-4 (weights only), "
        f"seed {args.seed}; data augmentation crop 32 (padding 4) + horizontal flip; CIFAR-10 "
        "from the JPEG copy (quality 75). DessiLBI: ν = 100, κ = 1, λ as given (no group "
        "scaling), filter groups on all convolutions, lasso on `fc`. CPU "
        f"({torch.get_num_threads()} thread(s), torch {torch.__version__}, {platform.machine()}).",
        "",
        "Produced by `.venv/bin/python benchmarks/cifar_resnet20.py "
        f"--data-dir {args.data_dir} --epochs {args.epochs} --batch-size {args.batch_size} "
        f"--threads {args.threads} --only {' '.join(n for n in RUNS if n in results)}`.",
        "",
        "| optimizer | epochs | dense W test acc (%) | sparse W̃ test acc (%) "
        "| selected conv filters | median epoch time (s) | median / SGD |",
        "|---|---|---|---|---|---|---|",
    ]
    sgd = results.get("sgd")
    for name in RUNS:
        if name not in results:
            continue
        r = results[name]
        median = r.get("median_epoch_time")
        median_ratio = (median / sgd["median_epoch_time"]
                        if sgd and median and sgd.get("median_epoch_time") else None)
        lines.append(
            f"| {r['label']} | {r['epochs']} | {fmt(r['test_acc'])} "
            f"| {fmt(r['test_acc_sparse'])} | {_conv_selected(r['selected'])} "
            f"| {fmt(median, 1)} | {fmt(median_ratio)} |"
        )
    lines += ["", "Epoch times exclude the first epoch (warm-up) and all evaluation; the runs ran "
              "one after the other on a "
              "machine shared with other work, so their ratio is only indicative (the step "
              "speed is measured side by side by `benchmarks/step_speed.py`)."]
    if lbi:
        lines += [
            "",
            "## Selected groups per layer (end of training)",
            "",
            "Conv layers: filters (groups W[i, ...]); `fc.weight`: single weights (lasso).",
            "",
            "| layer | " + " | ".join(results[n]["label"] for n in lbi) + " |",
            "|---|" + "---|" * len(lbi),
        ]
        for layer in results[lbi[0]]["selected"]:
            cells = [results[n]["selected"][layer] for n in lbi]
            lines.append(f"| {layer} | " + " | ".join(f"{c[0]} / {c[1]}" for c in cells) + " |")
        lines += [
            "",
            "## Path, epoch by epoch",
            "",
            "Test accuracy (%) of SGD, and per DessiLBI run: dense W / sparse W̃ / selected conv "
            "filters.",
            "",
            "| epoch | SGD | " + " | ".join(results[n]["label"] for n in lbi) + " |",
            "|---|---|" + "---|" * len(lbi),
        ]
        sgd_hist = {m["epoch"]: m for m in (sgd or {}).get("history", [])}
        hists = {n: {m["epoch"]: m for m in results[n]["history"]} for n in lbi}
        for epoch in sorted(set().union(*hists.values())):
            cells = []
            for n in lbi:
                m = hists[n].get(epoch)
                cells.append(f"{fmt(m['test_acc'])} / {fmt(m['test_acc_sparse'])} / "
                             f"{_conv_selected(m['selected'])}" if m else "–")
            sgd_m = sgd_hist.get(epoch)
            lines.append(f"| {epoch} | {fmt(sgd_m['test_acc'] if sgd_m else None)} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, epochs=20, data_dir="../shared/data/cifar10-jpeg",
                         runs_dir="runs/bench-cifar", out="benchmarks/results/cifar_resnet20.md")
    parser.add_argument("--batch-size", type=int, default=64)
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
