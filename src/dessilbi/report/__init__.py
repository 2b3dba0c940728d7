"""Figures and a one-page HTML report of a run directory (``dessilbi report RUN_DIR``).

``write_report(run_dir, compare=(...), epochs=(...))`` writes into ``run_dir/report/``: the
solution path of every coupled layer (one curve of ‖W_g‖ per group, red when Γ selected it,
other runs beside it on the same scale), the selected groups per layer, accuracies of W and W̃,
train loss and sparsity against epoch for every run, the entry epochs, the filters of the first
coupled convolution, the configuration and the final figures: each as PNG and SVG, all in one
self-contained ``report.html``. Needs matplotlib (``pip install dessilbi[report]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dessilbi.report.run_data import ReportError, RunData, read_run

__all__ = ["ReportError", "RunData", "read_run", "write_report"]


def write_report(
    run_dir: str | Path, compare: Sequence[str | Path] = (), epochs: Sequence[int] = ()
) -> Path:
    """Write the report of ``run_dir`` (beside the runs in ``compare``); return its HTML file.

    ``epochs`` are marked in the path figures and filter pictures. A run still in progress is
    reported as far as it got. Raises :class:`ReportError` for a directory that is no run or a
    missing or damaged ``path.pt`` (naming the file), ``ImportError`` without matplotlib.
    """
    try:
        from dessilbi.report.build import build_report
    except ImportError as exc:  # matplotlib is an optional extra
        raise ImportError("dessilbi report needs matplotlib: pip install 'dessilbi[report]'") \
            from exc
    runs = [read_run(run_dir), *(read_run(other) for other in compare)]
    labels = [run.label for run in runs]
    for run in runs:  # the same label twice (two SGD runs): tell them apart by directory
        if labels.count(run.label) > 1:
            run.label = f"{run.label} [{run.run_dir.name}]"
    return build_report(runs, sorted(set(epochs)))
