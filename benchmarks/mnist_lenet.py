"""LeNet-5 on MNIST: SGD, Adam and DessiLBI under one budget, plus the training loop's overhead.

Usage (from the repository root; runs the trainings one after another):

    .venv/bin/python benchmarks/mnist_lenet.py --data-dir ../shared/data --epochs 30 \\
        --nu 20 --lam 1 --group-scaling sqrt_size --linear-structure filter --exclude fc2

(about 20 minutes on a shared 2-core CPU with one torch thread: ~3.5 s per LeNet-5 epoch).

Options: ``--only sgd_momentum dessilbi_momentum ...`` (a subset; earlier results with the same
budget are kept in the JSON file and the table), ``--nu`` / ``--lam`` / ``--group-scaling`` /
``--linear-structure`` / ``--exclude`` (the DessiLBI settings), ``--runs-dir`` (run
directories; a finished run is only read back), ``--out`` (the markdown table; the raw figures go
next to it as ``.json``), ``--threads`` (torch threads, default 1), ``--skip-bare`` (no bare-loop
timing; a bare-loop result already in the JSON file is kept).

What it measures. Seven runs of the shipped ``mnist_lenet5`` config (LeNet-5, MNIST pixels
scaled to [0, 1] and normalised, no augmentation, batch 128, seed 0) with the same number of
epochs and the same schedule: lr 0.1 (Adam: 1e-3) multiplied by 0.1 after 2/3 of the epochs.

- SGD plain (momentum 0), SGD momentum 0.9, SGD momentum 0.9 + weight decay 5e-4;
- Adam (lr 1e-3);
- DessiLBI plain, momentum 0.9, momentum 0.9 + weight decay 5e-4 (κ = 1; ν, λ, the group
  scaling, the structure of the fully connected layers and the uncoupled modules as given;
  coupled conv layers in filter groups).

Weight decay applies to weights only (biases: none, ``norm_weight_decay`` 0). For every run the
table gives the test accuracy of the dense weights W, of the sparse network W̃ = W ⊙ 1[Γ ≠ 0]
(DessiLBI), the selected filters of ``conv3`` (of 120), the mean training time per epoch
(metrics ``epoch_time``, first epoch left out as warm-up) and, for DessiLBI, that time over the
time of the SGD run with the same momentum / weight decay.

Loop overhead: it also times a bare hand-written PyTorch loop doing the same work as the
pipeline's SGD-momentum epoch (the same LeNet-5, MNIST as in-memory uint8 tensors normalised per
batch, batch 128, a fresh permutation, torch.optim.SGD momentum 0.9, no evaluation, no recording)
and reports pipeline epoch time / bare epoch time (the target is within 10 %, i.e. <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from _runs import fmt, mean_epoch_time, median_epoch_time, read_history
from dessilbi.config import load_config
from dessilbi.data import load_dataset
from dessilbi.models import build_model
from dessilbi.train import train

# name -> (label, config overrides, SGD run it is compared with)
RUNS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "sgd_plain": ("SGD", {"optimizer": "sgd", "momentum": 0.0}, None),
    "sgd_momentum": ("SGD momentum 0.9", {"optimizer": "sgd", "momentum": 0.9}, None),
    "sgd_momentum_wd": (
        "SGD momentum 0.9 + wd 5e-4",
        {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4},
        None,
    ),
    "adam": ("Adam (lr 1e-3)", {"optimizer": "adam", "lr": 1e-3}, None),
    "dessilbi_plain": ("DessiLBI", {"optimizer": "dessilbi", "momentum": 0.0}, "sgd_plain"),
    "dessilbi_momentum": (
        "DessiLBI momentum 0.9",
        {"optimizer": "dessilbi", "momentum": 0.9},
        "sgd_momentum",
    ),
    "dessilbi_momentum_wd": (
        "DessiLBI momentum 0.9 + wd 5e-4",
        {"optimizer": "dessilbi", "momentum": 0.9, "weight_decay": 5e-4},
        "sgd_momentum_wd",
    ),
}





def _structure_tag(args: argparse.Namespace) -> str:
    excl = "-x" + "+".join(args.exclude) if args.exclude else ""
    scale = "-sqrt" if args.group_scaling == "sqrt_size" else ""
    return f"nu{args.nu:g}-lam{args.lam:g}{scale}-lin{args.linear_structure}{excl}"


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    label, overrides, _ = RUNS[name]
    milestone = max(1, round(2 * args.epochs / 3))
    values: dict[str, Any] = {
        "kappa": 1,
        "weight_decay": 0.0,
        "norm_weight_decay": 0.0,
        **overrides,
        "data_dir": args.data_dir,
        "epochs": args.epochs,
        "batch_size": 128,
        "schedule": "multistep",
        "milestones": [milestone],
        "lr_decay": 0.1,
        "seed": args.seed,
        "device": "cpu",
        "out": args.runs_dir,
    }
    tag = f"{name}-e{args.epochs}-s{args.seed}"
    if overrides["optimizer"] == "dessilbi":
        values.update(nu=args.nu, lam=args.lam, group_scaling=args.group_scaling,
                      conv_structure="filter", linear_structure=args.linear_structure,
                      exclude=args.exclude)
        tag += "-" + _structure_tag(args)
    values["run_name"] = f"mnist-lenet5-{tag}"
    config = load_config("mnist_lenet5", values)
    result = train(config, quiet=True)
    history = read_history(Path(result.run_dir))
    last = history[-1]
    return {
        "name": name,
        "label": label,
        "config": config.to_dict(),
        "run_dir": str(result.run_dir),
        "epochs": last["epoch"],
        "test_acc": last["test_acc"],
        "test_acc_sparse": last["test_acc_sparse"],
        "selected": last["selected"],
        "mean_epoch_time": mean_epoch_time(history),
        "median_epoch_time": median_epoch_time(history),
        "history": history,
    }


def bare_loop_epoch_times(args: argparse.Namespace, epochs: int) -> list[float]:
    """Seconds per epoch of a hand-written loop doing the pipeline's SGD-momentum training work."""
    data = load_dataset("mnist", args.data_dir, "train")
    images, labels = data.images, data.labels  # uint8 [N, 1, 28, 28], int64 [N]
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    torch.manual_seed(args.seed)
    model = build_model("lenet5", num_classes=10, in_channels=1, image_size=28)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batch = 128
    times = []
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        for b in range(len(labels) // batch):
            idx = order[b * batch : (b + 1) * batch]
            x = (images[idx].float() / 255 - mean) / std
            loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    return times



def write_markdown(data: dict[str, Any], args: argparse.Namespace) -> str:
    results = data["runs"]
    milestone = max(1, round(2 * args.epochs / 3))
    fc = (f"linear layers `{args.linear_structure}`"
          + (f", {', '.join(args.exclude)} uncoupled" if args.exclude else ""))
    lines = [
        "# LeNet-5 on MNIST: SGD, Adam and DessiLBI under one budget",
        "",
        f"Budget (reduced from the paper's 60 epochs): {args.epochs} epochs, batch 128, "
        f"lr 0.1 (Adam 1e-3) × 0.1 after epoch {milestone}, seed {args.seed}, no augmentation, "
        "weight decay on weights only. "
        f"DessiLBI: κ = 1, λ = {args.lam:g}, group scaling `{args.group_scaling}`, "
        f"ν = {args.nu:g}, conv filter groups, {fc}. "
        f"CPU ({torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{platform.machine()}), a machine shared with other work, so times are noisy.",
        "",
        "Produced by `.venv/bin/python benchmarks/mnist_lenet.py "
        f"--data-dir {args.data_dir} --epochs {args.epochs} --nu {args.nu:g} "
        f"--lam {args.lam:g} --group-scaling {args.group_scaling} "
        f"--linear-structure {args.linear_structure} --threads {args.threads}"
        + (f" --exclude {' '.join(args.exclude)}" if args.exclude else "") + "`.",
        "",
        "| optimizer | dense W test acc (%) | sparse W̃ test acc (%) | conv3 filters selected "
        "(of 120) | mean epoch time (s) | epoch time / SGD | median epoch time (s) "
        "| median / SGD |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (_, _, sgd_name) in RUNS.items():
        if name not in results:
            continue
        r = results[name]
        conv3 = r["selected"].get("conv3.weight")
        ratio = median_ratio = None
        median = r.get("median_epoch_time")
        if sgd_name is not None and sgd_name in results:
            sgd = results[sgd_name]
            ratio = r["mean_epoch_time"] / sgd["mean_epoch_time"]
            if median and sgd.get("median_epoch_time"):
                median_ratio = median / sgd["median_epoch_time"]
        lines.append(
            f"| {r['label']} | {fmt(r['test_acc'])} | {fmt(r['test_acc_sparse'])} "
            f"| {conv3[0] if conv3 else '–'} | {fmt(r['mean_epoch_time'], 2)} "
            f"| {fmt(ratio)} | {fmt(median, 2)} | {fmt(median_ratio)} |"
        )
    lines += ["", "Epoch times exclude the first epoch (warm-up) and all evaluation; the "
              "machine was shared with other work, so the median is the steadier figure."]
    lbi = [n for n in RUNS if n.startswith("dessilbi") and n in results]
    if lbi:
        layers = list(results[lbi[0]]["selected"])
        lines += [
            "",
            "Selected groups per layer at the end (filters / neurons; single weights under "
            "`element`):",
            "",
            "| run | " + " | ".join(layers) + " |",
            "|---|" + "---|" * len(layers),
        ]
        for name in lbi:
            sel = results[name]["selected"]
            lines.append(f"| {results[name]['label']} | "
                         + " | ".join(f"{sel[k][0]} / {sel[k][1]}" for k in layers) + " |")
    bare = data.get("bare_loop")
    if bare:
        lines += [
            "",
            "## Training-loop overhead",
            "",
            f"Bare PyTorch loop (same LeNet-5, in-memory uint8 MNIST normalised per batch, "
            f"batch 128, SGD momentum 0.9, no eval or recording): epoch times "
            f"{', '.join(f'{t:.1f}' for t in bare['epoch_times'])} s; "
            f"measured {fmt(bare['epoch_time'], 2)} s (mean without the first). "
            f"Pipeline SGD momentum 0.9: {fmt(bare['pipeline_epoch_time'], 2)} s. "
            f"Ratio pipeline / bare = **{fmt(bare['ratio'], 3)}** (target ≤ 1.10).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: on a shared 2-core machine torch's "
                        "default of 2 threads ran 3-5x slower)")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--runs-dir", default="runs/bench-mnist")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mnist_lenet.md"))
    parser.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--nu", type=float, default=20.0)
    parser.add_argument("--linear-structure", default="filter",
                        choices=["filter", "channel", "element", "none"])
    parser.add_argument("--exclude", nargs="*", default=["fc2"],
                        help="module names left uncoupled in the DessiLBI runs, e.g. fc2")
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--group-scaling", default="sqrt_size", choices=["none", "sqrt_size"])
    parser.add_argument("--bare-epochs", type=int, default=3,
                        help="epochs of the bare loop (the first is warm-up)")
    parser.add_argument("--skip-bare", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    json_path = args.out.with_suffix(".json")
    data: dict[str, Any] = {"runs": {}}
    if json_path.is_file():  # keep runs of an earlier --only invocation with the same budget
        old = json.loads(json_path.read_text())
        if old.get("epochs") == args.epochs and old.get("seed") == args.seed:
            data = old
    data.update(epochs=args.epochs, seed=args.seed,
                args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        json_path.write_text(json.dumps(data, indent=1))
        args.out.write_text(write_markdown(data, args))

    for name in args.only:
        print(f"== {name}", flush=True)
        r = run_one(name, args)
        data["runs"][name] = r
        conv3 = r["selected"].get("conv3.weight")
        print(f"{name}: dense {r['test_acc']:.2f}% sparse {fmt(r['test_acc_sparse'])}% "
              f"conv3 {conv3} epoch {r['mean_epoch_time']:.2f} s", flush=True)
        save()
        if name == "sgd_momentum" and not args.skip_bare:
            # Right after the pipeline's SGD-momentum run, so both see similar machine load.
            times = bare_loop_epoch_times(args, args.bare_epochs)
            bare = statistics.mean(times[1:] if len(times) > 1 else times)
            data["bare_loop"] = {
                "epoch_times": times,
                "epoch_time": bare,
                "pipeline_epoch_time": r["mean_epoch_time"],
                "ratio": r["mean_epoch_time"] / bare,
            }
            print(f"bare loop: {times} -> ratio {r['mean_epoch_time'] / bare:.3f}", flush=True)
            save()
    print(args.out.read_text())


if __name__ == "__main__":
    main()
