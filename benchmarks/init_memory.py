"""How much of its initialisation each conv filter still is, epoch by epoch, in recorded runs.

Usage (from the repository root; runs saved with per-epoch weights, as
``benchmarks/cifar_selective.py`` saves them)::

    .venv/bin/python benchmarks/init_memory.py runs/bench-selective/<run> [<run> ...]

While a group is out, DessiLBI's V grows by (lr/ν)·W_g a step, so V_g points where W_g has
been. Behind a batch norm the loss does not hold a filter's scale, and W_g(0) decays only through
the coupling's pull, by κ·lr/ν a step; until it has, V_g is mostly (lr/ν)·t·W_g(0), the same for
every filter of a wide layer up to its initial norm, and the layer enters at once. Per epoch and
coupled conv this prints the mean cosine between W_g and W_g(0) (1: still the initialisation)
and the mean ratio ‖W_g‖ / ‖W_g(0)‖, and the pull's time constant ν/(κ·lr) in epochs (at the
initial lr). The markdown goes to ``benchmarks/results/init_memory.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dessilbi.config import load_config


def _conv_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.flatten(1).double() for k, v in state.items()
            if k.endswith("weight") and v.dim() == 4}


def memory(run: Path) -> list[tuple[int, list[float], list[float]]]:
    """(epoch, cosine per conv, norm ratio per conv) for every saved epoch."""
    init = torch.load(run / "init.pt", weights_only=True)
    start = _conv_weights(init.get("model", init))
    out = []
    for path in sorted((run / "weights").glob("epoch_*.pt")):
        now = _conv_weights(torch.load(path, weights_only=True))
        cos = [float(F.cosine_similarity(now[n], w0, dim=1).mean()) for n, w0 in start.items()]
        ratio = [float((now[n].norm(dim=1) / w0.norm(dim=1)).mean()) for n, w0 in start.items()]
        out.append((int(path.stem.split("_")[1]), cos, ratio))
    return out


def _steps_per_epoch(run: Path) -> float:
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    return first["step"] / first["epoch"]


def describe(run: Path) -> list[str]:
    config = load_config(run / "config.yaml")
    steps = _steps_per_epoch(run)
    tau = config.nu / (config.kappa * config.lr)
    lines = [f"## `{run.name}`", "",
             f"ν {config.nu:g}, κ {config.kappa:g}, lr {config.lr:g}, {steps:.0f} steps an "
             f"epoch: the pull's time constant ν/(κ·lr) is {tau:.0f} steps, "
             f"{tau / steps:.1f} epochs; at equilibrium a filter turns by about "
             f"√(2κ·lr/ν) = {(2 / tau) ** 0.5:.3f} rad a step.", "",
             "| epoch | cos(W_g, W_g(0)), mean over filters: per conv | ‖W_g‖/‖W_g(0)‖: per conv |",
             "|---|---|---|"]
    for epoch, cos, ratio in memory(run):
        lines.append(f"| {epoch} | {' '.join(f'{c:.2f}' for c in cos)} | "
                     f"{' '.join(f'{r:.2f}' for r in ratio)} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/init_memory.md"))
    args = parser.parse_args()
    lines = ["# How much of its initialisation each filter still is", "",
             "Produced by `.venv/bin/python benchmarks/init_memory.py "
             + " ".join(str(r) for r in args.runs) + "`. Columns: the coupled convs in order.",
             ""]
    for run in args.runs:
        lines += describe(run)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
