"""Assembling the report: which figures, in which sections, written where."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from dessilbi.report.figures import (
    MAX_CURVES,
    curves_figure,
    entry_figure,
    path_figure,
    save,
    selection_figure,
)
from dessilbi.report.filters import filter_layer, filters_figure
from dessilbi.report.page import Section, config_table, render_page, summary_table, table
from dessilbi.report.run_data import RunData
from dessilbi.run_files import atomic_write_text
from dessilbi.selection import INITIALISATION_DRIVEN_SHARE

__all__ = ["build_report"]


def _stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def build_report(runs: Sequence[RunData], marks: Sequence[int]) -> Path:
    """Write ``runs[0].run_dir/report/`` and return its ``report.html``."""
    main = runs[0]
    folder = main.run_dir / "report"
    folder.mkdir(exist_ok=True)
    sections = [_summary(runs), _paths(runs, marks, folder)]
    if main.coupled and main.path is not None and main.path.names:
        sections.append(_selection(main, folder))
    sections.append(_curves(runs, folder))
    if main.coupled and main.path is not None and main.path.names:
        sections.append(_entries(main, folder))
    calibration = _calibration(main)
    if calibration is not None:
        sections.append(calibration)
    layer = filter_layer(main)
    if layer is not None:
        png = save(filters_figure(main, layer, marks), folder, "filters")[0]
        sections.append(Section("filters", "Filters", figures=[(png, f"filters of {layer}")]))
    sections.append(Section("config", "Configuration", text=f"{main.run_dir / 'config.yaml'}",
                            tables=[config_table(main.config)]))
    page = folder / "report.html"
    atomic_write_text(render_page(f"dessilbi report: {main.run_dir.name}", sections), page)
    return page


def _summary(runs: Sequence[RunData]) -> Section:
    return Section("summary", "Run and final figures",
                   text=f"{runs[0].run_dir} after {runs[0].metrics[-1]['epoch']} of "
                   f"{runs[0].config.get('epochs')} epochs (the configuration is at the end).",
                   tables=[summary_table(runs)])


def _paths(runs: Sequence[RunData], marks: Sequence[int], folder: Path) -> Section:
    main = runs[0]
    section = Section(
        "path", "Solution path",
        text="‖W_g‖ of every group against epoch; red: groups Γ selected at the last epoch, "
        "grey: the others; dashed lines: the chosen epochs; top axis: selected groups. Lasso "
        "layers show ‖W‖ and ‖W̃‖ of the whole tensor instead of one curve per weight; layers "
        f"with more than {MAX_CURVES} groups show {MAX_CURVES} curves, selected groups first, "
        "then a sample of the rest.",
    )
    if main.path is None or not main.path.names:
        section.text = "This run recorded no path (no layer coupled)."
        return section
    for layer in main.path.names:
        png = save(path_figure(runs, layer, marks), folder, f"path_{_stem(layer)}")[0]
        section.figures.append((png, f"solution path of {layer}"))
    return section


def _selection(run: RunData, folder: Path) -> Section:
    png = save(selection_figure(run), folder, "selection")[0]
    return Section("selection", "Selected groups per layer",
                   figures=[(png, "selected against total groups, last epoch")])


def _curves(runs: Sequence[RunData], folder: Path) -> Section:
    png = save(curves_figure(runs), folder, "curves")[0]
    return Section("curves", "Accuracy, loss and sparsity",
                   text="Test accuracy of the dense W (solid) and of the sparse W̃ = W ⊙ 1[Γ ≠ 0] "
                   "(dashed; coupled weights only), train loss, and the share of coupled "
                   "weights outside Γ's support.", figures=[(png, "per-epoch curves")])


def _entries(run: RunData, folder: Path) -> Section:
    png = save(entry_figure(run), folder, "entries")[0]
    return Section("entries", "Entry epochs",
                   figures=[(png, "first epoch at which each group was selected, per layer")])


def _calibration(run: RunData) -> Section | None:
    """``selection_start``'s calibrated λ per layer, W(0)'s part of it and the first entry."""
    line = next((m for m in run.metrics if "selection_lam" in m), None)
    if line is None:
        return None
    shares = line.get("selection_init_share", {})
    rows = [(name, f"{lam:.4g}", f"{shares[name]:.2f}" if name in shares else "–",
             _first_entry(run, name)) for name, lam in line["selection_lam"].items()]
    if shares:
        driven = sum(1 for s in shares.values() if s >= INITIALISATION_DRIVEN_SHARE)
        about = (f"at 1 or more, a filter the loss leaves alone enters anyway and the order "
                 f"follows the initial norms: {driven} of {len(rows)} layers here")
    elif run.config.get("selection_extrapolation", "linear") == "linear":
        about = "not recorded: the linear extrapolation keeps no W(0)"
    else:
        about = "not recorded by the version that trained this run; benchmarks/init_share.py " \
            "computes it"
    return Section(
        "calibration", "Calibrated λ (selection_start)",
        text=f"λ per layer, set at the end of epoch {line['epoch']} for a first entry in epoch "
        f"{run.config.get('selection_start')}; W(0)'s part: how much of λ the initial weights "
        f"alone put into V by the end of the run ({about}; docs/selection.md).",
        tables=[table(rows, ("layer", "λ", "W(0)'s part of λ", "first entry (epoch)"))])


def _first_entry(run: RunData, name: str) -> int | str:
    """The first epoch at which a group of layer ``name`` was selected, or a dash."""
    if run.path is None or name not in run.path.names:
        return "–"
    entry = run.path.entry_epoch(name)
    return int(entry[entry >= 0].min()) if bool((entry >= 0).any()) else "–"
