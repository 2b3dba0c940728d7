"""A training run with a mask held fixed by a step callback, as a subprocess for resume tests.

Usage: ``python tests/masked_run.py OUT [--epochs N] [--pause-at-step K] [--no-hold]``

DessiLBI with Nesterov momentum and weight decay on the digits CNN; every other entry of
``conv2``'s weight and the biases of its odd filters are masked out (entries, not whole filters:
a filter whose weights and bias are all zero gets no gradient through its ReLU, and would stay at
zero without any help). With the mask held (the default), a second
callback checks after every step that every masked entry is exactly zero and exits with status 3
if not. ``--no-hold`` zeroes the mask once at the start only (the control: momentum and weight
decay then move the pruned weights off zero). ``--pause-at-step K`` prints ``paused at step K``
after step K and sleeps, so that a test can kill the run at a known point.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from dessilbi.callbacks import Callback, FixedMask
from dessilbi.config import load_config
from dessilbi.masks import apply_masks
from dessilbi.run_state import TrainingRun
from dessilbi.train import train


def conv2_masks() -> dict[str, torch.Tensor]:
    """Keep every other entry of conv2's weight and the biases of its even filters."""
    return {
        "conv2.weight": (torch.arange(32 * 16 * 9) % 2 == 0).view(32, 16, 3, 3),
        "conv2.bias": torch.arange(32) % 2 == 0,
    }


class CheckZero(Callback):
    """Fails the run as soon as a masked entry is not exactly zero after a step.

    With ``pause_at``, it also prints a line after that step and sleeps there (stateless, so
    the killed run and its resumption hold the same callbacks).
    """

    def __init__(self, masks: dict[str, torch.Tensor], pause_at: int = 0) -> None:
        self.masks = masks
        self.pause_at = pause_at

    def on_step_end(self, run: TrainingRun) -> None:
        params = dict(run.model.named_parameters())
        for name, keep in self.masks.items():
            if bool((params[name].detach()[~keep] != 0).any()):
                print(f"masked entries of {name} moved off zero at step {run.step}", flush=True)
                sys.exit(3)
        if run.step == self.pause_at:
            print(f"paused at step {run.step}", flush=True)
            time.sleep(300)


class ZeroOnce(Callback):
    """The control: the mask is applied once at the start and then left alone."""

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks

    def on_train_start(self, run: TrainingRun) -> None:
        if run.step == 0:
            apply_masks(run.model, self.masks, run.optimizer)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--pause-at-step", type=int, default=0)
    parser.add_argument("--no-hold", action="store_true")
    args = parser.parse_args()
    config = load_config("digits", {
        "epochs": args.epochs, "nu": 5, "nesterov": True, "weight_decay": 1e-3,
        "norm_weight_decay": 1e-3, "out": str(args.out), "run_name": "masked",
    })
    masks = conv2_masks()
    callbacks: list[Callback] = (
        [ZeroOnce(masks)] if args.no_hold
        else [FixedMask(masks), CheckZero(masks, args.pause_at_step)]
    )
    result = train(config, quiet=True, callbacks=callbacks)
    print(f"done {result.epochs} {result.test_acc:.2f}", flush=True)


if __name__ == "__main__":
    main()
