"""A selective DessiLBI path on CIFAR-10 (ResNet-20, VGG-16-BN), and whether it is data-driven.

Usage (from the repository root; the training runs can go in parallel, one per core)::

    .venv/bin/python benchmarks/cifar_selective.py train --only dessilbi
    .venv/bin/python benchmarks/cifar_selective.py train --only sgd
    .venv/bin/python benchmarks/cifar_selective.py compare
    .venv/bin/python benchmarks/cifar_selective.py train --only bn     # Γ on the BN scales
    .venv/bin/python benchmarks/cifar_selective.py compare --variant bn
    .venv/bin/python benchmarks/cifar_selective.py train --model vgg16_bn --train-subset 12000 \
        --epochs 15 --only dessilbi sgd                               # and compare, the same
    .venv/bin/python benchmarks/cifar_selective.py train --model vgg16_bn --train-subset 12000 \
        --only steps sgd_b32            # batch 32; compare --variant steps --baseline sgd_b32

``train`` runs the shipped ``cifar10_<model>_selective`` config (``selection_start``: every
coupled layer starts selecting in one epoch, λ calibrated per layer; classifier uncoupled) in
two variants, and SGD with the same budget and schedule, bf16 autocast + channels-last on CPU,
saving the DessiLBI runs' weights after every epoch (``weights/epoch_NNN.pt`` in the run
directory). Every finished run's per-epoch records are kept in ``benchmarks/results/runs/``;
an SGD run recorded there is not trained again (compare needs only its numbers). The
variants: ``dessilbi`` couples Γ to the conv filters, ``bn`` to the batch-norm scales (one
group per channel, the convs uncoupled). A finished run is only read back; an
interrupted one resumes.

``compare`` takes the epochs at which Γ's support holds about 70 % and 50 % of the channels
and evaluates, from the weights of that epoch and without any fine-tuning, the pruned network
(unselected filters, their biases and batch-norm affine zeroed) for masks with the same
per-layer counts: DessiLBI's support, the largest-L1-norm filters of the same weights, the
largest batch-norm scales |γ| (network slimming's criterion) and seeded random filters (mean of
three seeds). Results go to ``benchmarks/results/`` (markdown and JSON), with the per-epoch
selection per layer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _runs import advance, record_path, run_directory
from dessilbi.callbacks import Callback
from dessilbi.config import TrainConfig, load_config
from dessilbi.run_files import atomic_save
from dessilbi.run_state import TrainingRun

# The first runs were calibrated by the straight line through ‖V‖ (`linear`), which the
# recorded results used; `schedule` extrapolates W(0)'s saturating part and the data's at the
# schedule's lr (docs/selection.md).
_LINE = {"selection_extrapolation": "linear"}

# ResNet-20's batch norms on the residual stream: the stem's and every block's last (bn2) and
# shortcut's, whose channels the additions tie together.
_RESNET_RESIDUAL_STREAM = ["bn1", "layer*.bn2", "layer*.shortcut.*"]


def _affine_b32(norm_nu: float, calibration: int = 2, start: int = 4, **extra: object) -> dict:
    """Γ on each channel's batch-norm scale and shift at batch 32 (`schedule` extrapolation)."""
    return {"conv_structure": None, "norm_structure": "affine", "norm_nu": norm_nu,
            "selection_calibration": calibration, "selection_start": start, "batch_size": 32,
            "selection_extrapolation": "schedule", **extra}


