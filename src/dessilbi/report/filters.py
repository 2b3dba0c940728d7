"""Pictures of the first coupled convolution's filters, framed by whether Γ selected them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from dessilbi.report.figures import SELECTED, UNSELECTED
from dessilbi.report.run_data import RunData

__all__ = ["filter_layer", "filters_figure"]

MAX_FILTERS = 64


def filter_layer(run: RunData) -> str | None:
    """The first filter-structured 4-D layer of the path (None when there is none)."""
    if run.path is None or run.initial is None:
        return None
    for name in run.path.names:
        weight = run.initial.get(name)
        if run.path.structure(name) == "filter" and weight is not None and weight.dim() == 4:
            return name
    return None


def _picture(filt: torch.Tensor, scale: float) -> np.ndarray:
    """A filter ``[in, h, w]`` as an image in [0, 1]: RGB for 3 input channels, else their
    mean; ``scale`` is the largest magnitude of the row, so collapsed filters look collapsed."""
    image = filt.permute(1, 2, 0) if filt.shape[0] == 3 else filt.mean(0, keepdim=True).permute(
        1, 2, 0)
    array: np.ndarray = (0.5 + 0.5 * image / scale).clamp(0, 1).numpy() if scale > 0 \
        else np.full(tuple(image.shape), 0.5)
    return array if array.shape[-1] == 3 else array[..., 0]


def filters_figure(run: RunData, layer: str, marks: Sequence[int]) -> Figure:
    """Rows: the initial and the latest filters of ``layer``; a red frame: selected at the last
    epoch. The selected counts at the chosen epochs are in the title."""
    assert run.path is not None and run.initial is not None
    rows = [("initial", run.initial[layer])]
    if run.latest is not None and layer in run.latest:
        rows.append((f"epoch {run.path.epochs[-1]}", run.latest[layer]))
    count = min(MAX_FILTERS, rows[0][1].shape[0])
    final = run.path.support(layer, run.path.epochs[-1])
    columns = min(16, count)
    lines = math.ceil(count / columns)
    figure, axes = plt.subplots(len(rows) * lines, columns, squeeze=False,
                                figsize=(0.62 * columns + 1.2, 0.68 * len(rows) * lines + 0.9))
    for r, (label, weight) in enumerate(rows):
        pictures = weight[:count].float()
        scale = float(pictures.mean(1).abs().max()) if pictures.shape[1] != 3 else float(
            pictures.abs().max())
        for i in range(lines * columns):
            ax = axes[r * lines + i // columns][i % columns]
            ax.set_xticks([])
            ax.set_yticks([])
            if i >= count:
                ax.axis("off")
                continue
            ax.imshow(_picture(pictures[i], scale), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            colour, width = (SELECTED, 2.5) if bool(final[i]) else (UNSELECTED, 0.8)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(width)
        axes[r * lines][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    counts = {e: int(c) for e, c in zip(run.path.epochs, run.path.selected(layer).tolist(),
                                        strict=True)}
    at = ", ".join(f"epoch {e}: {counts[e]}" for e in marks if e in counts)
    shown = "" if count == final.numel() else f" (first {count} of {final.numel()})"
    frames = (f"; red frame = selected at epoch {run.path.epochs[-1]}"
              + (f"; selected at {at}" if at else "") if run.coupled else "")
    figure.suptitle(f"{run.label}: filters of {layer}{shown} (grey = 0; one scale per row)"
                    f"{frames}", fontsize=8)
    return figure
