"""LeNet-5 on MNIST: SGD, Adam and DessiLBI under one budget, plus the training loop's overhead.

Usage (from the repository root; runs the trainings one after another):

    .venv/bin/python benchmarks/mnist_lenet.py --data-dir ../shared/data --epochs 60 \\
        --nu 5 --lam 8

(about 35 minutes on a shared 2-core CPU with one torch thread: ~4 s per LeNet-5 epoch).

What it measures. Seven trainings of the shipped ``mnist_lenet5`` config (LeNet-5, MNIST pixels
scaled to [0, 1] and normalised, no augmentation, batch 128, seed 0) with the same number of
epochs and the same schedule (the paper's: the learning rate multiplied by 0.1 after 1/3 and
after 2/3 of the epochs, i.e. every 20 epochs of 60):

- SGD plain (lr ``--lr``), SGD momentum 0.9 and momentum 0.9 + weight decay 5e-4 (lr
  ``--momentum-lr``: with momentum 0.9 the step on a steady gradient is 10 lr, so lr 0.01 with
  momentum moves as far as lr 0.1 without), Adam (lr 1e-3);
- DessiLBI plain, momentum 0.9, momentum 0.9 + weight decay 5e-4 with the same learning rates,
  κ = 1, λ ``--lam``, filter groups on the coupled convolutions, the modules in ``--exclude``
  and (with ``--linear-structure none``) the fully connected layers uncoupled. ν is ``--nu`` at
  the plain learning rate and scaled with the learning rate for the momentum runs (ν = 2 at lr
  0.01 for ν = 20 at lr 0.1), so that the pull α/ν of the coupling per step is the same.

Weight decay applies to weights only (biases: none). For every run the table gives the test
accuracy of the dense weights W and (DessiLBI) of the sparse network W̃ = W ⊙ 1[Γ ≠ 0], and the
selected filters of ``conv3`` (of 120).

Speed. Epoch times of separate trainings on a shared machine differ by 5-10 % from load alone,
so the speed figures come from a separate, interleaved measurement: ``--timing-rounds`` rounds,
each training every one of the seven configurations for one more epoch (``train`` resumed from its
checkpoint, so it is the pipeline's own loop) and one epoch of a bare hand-written PyTorch loop
doing the SGD-momentum run's work (the same LeNet-5, MNIST as in-memory uint8 tensors normalised
per batch, batch 128, a fresh permutation, ``torch.optim.SGD``, no evaluation or recording). The
order is reversed every other round (an odd number of rounds, so that the kept ones run in
each order equally often), the first round is warm-up, and a ratio is the sum of one
run's epoch times over the sum of the other's over the same rounds. Targets: DessiLBI / SGD
<= 1.05, pipeline SGD / bare loop <= 1.10.

Options: ``--only NAME ...`` (a subset of the accuracy runs; earlier results with the same budget
stay in the JSON file and the table), ``--runs-dir`` (a finished run is only read back),
``--out`` (the markdown table; the raw figures go next to it as ``.json``), ``--threads`` (torch
threads, default 1), ``--timing-rounds 0`` (no speed measurement; an earlier one is kept),
``--only`` with no names (only the speed measurement), ``--timing-from-epoch K`` (time epochs
K+1, ... instead of the first ones: late epochs, where the unselected weights have decayed).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from _runs import add_common_arguments, fmt, read_history
from dessilbi.config import TrainConfig, load_config
from dessilbi.data import load_dataset
from dessilbi.models import build_model
from dessilbi.train import train


@dataclass(frozen=True)
class Run:
    label: str
    optimizer: str
    momentum: float = 0.0
    weight_decay: float = 0.0
    baseline: str | None = None  # the SGD run whose speed it is compared with


RUNS: dict[str, Run] = {
    "sgd_plain": Run("SGD", "sgd"),
    "sgd_momentum": Run("SGD momentum 0.9", "sgd", 0.9),
    "sgd_momentum_wd": Run("SGD momentum 0.9 + wd 5e-4", "sgd", 0.9, 5e-4),
    "adam": Run("Adam", "adam"),
    "dessilbi_plain": Run("DessiLBI", "dessilbi", baseline="sgd_plain"),
    "dessilbi_momentum": Run("DessiLBI momentum 0.9", "dessilbi", 0.9, baseline="sgd_momentum"),
    "dessilbi_momentum_wd": Run(
        "DessiLBI momentum 0.9 + wd 5e-4", "dessilbi", 0.9, 5e-4, baseline="sgd_momentum_wd"
    ),
}


def milestones(epochs: int) -> list[int]:
    """The paper's MNIST schedule, scaled: × 0.1 after 1/3 and after 2/3 of the epochs."""
    return sorted({max(1, round(epochs / 3)), max(1, round(2 * epochs / 3))})