RUNS = {
    # The config's first settings (ResNet-20: the shipped config now starts in epoch 7, `late`).
    "dessilbi": {"selection_start": 4, "selection_calibration": 1, **_LINE},
    "sgd": {"optimizer": "sgd"},
    # Γ on the batch-norm scales instead of the filters: one group per channel.
    "bn": {"conv_structure": None, "norm_structure": "element", **_LINE},
    # Calibrated over epoch 3, after the first epochs' transient, for a start in epoch 6.
    "dessilbi_c3": {"selection_calibration": 3, "selection_start": 6, **_LINE},
    # A ten times stronger pull (nu 10): W_g forgets its initialisation within about 1/(lr/nu)
    # steps, so by the calibration (epoch 3) V grows with what the data made of W_g; a later start.
    "pull": {"nu": 10, "selection_calibration": 3, "selection_start": 7, **_LINE},
    # Calibrated over epoch 3 (after the pull's time constant) for a start in epoch 7: what
    # cifar10_resnet20_selective ships.
    "late": {"selection_calibration": 3, "selection_start": 7, **_LINE},
    # Calibrated after the pull has settled: behind batch norm, W_g forgets W_g(0) over the
    # pull's time constant nu/(kappa*lr) steps, and at equilibrium turns by sqrt(2*kappa*lr/nu)
    # radians a step. nu 40 at lr 0.05 (VGG): 800 steps (the 0.05 rad a step ResNet-20 trains
    # well with at nu 100, lr 0.1), 4.3 epochs of a 12,000-image subset; calibrated over epoch 6.
    "settled": {"nu": 40, "selection_calibration": 6, "selection_start": 10, **_LINE},
    # As `settled`, but extrapolated by the schedule (W(0)'s part saturating, the data's at the
    # cosine's lr), for a start right after the calibration.
    "schedule": {"nu": 40, "selection_calibration": 6, "selection_start": 7},
    # And with every filter of a layer starting at the same norm (equal_filter_norms): W(0)'s
    # offset in V is then the same for all of them.
    "equal": {"nu": 40, "selection_calibration": 6, "selection_start": 7,
              "equal_filter_norms": True},
    # More steps for the same pull: batch 32 gives 375 steps an epoch of the 12,000-image
    # subset, so the pull's time constant (800 steps at nu 40, lr 0.05) is 2.1 epochs and W(0)'s
    # offset is 94 % saturated by the calibration (epoch 6), 98 % by the start (epoch 8);
    # ResNet-20's shipped run had 5.5 time constants before its start. SGD at the same batch.
    "steps": {"nu": 40, "selection_calibration": 6, "selection_start": 8,
              "equal_filter_norms": True, "batch_size": 32},
    # As `steps`, for a start right after the calibration: more of the run to select in.
    "steps_e7": {"nu": 40, "selection_calibration": 6, "selection_start": 7,
                 "equal_filter_norms": True, "batch_size": 32},
    # As `steps`, with every filter starting at a tenth of its norm (filter_norm_scale; behind
    # the batch norms the network computes the same): about where the pull settles the wide
    # layers' filters anyway (10-13 % of Kaiming's norm at nu 40), so W(0)'s offset in V, which
    # tends to W(0)/kappa, is a tenth, and the data's part of V decides the entries.
    "small": {"nu": 40, "selection_calibration": 6, "selection_start": 8,
              "equal_filter_norms": True, "filter_norm_scale": 0.1, "batch_size": 32},
    # As `steps`, the filters started at 0.3 of their (equalised) norm: between `steps` (W(0)'s
    # share of λ up to 0.96, a burst in the wide layers) and `small` (0.01-0.07, 29 filters).
    "scaled": {"nu": 40, "selection_calibration": 6, "selection_start": 8,
               "equal_filter_norms": True, "filter_norm_scale": 0.3, "batch_size": 32},
    # As `steps_e7` (a start right after the calibration), the filters started at 0.6 of their
    # (equalised) norm: W(0)'s share of λ expected about halved from `steps`, so that the wide
    # layers no longer enter as one, and an earlier start than `scaled` for more of the run.
    "mid": {"nu": 40, "selection_calibration": 6, "selection_start": 7,
            "equal_filter_norms": True, "filter_norm_scale": 0.6, "batch_size": 32},
    # ResNet-20's shipped `late` settings under the default `schedule` extrapolation.
    "late_schedule": {"selection_calibration": 3, "selection_start": 7,
                      "selection_extrapolation": "schedule"},
    "sgd_b32": {"optimizer": "sgd", "batch_size": 32},
    # Γ on the batch-norm scales (as `bn`) with a strong pull on them (norm_nu): an unselected
    # scale settles at -norm_nu times its mean gradient within norm_nu/(kappa*lr) steps, so the
    # network trains with its unselected channels nearly off and removing them changes little;
    # V then grows by -lr times the scale's gradient, whatever norm_nu (the data's integral).
    "bn_nu1": {"conv_structure": None, "norm_structure": "element", "norm_nu": 1, **_LINE},
    "bn_nu10": {"conv_structure": None, "norm_structure": "element", "norm_nu": 10, **_LINE},
    # The scale and shift of each channel as one group (norm_structure: affine), strongly
    # pulled: an unselected channel is pulled to zero output, not to the constant relu(beta_c),
    # and a layer's channels shrinking together is undone by the next batch norm.
    "affine_nu1": {"conv_structure": None, "norm_structure": "affine", "norm_nu": 1, **_LINE},
    "affine_nu10": {"conv_structure": None, "norm_structure": "affine", "norm_nu": 10, **_LINE},
    # As `affine_nu10` under the default `schedule` extrapolation, which sets a lower lambda
    # under the cosine schedule (on `late`: 563 filters by epoch 20 instead of 527).
    "affine_schedule": {"conv_structure": None, "norm_structure": "affine", "norm_nu": 10,
                        "selection_extrapolation": "schedule"},
    # As `affine_schedule`, started early: the norms' pull settles within norm_nu/(kappa*lr)
    # = 100 steps, so one epoch calibrates, and a start in epoch 3 leaves more of the run (at a
    # higher lr) for the channels to enter; `affine_nu30_early` holds the unselected ones less.
    "affine_early": {"conv_structure": None, "norm_structure": "affine", "norm_nu": 10,
                     "selection_calibration": 1, "selection_start": 3,
                     "selection_extrapolation": "schedule"},
    "affine_nu30_early": {"conv_structure": None, "norm_structure": "affine", "norm_nu": 30,
                          "selection_calibration": 1, "selection_start": 3,
                          "selection_extrapolation": "schedule"},
    # As `affine_schedule` with a weaker pull on the norms: the dense network pays less for
    # holding the unselected channels small (as `affine_nu30_early` against `affine_early`).
    "affine_nu30": {"conv_structure": None, "norm_structure": "affine", "norm_nu": 30,
                    "selection_extrapolation": "schedule"},
    "affine_nu50": {"conv_structure": None, "norm_structure": "affine", "norm_nu": 50,
                    "selection_extrapolation": "schedule"},
    "affine_nu100": {"conv_structure": None, "norm_structure": "affine", "norm_nu": 100,
                     "selection_extrapolation": "schedule"},
    # `affine_nu10` for VGG-16-BN: calibrated over epoch 3 (the scales' pull time constant
    # norm_nu/(kappa*lr) is 200 steps at lr 0.05) for a start in epoch 7; batch 32 as `steps`.
    "affine_b32": {"conv_structure": None, "norm_structure": "affine", "norm_nu": 10,
                   "selection_calibration": 3, "selection_start": 7, "batch_size": 32,
                   **_LINE},
    # `affine_b32` started early (as `affine_early` on ResNet-20): calibrated over epochs 1-2
    # (750 steps, 3.75 pull time constants of 200 steps) for a start in epoch 4.
    "affine_b32_early": _affine_b32(10),
    # `affine_b32_early` with a weaker pull on the norms (as `affine_nu30_early` on ResNet-20,
    # which held 95 % of the channels against `affine_early`'s 61 %): `affine_b32_early` held
    # 44 % of VGG's channels, never the 50 % and 70 % the pruned checks are read at.
    "affine_b32_nu30_early": _affine_b32(30),
    # Between the two: `affine_b32_early` (ν 10) stopped at 44 % of the channels with W̃ ≈ W;
    # `affine_b32_nu30_early` passed 70 % by epoch 7 but its W̃ stayed far below W.
    "affine_b32_nu15_early": _affine_b32(15),
    "affine_b32_nu20_early": _affine_b32(20),
    # `affine_b32_nu20_early` went from 6 to 2,310 channels (55 %) in epochs 3-6, when the
    # dense W was at 26-38 %: its 50 % network could be no better. Started later, the burst
    # meets a better-trained W and a lower lr (V's growth slower), over more of the run.
    "affine_b32_nu20_e6": _affine_b32(20, start=6),
    "affine_b32_nu20_e8": _affine_b32(20, calibration=3, start=8),
    # Measured: `_e6` held 2,817 (67 %) with W̃ 69.22 % against W 75.72 %, `_e8` 1,219 (29 %)
    # with W̃ at chance: the later the entries, the more of the unselected channels' work the
    # sparse network lacks.
    # ResNet-20: as `affine_b32_nu20_early`, with Γ only on the blocks' inner channels (bn1
    # of each block): the residual stream's channels (the stem, every bn2 and shortcut, which
    # the additions tie together) stay uncoupled and dense, as channel pruning of ResNets
    # usually leaves them. On a 12,000-image subset `affine_b32_nu20_early`, which pulls them
    # too, trailed SGD's dense accuracy by 4.7 points. Measured (SGD 77.19 %): ν 10, 20, 30,
    # 40, 60, 80 kept 31, 62, 82, 92, 96, 99 % of the inner channels with dense W 74.37, 75.43,
    # 75.90, 76.32, 76.59, 76.10 %.
    **{f"inner_b32_nu{nu}_early": _affine_b32(nu, exclude=_RESNET_RESIDUAL_STREAM)
       for nu in (10, 20, 30, 40, 60, 80)},
}


