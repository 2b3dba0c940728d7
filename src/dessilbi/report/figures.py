"""The report's figures, drawn with matplotlib (headless) from :class:`RunData`.

Every function returns a ``Figure``; :func:`save` writes it as PNG and SVG. Colours: groups Γ
selected (at the last recorded epoch) in red, the others in grey, as in the paper's Figure 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display is needed or looked for

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dessilbi.report.run_data import RunData
from dessilbi.structure import distinct_group_names

__all__ = [
    "MAX_CURVES",
    "SELECTED",
    "UNSELECTED",
    "spread",
    "curves_figure",
    "entry_figure",
    "path_figure",
    "save",
    "selection_figure",
    "shown_groups",
    "sparsity",
]

SELECTED = "#c0392b"
UNSELECTED = "#95a5a6"
#: Layers with more groups show this many curves (selected ones first, then a seeded sample of
#: the others), so that a 512-filter layer stays readable.
MAX_CURVES = 256


def save(figure: Figure, folder: Path, stem: str) -> list[Path]:
    """Write ``figure`` as ``stem.png`` and ``stem.svg`` into ``folder``; close it."""
    files = [folder / f"{stem}.png", folder / f"{stem}.svg"]
    figure.savefig(files[0], dpi=110, bbox_inches="tight")
    figure.savefig(files[1], bbox_inches="tight")
    plt.close(figure)
    return files


def shown_groups(final: torch.Tensor, limit: int = MAX_CURVES) -> list[int]:
    """The groups drawn as curves: all, or every selected one and a seeded sample of the rest."""
    count = final.numel()
    if count <= limit:
        return list(range(count))
    selected = torch.nonzero(final).flatten().tolist()[:limit]
    others = torch.nonzero(~final).flatten()
    take = max(0, limit - len(selected))
    order = torch.randperm(others.numel(), generator=torch.Generator().manual_seed(0))
    return sorted(selected + others[order[:take]].tolist())


def path_figure(runs: Sequence[RunData], layer: str, marks: Sequence[int]) -> Figure:
    """The solution path of ``layer``: ‖W_g‖ per group against epoch, one panel per run."""
    panels = [r for r in runs if r.path is not None and layer in r.path.names
              and any(r.path.group_shape(layer))]
    kinds = {r.path.structure(layer) == "element" for r in panels if r.path is not None}
    # One y scale only where the panels show the same quantity (‖W_g‖ or a whole ‖W‖).
    figure, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.2),
                                sharey=len(kinds) == 1, sharex=True, squeeze=False)
    for ax, run in zip(axes[0], panels, strict=True):
        assert run.path is not None
        if run.path.structure(layer) == "element":
            _element_panel(ax, run, layer, marks)
        else:
            _group_panel(ax, run, layer, marks)
    figure.tight_layout()
    return figure


def _group_panel(ax: Axes, run: RunData, layer: str, marks: Sequence[int]) -> None:
    assert run.path is not None
    epochs = run.path.epochs
    norms = run.path.group_norms(layer).numpy()
    final = run.path.support(layer, epochs[-1])
    groups = shown_groups(final)
    for g in groups:
        chosen = bool(final[g])
        ax.plot(epochs, norms[:, g], color=SELECTED if chosen else UNSELECTED,
                lw=1.3 if chosen else 0.8, alpha=0.95 if chosen else 0.55,
                zorder=3 if chosen else 2, gid=f"group-{g}")
    _marks(ax, marks)
    ax.set_xlabel("epoch")
    ax.set_ylabel("‖W_g‖₂")
    sample = "" if len(groups) == final.numel() else f" ({len(groups)} curves drawn)"
    what = (f"{int(final.sum())}/{final.numel()} groups selected at epoch {epochs[-1]}"
            if run.coupled else f"{final.numel()} groups (no Γ: nothing selected)")
    ax.set_title(f"{run.label}\n{layer}: {what}{sample}", fontsize=9)
    if run.coupled:  # a baseline selects nothing: no count axis
        _selected_axis(ax, run, layer, marks)


def _element_panel(ax: Axes, run: RunData, layer: str, marks: Sequence[int]) -> None:
    """A lasso layer's summary: ‖W‖ and ‖W̃‖ of the whole tensor (per-entry norms are not kept)."""
    assert run.path is not None
    epochs = run.path.epochs
    ax.plot(epochs, run.path.weight_norms(layer).numpy(), color=UNSELECTED, label="‖W‖")
    if run.coupled:
        ax.plot(epochs, run.path.weight_norms(layer, sparse=True).numpy(), color=SELECTED,
                label="‖W̃‖")
    _marks(ax, marks)
    ax.set_xlabel("epoch")
    ax.set_ylabel("norm of the whole tensor")
    entries = run.path.support(layer, epochs[-1]).numel()
    ax.set_title(f"{run.label}\n{layer}: lasso over {entries} entries (summary: per-entry "
                 "norms are not recorded)", fontsize=9)
    ax.legend(loc="best", fontsize=8)
    if run.coupled:
        _selected_axis(ax, run, layer, marks)


def _marks(ax: Axes, marks: Sequence[int]) -> None:
    for epoch in marks:
        ax.axvline(epoch, ls="--", color="black", lw=0.8, alpha=0.5)


def _selected_axis(ax: Axes, run: RunData, layer: str, marks: Sequence[int]) -> None:
    """A top axis with the number of selected groups (glmnet's degrees-of-freedom axis)."""
    assert run.path is not None
    epochs = run.path.epochs
    counts = dict(zip(epochs, run.path.selected(layer).tolist(), strict=True))
    ticks = [e for e in marks if e in counts] or spread(epochs, 6)
    top = ax.twiny()
    top.set_xlim(ax.get_xlim())
    top.set_xticks(ticks)
    top.set_xticklabels([str(counts[e]) for e in ticks], fontsize=8)
    top.set_xlabel("selected", fontsize=8)