def run_lr(run: Run, args: argparse.Namespace) -> float:
    if run.optimizer == "adam":
        return 1e-3
    return args.momentum_lr if run.momentum else args.lr


def make_config(name: str, args: argparse.Namespace, *, epochs: int, out: str) -> TrainConfig:
    """The configuration of run ``name`` (the schedule always follows ``args.epochs``)."""
    run = RUNS[name]
    lr = run_lr(run, args)
    values: dict[str, Any] = {
        "optimizer": run.optimizer,
        "lr": lr,
        "momentum": run.momentum,
        "weight_decay": run.weight_decay,
        "norm_weight_decay": 0.0,
        "kappa": 1,
        # The recorded results normalise the inputs (the mnist_lenet5 config now scales pixels
        # to [0, 1] only, as the paper's script did).
        "normalize": True,
        "data_dir": args.data_dir,
        "epochs": epochs,
        "batch_size": 128,
        "schedule": "multistep",
        "milestones": milestones(args.epochs),
        "lr_decay": 0.1,
        "seed": args.seed,
        "device": "cpu",
        "out": out,
        "run_name": f"mnist-lenet5-{name}-e{args.epochs}-s{args.seed}",
    }
    if run.optimizer == "dessilbi":
        nu = args.nu * lr / args.lr
        values.update(nu=nu, lam=args.lam, group_scaling=args.group_scaling,
                      conv_structure="filter", linear_structure=args.linear_structure,
                      exclude=args.exclude)
        excl = "-x" + "+".join(args.exclude) if args.exclude else ""
        values["run_name"] += (f"-nu{nu:g}-lam{args.lam:g}-{args.group_scaling}"
                               f"-lin{args.linear_structure}{excl}")
    return load_config("mnist_lenet5", values)


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    config = make_config(name, args, epochs=args.epochs, out=args.runs_dir)
    result = train(config, quiet=True)
    history = read_history(Path(result.run_dir))
    last = history[-1]
    return {
        "name": name,
        "label": RUNS[name].label,
        "config": config.to_dict(),
        "run_dir": str(result.run_dir),
        "epochs": last["epoch"],
        "test_acc": last["test_acc"],
        "test_acc_sparse": last["test_acc_sparse"],
        "train_acc": last["train_acc"],
        "selected": last["selected"],
        "history": history,
    }