# The settings each model's config had when the variants above were first run; the config may
# ship better ones since (VGG-16-BN: those of `affine_b32_nu20_early`), and every variant states
# what it changes from these, so its run (and its record's hash) stays the recorded one.
FIRST_SETTINGS = {
    "vgg16_bn": {"nu": 100, "selection_start": 4, "selection_calibration": 1,
                 "equal_filter_norms": False, "batch_size": 64, "conv_structure": "filter",
                 "norm_structure": None, "norm_nu": None},
}


class EpochWeights(Callback):
    """Saves the model's weights after every epoch (rank 0), for read-outs at any epoch."""

    def on_epoch_end(self, run: TrainingRun) -> None:
        if run.dist.rank == 0:
            folder = run.run_dir / "weights"
            folder.mkdir(exist_ok=True)
            state = {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()}
            atomic_save(state, folder / f"epoch_{run.epoch:03d}.pt")


def run_config(name: str, args: argparse.Namespace) -> TrainConfig:
    subset = f"-n{args.train_subset}" if args.train_subset else ""
    model = args.model.replace("_", "-")
    return load_config(f"cifar10_{args.model}_selective", {
        **FIRST_SETTINGS.get(args.model, {}), **RUNS[name],
        "data_dir": args.data_dir, "epochs": args.epochs, "seed": args.seed,
        "threads": args.threads, "device": "cpu", "out": args.runs_dir,
        "train_subset": args.train_subset,
        "run_name": f"cifar10-{model}-selective-{name}-e{args.epochs}-s{args.seed}{subset}",
    })


