"""How much of each layer's calibrated λ the initial weights alone put into V, for the recorded
``selection_start`` runs of ``cifar_selective.py`` (and any run directory).

While a group is out, the coupling's pull leaves o(t)·W_g(0) of its initial weights in V_g,
o(t) = Σ_s (lr_s/ν)·Π_{r<s} (1 − κ·lr_r/ν), which tends to 1/κ. A layer whose
o(T)·max_g ‖W_g(0)‖ (T: the end of the run) reaches its λ_l selects by its initialisation: its
groups cross whatever the loss does. Below 1 only the data's part of V can carry a group over.
New runs record this share in ``metrics.jsonl`` (``selection_init_share``, schedule
extrapolation); this script recomputes it for runs recorded before, from the run's config, its
per-epoch lr and λ, and W(0): the run's ``init.pt`` when its directory is there, else the model
rebuilt from the config's seed (as ``dessilbi train`` builds it).

Usage (from the repository root)::

    .venv/bin/python benchmarks/init_share.py RUN_DIR [RUN_DIR ...]
    .venv/bin/python benchmarks/init_share.py --recorded vgg16_bn:schedule:12000 \\
        --recorded resnet20:late --out benchmarks/results/init_share.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from _runs import read_history
from dessilbi.config import TrainConfig, load_config
from dessilbi.data import dataset_info
from dessilbi.run_state import Architecture
from dessilbi.selection import pull_offset
from dessilbi.train import _initial_model


def step_lrs(history: list[dict[str, Any]], epochs: int, multiplier: Any, base: float
             ) -> list[float]:
    """The lr of every step of the run: the recorded epochs' lr, then the schedule's, at the
    first epoch's number of steps."""
    steps = history[0]["step"]
    lrs = [base * multiplier(e) for e in range(epochs)]
    for e, record in enumerate(history[:epochs]):
        lrs[e] = record["lr"]
    return [lr for lr in lrs for _ in range(steps)]


def initial_weights(config: TrainConfig, run_dir: Path | None) -> dict[str, torch.Tensor]:
    """W(0): the run's ``init.pt``, or the model ``dessilbi train`` builds from the seed."""
    if run_dir is not None and (run_dir / "init.pt").exists():
        return torch.load(run_dir / "init.pt", map_location="cpu", weights_only=True)
    info = dataset_info(config.dataset, config.data_dir)
    architecture = Architecture(config.model, {"num_classes": info.num_classes,
                                               "in_channels": info.in_channels,
                                               "image_size": info.image_size[0],
                                               **config.model_kwargs})
    torch.manual_seed(config.seed)
    # The training loop's own first model: built, equalised and scaled as train builds it.
    model = _initial_model(None, architecture, None, config.equal_filter_norms,
                           config.filter_norm_scale)
    return model.state_dict()


def init_shares(config: TrainConfig, history: list[dict[str, Any]],
                weights: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per coupled layer: λ_l, max_g ‖W_g(0)‖, and W(0)'s part of λ_l at the start (E − ½) and
    at the end of the run (filter groups)."""
    from dessilbi.schedule import lr_multiplier

    lams = next(r["selection_lam"] for r in history if "selection_lam" in r)
    lrs = step_lrs(history, config.epochs, lr_multiplier(config), config.lr)
    steps = history[0]["step"]
    at_start, _ = pull_offset(lrs[:round((config.selection_start - 0.5) * steps)],
                              config.kappa, config.nu)
    at_end, _ = pull_offset(lrs, config.kappa, config.nu)
    out = {}
    for name, lam in lams.items():
        largest = float(weights[name].flatten(1).norm(dim=1).max())
        out[name] = {"lam": lam, "w0": largest, "start": at_start * largest / lam,
                     "end": at_end * largest / lam}
    return out


def recorded(spec: str, runs_dir: str, data_dir: str, epochs: int = 20, seed: int = 0
             ) -> tuple[str, TrainConfig, Path | None, list[dict[str, Any]]]:
    """``model:variant[:subset]`` of cifar_selective.py: its config, and its history from the run
    directory or, where that is gone, from the variant's results JSON."""
    import cifar_selective

    model, variant, *rest = spec.split(":")
    args = argparse.Namespace(model=model, train_subset=int(rest[0]) if rest else None,
                              epochs=epochs, seed=seed, threads=1, data_dir=data_dir,
                              runs_dir=runs_dir)
    config = cifar_selective.run_config(variant, args)
    run_dir = Path(config.out) / config.run_directory_name()
    if (run_dir / "metrics.jsonl").exists():
        return spec, config, run_dir, read_history(run_dir)
    parts = ["cifar_selective"] + ([model] if model != "resnet20" else []) + \
        ([variant] if variant != "dessilbi" else [])
    results = Path("benchmarks/results") / ("_".join(parts) + ".json")
    return spec, config, None, json.loads(results.read_text())["runs"]["dessilbi"]


def table(label: str, shares: dict[str, dict[str, float]]) -> list[str]:
    lines = [f"### {label}", "", "| layer | λ_l | max ‖W_g(0)‖ | W(0)'s part of λ_l at the "
             "start | at the end |", "|---|---|---|---|---|"]
    for name, s in shares.items():
        lines.append(f"| {name} | {s['lam']:.3f} | {s['w0']:.3f} | {s['start']:.2f} | "
                     f"{s['end']:.2f} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="*", type=Path)
    parser.add_argument("--recorded", action="append", default=[],
                        help="model:variant[:train_subset] of cifar_selective.py")
    parser.add_argument("--runs-dir", default="runs/bench-selective")
    parser.add_argument("--data-dir", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--epochs", type=int, default=20, help="of the --recorded runs")
    parser.add_argument("--seed", type=int, default=0, help="of the --recorded runs")
    parser.add_argument("--out", type=Path, default=None,
                        help="a markdown file (benchmarks/results/init_share.md); else printed")
    args = parser.parse_args()
    runs = [recorded(spec, args.runs_dir, args.data_dir, args.epochs, args.seed)
            for spec in args.recorded]
    runs += [(str(d), load_config(d / "config.yaml"), d, read_history(d)) for d in args.run_dirs]
    lines = ["# W(0)'s part of the calibrated λ", "",
             "o(t)·max_g ‖W_g(0)‖ / λ_l per coupled layer: at the middle of the start epoch and "
             "at the end of the run. At 1 or more the layer's groups cross on their initial "
             "weights alone. Produced by `.venv/bin/python benchmarks/init_share.py "
             + " ".join([f"--recorded {s}" for s in args.recorded] +
                        [str(d) for d in args.run_dirs]) + "`.", ""]
    for label, config, run_dir, history in runs:
        shares = init_shares(config, history, initial_weights(config, run_dir))
        lines += table(f"{label} (ν {config.nu:g}, lr {config.lr:g}, batch "
                       f"{config.batch_size}, c {config.selection_calibration}, E "
                       f"{config.selection_start}, {config.selection_extrapolation})", shares)
    if args.out is not None:
        args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
