"""Pictures of the first coupled convolution's filters at chosen epochs, framed by whether Γ
selected them then."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from dessilbi.optim.proximal import FILTER_STRUCTURES
from dessilbi.path_record import PICTURE_FILTERS, filter_picture
from dessilbi.report.figures import SELECTED, UNSELECTED, spread
from dessilbi.report.run_data import RunData

__all__ = ["filter_layer", "filters_figure"]

#: Epoch rows shown besides the initial filters when no epochs are chosen.
DEFAULT_ROWS = 4
#: At most this many epoch rows (the chosen epochs beyond it are thinned out).
MAX_ROWS = 8


def filter_layer(run: RunData) -> str | None:
    """The layer whose filters are pictured: the one the path recorded pictures of, else (runs
    recorded before pictures were) the first filter-structured 4-D layer; None when none."""
    if run.path is None:
        return None
    if run.path.picture_layer is not None:
        return run.path.picture_layer
    for name in run.path.names:
        weight = (run.initial or {}).get(name)
        if run.path.structure(name) in FILTER_STRUCTURES and weight is not None and \
                weight.dim() == 4:
            return name
    return None


def _image(picture: torch.Tensor, scale: float) -> np.ndarray:
    """A picture ``[c, h, w]`` (c = 3: RGB, c = 1: grey) as an image in [0, 1], 0 at grey;
    ``scale`` is the largest magnitude of the row, so collapsed filters look collapsed."""
    image = picture.float().permute(1, 2, 0)
    array: np.ndarray = (0.5 + 0.5 * image / scale).clamp(0, 1).numpy() if scale > 0 \
        else np.full(tuple(image.shape), 0.5)
    return array if array.shape[-1] == 3 else array[..., 0]


def _rows(run: RunData, layer: str, marks: Sequence[int]) -> list[tuple[str, torch.Tensor,
                                                                          torch.Tensor]]:
    """(label, pictures [F, c, h, w], selected [F]) for the initial weights and the shown epochs:
    the chosen ones (or a spread) and the last, from the path's pictures; runs without pictures
    show their initial and latest weights."""
    assert run.path is not None
    last = run.path.epochs[-1]
    final = run.path.support(layer, last)
    rows = []
    if run.initial is not None and layer in run.initial:
        rows.append(("initial", filter_picture(run.initial[layer]), final))
    pictures = run.path.filter_pictures()
    if pictures:
        recorded = sorted(pictures)
        chosen = [e for e in marks if e in pictures] or spread(recorded, DEFAULT_ROWS)
        if len(chosen) > MAX_ROWS:
            chosen = spread(chosen, MAX_ROWS)
        for epoch in sorted({*chosen, recorded[-1]}):
            rows.append((f"epoch {epoch}", pictures[epoch], run.path.support(layer, epoch)))
    elif run.latest is not None and layer in run.latest:
        rows.append((f"epoch {last}", filter_picture(run.latest[layer]), final))
    return rows


def filters_figure(run: RunData, layer: str, marks: Sequence[int]) -> Figure:
    """One row of filter pictures per shown epoch (see :func:`_rows`); a red frame: selected at
    that epoch (the initial row: at the last epoch)."""
    assert run.path is not None
    rows = _rows(run, layer, marks)
    if not rows:
        raise ValueError(f"{run.run_dir}: no weights of {layer} to picture")
    count = min(PICTURE_FILTERS, min(p.shape[0] for _, p, _ in rows))
    total = rows[0][2].numel()
    columns = min(16, count)
    lines = math.ceil(count / columns)
    figure, axes = plt.subplots(len(rows) * lines, columns, squeeze=False,
                                figsize=(0.62 * columns + 1.4, 0.68 * len(rows) * lines + 0.9))
    for r, (label, pictures, selected) in enumerate(rows):
        scale = float(pictures[:count].float().abs().max())
        for i in range(lines * columns):
            ax = axes[r * lines + i // columns][i % columns]
            ax.set_xticks([])
            ax.set_yticks([])
            if i >= count:
                ax.axis("off")
                continue
            ax.imshow(_image(pictures[i], scale), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            chosen = i < selected.numel() and bool(selected[i]) and run.coupled
            colour, width = (SELECTED, 2.5) if chosen else (UNSELECTED, 0.8)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(width)
        shown = int(selected[:count].sum())
        when = f" at epoch {run.path.epochs[-1]}" if label == "initial" else ""
        text = f"{label}\n{shown} selected{when}" if run.coupled else label
        axes[r * lines][0].set_ylabel(text, fontsize=7, rotation=0, ha="right", va="center")
    first = "" if count == total else f" (first {count} of {total})"
    frames = ("; red frame = selected at that epoch (initial row: at the last epoch)"
              if run.coupled else "")
    figure.suptitle(f"{run.label}: filters of {layer}{first} (grey = 0; one scale per row)"
                    f"{frames}", fontsize=8)
    return figure