def train_run(name: str, args: argparse.Namespace) -> Path:
    """Train (or read back) the run ``name``; returns its directory, or its record where
    only that is there."""
    config = run_config(name, args)
    if config.optimizer == "sgd":  # compare reads only its numbers: a recorded run is enough
        advance(config, history_only=True)
    else:
        advance(config, [EpochWeights()])
    run_dir = run_directory(config)
    return run_dir if run_dir.exists() else record_path(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=("train", "compare"))
    parser.add_argument("--only", choices=tuple(RUNS), nargs="+", default=None,
                        help="the runs to train (train needs it: each is a long run)")
    parser.add_argument("--model", choices=("resnet20", "vgg16_bn"), default="resnet20")
    parser.add_argument("--variant", choices=[n for n in RUNS if not n.startswith("sgd")],
                        default="dessilbi", help="the DessiLBI run that compare reads")
    parser.add_argument("--baseline", choices=[n for n in RUNS if n.startswith("sgd")],
                        default="sgd", help="the SGD run that compare reads (the same batch)")
    parser.add_argument("--train-subset", type=int, default=None,
                        help="train on this many images (a seeded subset)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--also-at", type=int, nargs="+", default=[], metavar="EPOCH",
                        help="compare: the pruned networks of these epochs too (a path that "
                        "never reaches 70 %% or 50 %% of the channels, say)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--runs-dir", default="runs/bench-selective")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/cifar_selective[_<model>][_<variant>].md")
    args = parser.parse_args()
    if args.out is None:
        parts = ["cifar_selective"] + ([args.model] if args.model != "resnet20" else []) + \
            ([args.variant] if args.variant != "dessilbi" else [])
        args.out = Path("benchmarks/results") / ("_".join(parts) + ".md")
    if args.phase == "train":
        if not args.only:
            parser.error("train needs --only: the runs to train, e.g. --only late sgd")
        for name in args.only:
            print(f"{name}: {train_run(name, args)}", flush=True)
        return
    from selective_compare import compare  # the read-outs (torch-pruning), only when asked

    compare(args, run_config)


if __name__ == "__main__":
    main()