def spread(values: Sequence[int], count: int) -> list[int]:
    """About ``count`` values spread evenly over ``values`` (the last one included)."""
    step = max(1, math.ceil(len(values) / count))
    picked = list(values[::step])
    return picked if picked[-1] == values[-1] else [*picked, values[-1]]


def selection_figure(run: RunData) -> Figure:
    """Selected against total groups per coupled layer at the last epoch, with the ratio."""
    assert run.path is not None
    last = run.path.epochs[-1]
    names = [n for n in distinct_group_names(run.path.names)
             if any(run.path.group_shape(n, last))]  # still coupled; a scale and shift once
    totals = [run.path.support(n, last).numel() for n in names]
    chosen = [int(run.path.selected(n)[-1]) for n in names]
    figure, ax = plt.subplots(figsize=(7.5, 0.32 * len(names) + 1.4))
    y = np.arange(len(names))
    ax.barh(y, totals, color=UNSELECTED, label="groups")
    ax.barh(y, chosen, color=SELECTED, label="selected")
    for i, (c, t) in enumerate(zip(chosen, totals, strict=True)):
        ax.text(t, i, f" {c}/{t} ({100 * c / t:.0f} %)", va="center", fontsize=7)
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    log = max(totals) > 50 * min(totals)
    ax.set_xscale("log" if log else "linear")
    ax.set_xlim(right=max(totals) * (4 if log else 1.3))  # room for the labels
    ax.set_xlabel(f"groups at epoch {last}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # off the bars
    ax.set_title(f"{run.label}: selected groups per layer", fontsize=9)
    figure.tight_layout()
    return figure


def curves_figure(runs: Sequence[RunData]) -> Figure:
    """Test accuracy of W and W̃, train loss and overall sparsity against epoch, every run."""
    figure, axes = plt.subplots(1, 3, figsize=(15, 3.9))
    for index, run in enumerate(runs):
        colour = f"C{index}"
        epochs = [m["epoch"] for m in run.metrics]
        axes[0].plot(epochs, [m["test_acc"] for m in run.metrics], color=colour,
                     label=f"{run.label}: W")
        sparse = [m["test_acc_sparse"] for m in run.metrics]
        if any(s is not None for s in sparse):
            axes[0].plot(epochs, [math.nan if s is None else s for s in sparse], color=colour,
                         ls="--", label=f"{run.label}: W̃")
        axes[1].plot(epochs, [m["train_loss"] for m in run.metrics], color=colour,
                     label=run.label)
        if run.coupled and run.path is not None:
            axes[2].plot(run.path.epochs, sparsity(run), color=colour, label=run.label)
    for ax, title in zip(axes, ("test accuracy (%)", "train loss",
                                "coupled weights zero in W̃ (%)"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=9)
        if ax.lines:
            ax.legend(fontsize=7, loc="best")
    axes[1].set_yscale("log")
    figure.tight_layout()
    return figure


def sparsity(run: RunData) -> list[float]:
    """Per recorded epoch: the percentage of coupled weights outside Γ's support."""
    assert run.path is not None
    epochs = run.path.epochs
    kept, total = np.zeros(len(epochs)), np.zeros(len(epochs))
    for name in run.path.names:
        # Weights per group, from the weights at hand (1 for lasso layers: a group is a weight).
        weights = (run.latest or {}).get(name, (run.initial or {}).get(name))
        final_groups = math.prod(run.path.group_shape(name)) or 1
        element = run.path.structure(name) == "element"
        size = 1.0 if element or weights is None else weights.numel() / final_groups
        groups = np.array([math.prod(run.path.group_shape(name, e)) for e in epochs], float)
        kept += run.path.selected(name).numpy() * size
        total += groups * size  # per epoch: layers added or widened later count from then
    with np.errstate(invalid="ignore", divide="ignore"):
        return (100.0 * (1.0 - kept / total)).tolist()


def entry_figure(run: RunData) -> Figure:
    """When groups entered the support: the fraction of each layer's groups per entry epoch."""
    assert run.path is not None
    names, epochs = distinct_group_names(run.path.names), run.path.epochs
    table = np.zeros((len(names), len(epochs) + 1))
    for row, name in enumerate(names):
        entry = run.path.entry_epoch(name).flatten()
        for col, epoch in enumerate(epochs):
            table[row, col] = float((entry == epoch).sum())
        table[row, -1] = float((entry < 0).sum())
        table[row] /= max(1, entry.numel())
    figure, ax = plt.subplots(figsize=(min(14, 4 + 0.25 * len(epochs)), 0.3 * len(names) + 1.8))
    # The colour scale is that of the entries: "never" (often most groups) would wash them out,
    # so its column carries its percentage as text.
    top = max(float(table[:, :-1].max()), 1e-9)
    image = ax.imshow(100 * table, aspect="auto", cmap="Reds", interpolation="nearest",
                      vmin=0, vmax=100 * top)
    for row in range(len(names)):
        ax.text(len(epochs), row, f"{100 * table[row, -1]:.0f}%", ha="center", va="center",
                fontsize=7, color="white" if table[row, -1] > 0.6 * top else "black")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    labels = [*map(str, epochs), "never"]
    step = max(1, len(labels) // 20)
    ax.set_xticks(range(0, len(labels), step), labels[::step], fontsize=7)
    ax.set_xlabel("entry epoch (first epoch a group is selected)")
    figure.colorbar(image, ax=ax, label="% of the layer's groups")
    ax.set_title(f"{run.label}: entry epochs", fontsize=9)
    figure.tight_layout()
    return figure
