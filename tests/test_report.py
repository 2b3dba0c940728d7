"""``dessilbi report``: figures and report.html from tiny real runs (digits)."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.colors as mcolors  # matplotlib comes with the dev install
import pytest
import torch

from dessilbi.config import load_config
from dessilbi.path_record import load_path
from dessilbi.report import ReportError, read_run, write_report
from dessilbi.report.figures import SELECTED, UNSELECTED, path_figure
from dessilbi.report.filters import filters_figure
from dessilbi.train import train

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("runs")
    lbi = train(load_config("digits", {"epochs": 3, "nu": 5, "out": str(out)}), quiet=True)
    sgd = train(load_config("digits", {"epochs": 3, "optimizer": "sgd", "out": str(out)}),
                quiet=True)
    return lbi.run_dir, sgd.run_dir


_VOID = {"img", "meta", "br", "hr", "link", "input"}


class _Page(HTMLParser):
    """Collects ids, image sources and links, and checks that elements close in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.sources: list[str] = []
        self.links: list[str] = []
        self.unclosed: list[str] = []

    def handle_endtag(self, tag: str) -> None:
        assert self.unclosed and self.unclosed[-1] == tag, (tag, self.unclosed[-3:])
        self.unclosed.pop()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _VOID:
            self.unclosed.append(tag)
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(str(values["id"]))
        if tag == "img":
            self.sources.append(str(values.get("src")))
        if tag in ("a", "link", "script") and (values.get("href") or values.get("src")):
            self.links.append(str(values.get("href") or values.get("src")))


def test_report_writes_every_figure_and_a_self_contained_page(runs: tuple[Path, Path]) -> None:
    lbi, sgd = runs
    page = write_report(lbi, compare=[sgd], epochs=[1, 2])
    folder = lbi / "report"
    assert page == folder / "report.html"
    stems = {"path_conv1.weight", "path_conv2.weight", "path_conv3.weight", "selection",
             "curves", "entries", "filters"}
    for stem in stems:
        assert (folder / f"{stem}.png").read_bytes().startswith(PNG), stem
        assert ET.parse(folder / f"{stem}.svg").getroot().tag.endswith("svg"), stem
    parsed = _Page()
    parsed.feed(page.read_text())
    assert {"summary", "path", "selection", "curves", "entries", "filters", "config"} <= parsed.ids
    assert len(parsed.sources) == len(stems)
    assert all(src.startswith("data:image/png;base64,") for src in parsed.sources)
    for link in parsed.links:  # only files inside report/ or the page itself
        assert link.startswith("#") or ((folder / link).is_file()
                                        and (folder / link).resolve().parent == folder.resolve())
    assert parsed.unclosed == [], parsed.unclosed
    text = page.read_text()
    assert "DessiLBI (ν 5, λ 1)" in text and "SGD" in text


def test_each_path_curve_has_the_colour_of_its_recorded_support(runs: tuple[Path, Path]) -> None:
    lbi, sgd = runs
    main, other = read_run(lbi), read_run(sgd)
    figure = path_figure([main, other], "conv3.weight", marks=[2])
    lbi_axes, sgd_axes = figure.axes[0], figure.axes[1]  # (then their twin top axes)
    support = load_path(lbi / "path.pt").support("conv3.weight", 3)
    curves = [line for line in lbi_axes.lines if (line.get_gid() or "").startswith("group-")]
    assert len(curves) == support.numel() == 64
    for line in curves:
        group = int(line.get_gid().split("-")[1])
        expected = SELECTED if bool(support[group]) else UNSELECTED
        assert mcolors.to_hex(line.get_color()) == expected, group
    assert 0 < int(support.sum()) < 64
    sgd_curves = [line for line in sgd_axes.lines if (line.get_gid() or "").startswith("group-")]
    assert len(sgd_curves) == 64
    assert {mcolors.to_hex(line.get_color()) for line in sgd_curves} == {UNSELECTED}
    # The norms drawn are the recorded ones.
    norms = load_path(lbi / "path.pt").group_norms("conv3.weight")
    assert torch.allclose(torch.tensor(curves[5].get_ydata()), norms[:, 5].double().float())


def test_filter_pictures_show_the_chosen_epochs_framed_by_their_support(
        runs: tuple[Path, Path]) -> None:
    """Rows: initial weights (framed by the last support), the chosen epochs 1 and 2, and the
    last epoch 3, each showing the recorded picture of that epoch framed by that epoch's
    support."""
    lbi, _ = runs
    run = read_run(lbi)
    record = load_path(lbi / "path.pt")
    figure = filters_figure(run, "conv1.weight", marks=[1, 2])
    grid = [ax for ax in figure.axes if ax.images]
    assert len(grid) == 4 * 16
    epochs = [3, 1, 2, 3]  # the support that frames each row
    pictures = record.filter_pictures()
    framed = 0
    for index, ax in enumerate(grid):
        row, filt = divmod(index, 16)
        selected = bool(record.support("conv1.weight", epochs[row])[filt])
        assert mcolors.to_hex(ax.spines["top"].get_edgecolor()) == (
            SELECTED if selected else UNSELECTED), (row, filt)
        framed += selected
        if row > 0:  # the picture drawn is the recorded one, 0 at mid-grey
            picture = pictures[epochs[row]][filt, 0].float()
            scale = float(pictures[epochs[row]].float().abs().max())
            drawn = torch.tensor(ax.images[0].get_array()).double()
            assert torch.allclose(drawn, (0.5 + 0.5 * picture / scale).clamp(0, 1).double(),
                                  atol=1e-6), (row, filt)
    assert framed > 0
    labels = [ax.get_ylabel() for ax in grid[::16]]
    assert labels[0].startswith("initial") and labels[1].startswith("epoch 1")


