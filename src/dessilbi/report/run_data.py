"""What a report reads from a run directory: config, per-epoch metrics, the path, the weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from torch import nn
from torch.optim import Optimizer

from dessilbi.path_record import PathRecord, PathRecorder, load_path
from dessilbi.run_files import CheckpointError, load_weights, read_metrics

__all__ = ["ReportError", "RunData", "read_run"]


class ReportError(ValueError):
    """A run directory cannot be reported; the message names the file and the problem."""


@dataclass
class RunData:
    """One run, as the report shows it.

    Attributes:
        run_dir: the run directory.
        label: a short name for legends (the directory name).
        config: the resolved configuration (plain values).
        metrics: the lines of ``metrics.jsonl``.
        path: the recorded path (None for runs without one).
        initial: the initial weights (``init.pt``), or None.
        latest: the weights of the last finished epoch (checkpoint or ``model.pt``), or None.
    """

    run_dir: Path
    label: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    path: PathRecord | None
    initial: dict[str, torch.Tensor] | None
    latest: dict[str, torch.Tensor] | None

    @property
    def coupled(self) -> bool:
        """Whether Γ selects anything in this run (DessiLBI)."""
        return self.config.get("optimizer") == "dessilbi"


def read_run(run_dir: str | Path) -> RunData:
    """Read what the report needs; a run still in progress is read as far as it got."""
    root = Path(run_dir)
    config_file = root / "config.yaml"
    if not config_file.is_file():
        raise ReportError(f"{root}: not a dessilbi run directory (no config.yaml)")
    try:
        config = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ReportError(f"{config_file}: damaged ({exc})") from exc
    if not isinstance(config, dict):
        raise ReportError(f"{config_file}: not a mapping of config keys")
    try:
        metrics = read_metrics(root / "metrics.jsonl")
    except json.JSONDecodeError as exc:
        raise ReportError(f"{root / 'metrics.jsonl'}: damaged ({exc})") from exc
    if not metrics:
        raise ReportError(f"{root / 'metrics.jsonl'}: no epoch recorded yet, nothing to report")
    path = None
    if (root / "path.pt").exists() or config.get("optimizer") == "dessilbi":
        try:
            path = load_path(root / "path.pt")
        except (FileNotFoundError, ValueError) as exc:
            raise ReportError(str(exc)) from exc
        path = _up_to(path, root / "path.pt", int(metrics[-1]["epoch"]))
    return RunData(root, _label(config), config, metrics, path, _weights(root / "init.pt"),
                   _latest(root))


def _label(config: dict[str, Any]) -> str:
    """A short legend name: the optimizer, with ν and λ for DessiLBI (or, where λ was
    calibrated per layer, the start epoch it was calibrated for)."""
    if config.get("optimizer") == "dessilbi":
        start = config.get("selection_start")
        lam = f"λ {config.get('lam'):g}" if start is None else f"λ for a start in epoch {start}"
        return f"DessiLBI (ν {config.get('nu'):g}, {lam})"
    return {"sgd": "SGD", "adam": "Adam"}.get(str(config.get("optimizer")),
                                              str(config.get("optimizer")))


def _up_to(record: PathRecord, file: Path, epoch: int) -> PathRecord:
    """The path cut back to ``epoch``: path.pt is written before metrics.jsonl, so in a run in
    progress it can hold one epoch more, which the page would show out of step."""
    if not record.epochs or record.epochs[-1] <= epoch or epoch not in record.epochs:
        return record
    recorder = PathRecorder(nn.Module(), cast(Optimizer, _NoOptimizer()))
    recorder.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    recorder.truncate(epoch, record.steps[record.epochs.index(epoch)])
    return recorder.record()


class _NoOptimizer:
    """Stands in for the optimizer of a recorder that only truncates a recording."""

    param_groups: list[Any] = []
    state: dict[Any, Any] = {}


def _weights(file: Path) -> dict[str, torch.Tensor] | None:
    """The weights in ``file`` (a bare state dict or a checkpoint), None when there is none."""
    if not file.is_file():
        return None
    try:
        return load_weights(file)
    except CheckpointError as exc:
        raise ReportError(str(exc)) from exc


def _latest(root: Path) -> dict[str, torch.Tensor] | None:
    """The newest weights: the checkpoint's, else the final ``model.pt``."""
    for name in ("checkpoint.pt", "model.pt"):
        weights = _weights(root / name)
        if weights is not None:
            return weights
    return None
