"""Epoch time of DessiLBI against SGD late in training, with and without flushing subnormals.

Usage (from the repository root; about 10 minutes on one thread):

    .venv/bin/python benchmarks/subnormal_speed.py --data-dir ../shared/data --epochs 14

The DessiLBI coupling pulls the weights of unselected filters geometrically toward zero, and on a
CPU they (and their momentum buffers) end in the float32 subnormal range, where arithmetic is
many times slower. This benchmark trains the shipped ``mnist_lenet5_sparse`` config (LeNet-5 on
MNIST, conv3's filters coupled) with DessiLBI and with ``--optimizer sgd``, each once with
``flush_denormal: false`` (the training loop before the fix) and once with the default
``flush_denormal: true``. The four runs advance one epoch at a time in turn (the order reversed
every other round), so each epoch's times are measured side by side; a ratio is the sum of one
run's epoch times over another's over the same epochs: early (2-4) and late (the last four).

It also counts the subnormal conv3 weights and momentum-buffer entries in the final checkpoints,
and times one forward and backward pass of LeNet-5 at batch 128 from the unflushed DessiLBI
run's final weights, as loaded and with subnormals flushed. Finished runs are read back when the
benchmark is rerun; the table goes to ``--out`` and the raw figures next to it as ``.json``.
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

from _runs import add_common_arguments, advance, fmt
from dessilbi.config import load_config
from dessilbi.data import load_dataset
from dessilbi.models import build_model

TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32
RUNS: dict[str, dict[str, Any]] = {
    "dessilbi_noflush": {"optimizer": "dessilbi", "flush_denormal": False},
    "sgd_noflush": {"optimizer": "sgd", "flush_denormal": False},
    "dessilbi_flush": {"optimizer": "dessilbi", "flush_denormal": True},
    "sgd_flush": {"optimizer": "sgd", "flush_denormal": True},
}


def _config(name: str, epochs: int, args: argparse.Namespace) -> Any:
    return load_config("mnist_lenet5_sparse", {
        **RUNS[name], "data_dir": args.data_dir, "epochs": epochs, "seed": args.seed,
        "device": "cpu", "out": args.runs_dir, "run_name": f"{name}-s{args.seed}",
    })


def _subnormals(t: torch.Tensor) -> int:
    return int(((t != 0) & (t.abs() < TINY)).sum())


def _pass_times(weights: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of one forward+backward pass at batch 128, as loaded and flushed."""
    model = build_model("lenet5", num_classes=10, in_channels=1, image_size=28)
    model.load_state_dict(weights)
    data = load_dataset("mnist", args.data_dir, "train")
    x = data.images[:128].float() / 255
    y = data.labels[:128]
    times: dict[str, list[float]] = {"as loaded": [], "flushed": []}
    for rep in range(2 * args.pass_reps):
        mode = "as loaded" if rep % 2 == 0 else "flushed"
        torch.set_flush_denormal(mode == "flushed")
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        times[mode].append(time.perf_counter() - start)
    torch.set_flush_denormal(False)
    return {mode: statistics.median(t[1:]) for mode, t in times.items()}


def _ratio(hists: dict[str, list[dict[str, Any]]], a: str, b: str, epochs: range) -> float:
    def total(name: str) -> float:
        return sum(m["epoch_time"] for m in hists[name] if m["epoch"] in epochs)

    return total(a) / total(b)


def write_markdown(data: dict[str, Any], args: argparse.Namespace) -> str:
    hists = data["histories"]
    done = min(len(h) for h in hists.values())
    early, late = range(2, min(done, 4) + 1), range(max(2, done - 3), done + 1)
    lines = [
        "# Subnormal floats: DessiLBI against SGD late in training",
        "",
        f"`mnist_lenet5_sparse` (LeNet-5 on MNIST, conv3 coupled), {done} epochs, seed "
        f"{args.seed}, CPU ({args.threads} thread(s), torch {torch.__version__}, "
        f"{platform.machine()}); the four runs advanced one epoch at a time in turn.",
        "",
        f"Produced by `.venv/bin/python benchmarks/subnormal_speed.py --data-dir {args.data_dir} "
        f"--epochs {args.epochs} --threads {args.threads}`.",
        "",
        "| subnormals | epoch-time ratio DessiLBI / SGD, epochs "
        f"{early.start}–{early.stop - 1} | epochs {late.start}–{late.stop - 1} "
        "| subnormal conv3 weights / momentum entries (end) |",
        "|---|---|---|---|",
    ]
    for tag, label in (("noflush", "kept (before the fix)"), ("flush", "flushed (the fix)")):
        counts = data["subnormals"].get(f"dessilbi_{tag}", {})
        lines.append(
            f"| {label} | {fmt(_ratio(hists, f'dessilbi_{tag}', f'sgd_{tag}', early), 3)} "
            f"| {fmt(_ratio(hists, f'dessilbi_{tag}', f'sgd_{tag}', late), 3)} "
            f"| {counts.get('weight', '–')} / {counts.get('momentum', '–')} |"
        )
    lines += [
        "",
        f"DessiLBI flushed / kept, epochs {late.start}–{late.stop - 1}: "
        f"{fmt(_ratio(hists, 'dessilbi_flush', 'dessilbi_noflush', late), 3)}; SGD flushed / "
        f"kept: {fmt(_ratio(hists, 'sgd_flush', 'sgd_noflush', late), 3)}.",
    ]
    passes = data.get("pass_times")
    if passes:
        lines += ["", "One forward and backward pass of LeNet-5 at batch 128 from the final "
                  "weights of the unflushed DessiLBI run (median of "
                  f"{args.pass_reps - 1}): {passes['as loaded'] * 1e3:.1f} ms as loaded, "
                  f"{passes['flushed'] * 1e3:.1f} ms with subnormals flushed."]
    lines += ["", "Epoch times (s):", "", "| epoch | " + " | ".join(hists) + " |",
              "|---|" + "---|" * len(hists)]
    for e in range(done):
        lines.append(f"| {e + 1} | " + " | ".join(f"{h[e]['epoch_time']:.2f}"
                                                  for h in hists.values()) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, epochs=14, data_dir="../shared/data",
                         runs_dir="runs/bench-subnormal",
                         out="benchmarks/results/subnormal_speed.md")
    parser.add_argument("--pass-reps", type=int, default=31)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    hists: dict[str, list[dict[str, Any]]] = {}
    names = list(RUNS)
    for k in range(1, args.epochs + 1):
        for name in names if k % 2 else names[::-1]:
            hists[name] = advance(_config(name, k, args))
        print(f"round {k}: " + ", ".join(f"{n} {h[-1]['epoch_time']:.2f}"
                                         for n, h in hists.items()), flush=True)
    data: dict[str, Any] = {"histories": {n: hists[n] for n in RUNS}, "subnormals": {}}
    for name in RUNS:
        if RUNS[name]["optimizer"] == "dessilbi":
            ckpt = torch.load(Path(args.runs_dir) / f"{name}-s{args.seed}" / "checkpoint.pt",
                              weights_only=True)
            conv3 = ckpt["model"]["conv3.weight"]
            state = next(s for s in ckpt["optimizer"]["state"].values()
                         if s["momentum_buffer"].shape == conv3.shape)
            data["subnormals"][name] = {"weight": _subnormals(conv3),
                                        "momentum": _subnormals(state["momentum_buffer"])}
            if name == "dessilbi_noflush":
                data["pass_times"] = _pass_times(ckpt["model"], args)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    args.out.write_text(write_markdown(data, args))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