def test_an_sgd_run_alone_and_a_run_in_progress_are_reported(tmp_path: Path,
                                                             runs: tuple[Path, Path]) -> None:
    _, sgd = runs
    page = write_report(sgd)
    assert "curves" in page.read_text() and (sgd / "report" / "path_conv3.weight.png").is_file()
    unfinished = train(load_config("digits", {"epochs": 1, "nu": 5, "out": str(tmp_path)}),
                       quiet=True).run_dir
    (unfinished / "model.pt").unlink()  # as while training: no final weights yet
    assert write_report(unfinished).is_file()


def test_a_missing_or_damaged_path_file_is_named(tmp_path: Path) -> None:
    run = train(load_config("digits", {"epochs": 1, "nu": 5, "out": str(tmp_path)}),
                quiet=True).run_dir
    (run / "path.pt").write_bytes(b"not a path")
    with pytest.raises(ReportError, match=r"path\.pt: cannot be read as a path file"):
        write_report(run)
    (run / "path.pt").unlink()
    with pytest.raises(ReportError, match=r"path\.pt: no path file there"):
        write_report(run)
    with pytest.raises(ReportError, match="not a dessilbi run directory"):
        write_report(tmp_path / "nowhere")


def test_the_command_line_writes_the_report(runs: tuple[Path, Path]) -> None:
    lbi, sgd = runs
    done = subprocess.run([sys.executable, "-m", "dessilbi", "report", str(lbi), "--compare",
                           str(sgd), "--epochs", "1,2"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"report: {lbi / 'report' / 'report.html'}"
    bad = subprocess.run([sys.executable, "-m", "dessilbi", "report", str(lbi), "--epochs",
                          "x"], capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 1 and "invalid --epochs: 'x'" in bad.stderr


def test_train_report_writes_the_report_when_training_ends(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "dessilbi", "train", "--epochs", "1", "--nu",
                           "5", "--quiet", "--report", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    run = next(tmp_path.iterdir())
    assert f"report: {run / 'report' / 'report.html'}" in done.stdout
    page = (run / "report" / "report.html").read_text()
    assert page.count("<section") == page.count("</section>") == 7


def test_a_baseline_run_records_the_true_group_norms(runs: tuple[Path, Path]) -> None:
    _, sgd = runs
    final = torch.load(sgd / "model.pt", weights_only=True)["conv3.weight"]
    recorded = load_path(sgd / "path.pt").group_norms("conv3.weight")[-1]
    assert torch.allclose(recorded, final.flatten(1).norm(dim=1))
    assert int(load_path(sgd / "path.pt").selected("conv3.weight")[-1]) == 0


def test_a_path_file_one_epoch_ahead_is_cut_to_the_metrics(tmp_path: Path,
                                                           runs: tuple[Path, Path]) -> None:
    import shutil

    lbi, _ = runs
    copy = tmp_path / lbi.name
    shutil.copytree(lbi, copy)
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")  # as between the writes
    record = read_run(copy).path
    assert record is not None and record.epochs == [1, 2]
    full = load_path(lbi / "path.pt")
    assert torch.equal(record.support("conv3.weight", 2), full.support("conv3.weight", 2))
    assert write_report(copy).is_file()


def test_an_sgd_run_from_before_baselines_recorded_a_path_resumes(tmp_path: Path) -> None:
    config = load_config("digits", {"epochs": 1, "optimizer": "sgd", "out": str(tmp_path)})
    run = train(config, quiet=True).run_dir
    (run / "path.pt").unlink()
    longer = load_config(run / "config.yaml", {"epochs": 2})
    assert train(longer, resume_dir=run, quiet=True).epochs == 2
    assert load_path(run / "path.pt").epochs == [2]  # recorded from the resume on


@pytest.mark.filterwarnings("ignore:selection_start:UserWarning")
def test_a_calibrated_run_lists_its_lambdas_shares_and_first_entries(tmp_path: Path) -> None:
    """A selection_start run: one row per coupled layer with the λ and W(0)'s part of it that
    metrics.jsonl recorded, and the first entry epoch of its path; runs without have none."""
    import json

    run = train(load_config("digits", {"epochs": 4, "nu": 5, "selection_start": 3,
                                       "out": str(tmp_path)}), quiet=True).run_dir
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    text = write_report(run).read_text()
    parsed = _Page()
    parsed.feed(text)
    assert "calibration" in parsed.ids
    record = load_path(run / "path.pt")
    for name, lam in line["selection_lam"].items():
        entry = record.entry_epoch(name)
        first = int(entry[entry >= 0].min()) if bool((entry >= 0).any()) else "–"
        row = (f"<td>{name}</td><td>{lam:.4g}</td>"
               f"<td>{line['selection_init_share'][name]:.2f}</td><td>{first}</td>")
        assert row in text, row
    assert "DessiLBI (ν 5, λ for a start in epoch 3)" in text
    assert 'id="calibration"' not in write_report(
        train(load_config("digits", {"epochs": 1, "nu": 5, "out": str(tmp_path / "plain")}),
              quiet=True).run_dir).read_text()
