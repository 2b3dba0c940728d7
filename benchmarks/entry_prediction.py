"""When does a layer start selecting? Predicted first-entry epochs against a recorded path.

Usage::

    .venv/bin/python benchmarks/entry_prediction.py RUN_DIR [RUN_DIR ...] [--out FILE.md]

Before a group enters, Γ_g = 0 and V_g grows by (lr/ν)·W_g per step, so it enters once
‖Σ_s lr_s W_g(s)‖/ν exceeds λ_g. Two bounds from the initial weights alone (``init.pt``), with the
run's per-epoch lr (``metrics.jsonl``) and steps per epoch (``path.pt``):

- *held*: W_g keeps its initial value (the loss sustains it): the earliest possible entry;
- *pulled*: W_g gets no gradient and only shrinks by the coupling, W ← (1 − κ·lr/ν) W: V_g then
  saturates at ‖W_g(0)‖/κ, and a group with κ·λ_g ≥ ‖W_g(0)‖ never enters on its own.

Per coupled layer the table gives the median ‖W_g(0)‖, λ_g, the first entry each bound predicts
(the layer's earliest group), in epochs (fractional: step / steps per epoch), and the observed
first entry (the earliest entry step in ``path.pt``). See
``docs/selection.md`` for what the figures say.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from dessilbi.optim.proximal import group_norms, group_threshold
from dessilbi.path_record import load_path


def _crossing(gap: float, rate: float, shrink: float, steps: int) -> float | None:
    """Steps into an epoch at which V, growing by ``rate·shrink^k`` at step k, has grown by
    ``gap``; None when it does not within ``steps``."""
    if shrink == 1:
        k = gap / rate
    else:
        x = gap * (1 - shrink) / rate
        k = math.log(1 - x) / math.log(shrink) if x < 1 else math.inf
    return k if k <= steps else None


def predictions(norm0: float, lam: float, lrs: list[float], steps: int, nu: float,
                kappa: float) -> tuple[float, float]:
    """(held, pulled) first-entry times, in epochs, of a group whose W starts at norm ``norm0``
    (the largest of its layer: it crosses first under both bounds)."""
    out = []
    for pull in (False, True):
        v, w, when = 0.0, norm0, math.inf
        for epoch, lr in enumerate(lrs):
            shrink = 1 - kappa * lr / nu if pull else 1.0
            k = _crossing(lam - v, lr / nu * w, shrink, steps)
            if k is not None:
                when = epoch + k / steps
                break
            v += lr / nu * w * (steps if shrink == 1 else (1 - shrink**steps) / (1 - shrink))
            w *= shrink**steps
        out.append(when)
    return out[0], out[1]


def layer_rows(run_dir: Path) -> list[dict[str, object]]:
    config = _yaml(run_dir / "config.yaml")
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [float(m["lr"]) for m in metrics]
    record = load_path(run_dir / "path.pt")
    steps = record.steps[0]
    init = torch.load(run_dir / "init.pt", map_location="cpu", weights_only=True)
    rows = []
    for name in record.names:
        structure = record.structure(name)
        weight = init[name].double()
        lam = _layer_lam(config, name, weight, structure)
        norms0 = weight.abs().reshape(-1) if structure == "element" else \
            group_norms(weight, structure)
        held, pulled = predictions(float(norms0.max()), lam, lrs, steps, float(config["nu"]),
                                   float(config["kappa"]))
        entry = record.entry_step(name)
        observed = float(entry[entry >= 0].min()) / steps if bool((entry >= 0).any()) \
            else math.inf
        rows.append({"run": run_dir.name, "layer": name, "structure": structure,
                     "median_norm": float(norms0.median()), "max_norm": float(norms0.max()),
                     "lam": lam,
                     "held": held, "pulled": pulled, "observed": observed})
    return rows


def _layer_lam(config: dict[str, object], name: str, weight: torch.Tensor,
               structure: str) -> float:
    kind = "conv" if weight.dim() > 2 else "linear"
    lam = config.get(f"{kind}_lam")
    lam = float(config["lam"] if lam is None else lam)  # type: ignore[arg-type]
    scaling = config.get(f"{kind}_group_scaling") or config.get("group_scaling", "none")
    return group_threshold(lam, structure, weight.shape, str(scaling))


def _yaml(path: Path) -> dict[str, object]:
    import yaml

    return dict(yaml.safe_load(path.read_text()))


def _epoch(value: object) -> str:
    return "never" if value == math.inf else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = ["| run | layer | median ‖W_g(0)‖ | largest | λ_g | held | pulled | observed |",
             "|---|---|---|---|---|---|---|---|"]
    for run_dir in args.runs:
        for row in layer_rows(run_dir):
            lines.append(f"| {row['run']} | {row['layer']} | {row['median_norm']:.3g} "
                         f"| {row['max_norm']:.3g} "
                         f"| {row['lam']:.3g} | {_epoch(row['held'])} | {_epoch(row['pulled'])} "
                         f"| {_epoch(row['observed'])} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