class BareLoop:
    """A hand-written PyTorch loop doing the pipeline's SGD-momentum work, one epoch at a time."""

    def __init__(self, args: argparse.Namespace) -> None:
        data = load_dataset("mnist", args.data_dir, "train")
        self.images, self.labels = data.images, data.labels  # uint8 [N, 1, 28, 28], int64 [N]
        self.mean = torch.tensor(data.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std).view(1, -1, 1, 1)
        self.seed, self.lr = args.seed, args.momentum_lr
        self.epochs_done = 0

    def epoch(self) -> float:
        """Train one epoch with a freshly built model and optimizer; return its seconds.

        Fresh every round, like the pipeline's runs, which are rebuilt from their checkpoints for
        every timed epoch: both sides pay the first steps after set-up in every round.
        """
        torch.manual_seed(self.seed)
        model = build_model("lenet5", num_classes=10, in_channels=1, image_size=28)
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9)
        batch = 128
        model.train()
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(self.epochs_done)
        order = torch.randperm(len(self.labels), generator=gen)
        for b in range(len(self.labels) // batch):
            idx = order[b * batch : (b + 1) * batch]
            x = (self.images[idx].float() / 255 - self.mean) / self.std
            loss = F.cross_entropy(model(x), self.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        self.epochs_done += 1
        return time.perf_counter() - start


def interleaved_timing(args: argparse.Namespace) -> dict[str, Any]:
    """Epoch times of every run and of the bare loop, measured round by round side by side."""
    timing_dir = Path(args.runs_dir) / "timing"
    shutil.rmtree(timing_dir, ignore_errors=True)  # always a fresh measurement
    bare = BareLoop(args)
    names = ["bare_loop", *RUNS]
    times: dict[str, list[float]] = {name: [] for name in names}
    start = args.timing_from_epoch
    for name in RUNS if start else ():
        # Untimed: late epochs are slower where unselected weights have decayed (subnormals).
        train(make_config(name, args, epochs=start, out=str(timing_dir)), quiet=True)
    for rnd in range(args.timing_rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
            if name == "bare_loop":
                times[name].append(bare.epoch())
                continue
            config = make_config(name, args, epochs=start + rnd + 1, out=str(timing_dir))
            run_dir = timing_dir / str(config.run_name)
            train(config, quiet=True, resume_dir=run_dir if rnd or start else None)
            times[name].append(read_history(run_dir)[-1]["epoch_time"])
        print(f"timing round {rnd + 1}/{args.timing_rounds}: "
              + ", ".join(f"{n} {times[n][-1]:.2f}" for n in names), flush=True)
    kept = {name: t[1:] for name, t in times.items()}  # round 1 is warm-up

    def ratio(a: str, b: str) -> float:
        return sum(kept[a]) / sum(kept[b])

    def round_ratios(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(kept[a], kept[b], strict=True)]

    return {
        "rounds": args.timing_rounds,
        "first_epoch": start + 1,
        "epoch_times": times,
        "mean_epoch_time": {name: statistics.mean(t) for name, t in kept.items()},
        "ratio_to_sgd": {
            name: ratio(name, run.baseline) for name, run in RUNS.items() if run.baseline
        },
        "round_ratios_to_sgd": {
            name: round_ratios(name, run.baseline) for name, run in RUNS.items() if run.baseline
        },
        "pipeline_over_bare": ratio("sgd_momentum", "bare_loop"),
        "round_ratios_pipeline_over_bare": round_ratios("sgd_momentum", "bare_loop"),
    }


def command_line(args: argparse.Namespace) -> str:
    parts = [".venv/bin/python benchmarks/mnist_lenet.py", f"--data-dir {args.data_dir}",
             f"--epochs {args.epochs}", f"--seed {args.seed}", f"--lr {args.lr:g}",
             f"--momentum-lr {args.momentum_lr:g}",
             f"--nu {args.nu:g}", f"--lam {args.lam:g}", f"--group-scaling {args.group_scaling}",
             f"--linear-structure {args.linear_structure}", f"--threads {args.threads}"]
    if args.exclude:
        parts.append("--exclude " + " ".join(args.exclude))
    return " ".join(parts)


def write_markdown(data: dict[str, Any], args: argparse.Namespace) -> str:
    results = data["runs"]
    timing = data.get("timing")
    uncoupled = [*args.exclude] + (["fully connected layers"]
                                   if args.linear_structure == "none" else [])
    lines = [
        "# LeNet-5 on MNIST: SGD, Adam and DessiLBI under one budget",
        "",
        f"Budget: {args.epochs} epochs, batch 128, learning rate × 0.1 after epochs "
        f"{' and '.join(map(str, milestones(args.epochs)))}, "
        f"seed {args.seed}, no augmentation. Learning rates: {args.lr:g} without momentum, "
        f"{args.momentum_lr:g} with momentum 0.9, Adam 1e-3. Weight decay on weights only. "
        f"DessiLBI: κ = 1, λ = {args.lam:g} (group scaling `{args.group_scaling}`), "
        f"ν = {args.nu:g} at lr {args.lr:g} and {args.nu * args.momentum_lr / args.lr:g} at lr "
        f"{args.momentum_lr:g} (the same pull α/ν per step), filter groups on the convolutions"
        + (f"; uncoupled: {', '.join(uncoupled)}" if uncoupled else "")
        + (f"; linear layers `{args.linear_structure}`" if args.linear_structure != "none" else "")
        + f". CPU ({args.threads} torch thread(s), torch {torch.__version__}, "
        f"{platform.machine()}).",
        "",
        f"Produced by `{command_line(args)} --timing-rounds "
        f"{timing['rounds'] if timing else 0}"
        + (f" --timing-from-epoch {timing['first_epoch'] - 1}"
           if timing and timing.get("first_epoch", 1) > 1 else "")
        + "` (runs "
        "already finished in `--runs-dir` are read back).",
        "",
        "| optimizer | dense W test acc (%) | sparse W̃ test acc (%) | conv3 filters selected "
        "(of 120) | train acc (%) | epoch time (s) | epoch time / SGD's |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in RUNS:
        if name not in results:
            continue
        r = results[name]
        conv3 = r["selected"].get("conv3.weight")
        epoch_time = timing["mean_epoch_time"].get(name) if timing else None
        ratio = timing["ratio_to_sgd"].get(name) if timing else None
        lines.append(
            f"| {r['label']} | {fmt(r['test_acc'])} | {fmt(r['test_acc_sparse'])} "
            f"| {conv3[0] if conv3 else '–'} | {fmt(r.get('train_acc'))} "
            f"| {fmt(epoch_time, 2)} | {fmt(ratio, 3)} |"
        )
    lbi = [n for n in RUNS if n.startswith("dessilbi") and n in results]
    if lbi:
        layers = list(results[lbi[0]]["selected"])
        lines += [
            "",
            "Selected groups per coupled layer at the end:",
            "",
            "| run | " + " | ".join(layers) + " |",
            "|---|" + "---|" * len(layers),
        ]
        for name in lbi:
            sel = results[name]["selected"]
            lines.append(f"| {results[name]['label']} | "
                         + " | ".join(f"{sel[k][0]} / {sel[k][1]}" for k in layers) + " |")
        lines += ["", "Path of the sparse network, epoch by epoch (W̃ test accuracy % / conv3 "
                  "filters selected):", "", "| epoch | " + " | ".join(
                      results[n]["label"] for n in lbi) + " |", "|---|" + "---|" * len(lbi)]
        for i in range(max(len(results[n]["history"]) for n in lbi)):
            cells = []
            for n in lbi:
                hist = results[n]["history"]
                if i < len(hist):
                    m = hist[i]
                    cells.append(f"{fmt(m['test_acc_sparse'])} / "
                                 f"{m['selected'].get('conv3.weight', ['–'])[0]}")
                else:
                    cells.append("–")
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    if timing:
        kept = timing["rounds"] - 1
        lines += [
            "",
            "## Speed, measured side by side",
            "",
            f"Epoch times of the training loop (no evaluation), from {timing['rounds']} "
            f"interleaved rounds of one epoch per run (epochs {timing.get('first_epoch', 1)}"
            f"–{timing.get('first_epoch', 1) + timing['rounds'] - 1}; first round left out, "
            f"{kept} kept); a "
            "ratio is the sum of one run's epoch times over its baseline's over the same rounds.",
            "",
            "| run | epoch time (s) | ratio | per-round ratios |",
            "|---|---|---|---|",
        ]
        for name, run in RUNS.items():
            if run.baseline:
                rounds = ", ".join(f"{x:.3f}" for x in timing["round_ratios_to_sgd"][name])
                lines.append(
                    f"| {run.label} / {RUNS[run.baseline].label} "
                    f"| {fmt(timing['mean_epoch_time'][name], 2)} "
                    f"| **{timing['ratio_to_sgd'][name]:.3f}** (target ≤ 1.05) | {rounds} |"
                )
        rounds = ", ".join(f"{x:.3f}" for x in timing["round_ratios_pipeline_over_bare"])
        lines.append(
            f"| pipeline SGD momentum / bare PyTorch loop "
            f"| {fmt(timing['mean_epoch_time']['bare_loop'], 2)} (bare) "
            f"| **{timing['pipeline_over_bare']:.3f}** (target ≤ 1.10) | {rounds} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, epochs=60, data_dir="../shared/data",
                         runs_dir="runs/bench-mnist", out="benchmarks/results/mnist_lenet.md")
    parser.add_argument("--only", nargs="*", choices=list(RUNS), default=list(RUNS),
                        help="accuracy runs to do (none: only the speed measurement)")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate without momentum")
    parser.add_argument("--momentum-lr", type=float, default=0.01,
                        help="learning rate of the momentum runs")
    parser.add_argument("--nu", type=float, default=5.0, help="DessiLBI ν at --lr")
    parser.add_argument("--lam", type=float, default=8.0)
    parser.add_argument("--group-scaling", default="none", choices=["none", "sqrt_size"])
    parser.add_argument("--linear-structure", default="none",
                        choices=["filter", "channel", "element", "none"])
    parser.add_argument("--exclude", nargs="*", default=["conv1", "conv2"],
                        help="module names left uncoupled in the DessiLBI runs")
    parser.add_argument("--timing-from-epoch", type=int, default=0,
                        help="train every run this many epochs before the timed rounds (to "
                        "time late epochs, where the unselected weights have decayed)")
    parser.add_argument("--timing-rounds", type=int, default=5,
                        help="rounds of the interleaved speed measurement: 0 (none) or an odd "
                        "number >= 3, so that the kept rounds run in each order equally often")
    args = parser.parse_args()
    if args.timing_rounds != 0 and (args.timing_rounds < 3 or args.timing_rounds % 2 == 0):
        parser.error(f"--timing-rounds must be 0 or an odd number >= 3, got {args.timing_rounds}")
    torch.set_num_threads(args.threads)

    json_path = args.out.with_suffix(".json")
    data: dict[str, Any] = {"runs": {}}
    if json_path.is_file():  # keep runs of an earlier --only invocation with the same settings
        old = json.loads(json_path.read_text())
        if old.get("command") == command_line(args):
            data = old
    data.update(epochs=args.epochs, seed=args.seed, command=command_line(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        json_path.write_text(json.dumps(data, indent=1))
        args.out.write_text(write_markdown(data, args))

    save()
    for name in args.only:
        print(f"== {name}", flush=True)
        r = run_one(name, args)
        data["runs"][name] = r
        conv3 = r["selected"].get("conv3.weight")
        print(f"{name}: dense {r['test_acc']:.2f}% sparse {fmt(r['test_acc_sparse'])}% "
              f"conv3 {conv3}", flush=True)
        save()
    if args.timing_rounds > 0:
        data["timing"] = interleaved_timing(args)
        save()
    print(args.out.read_text())


if __name__ == "__main__":
    main()
