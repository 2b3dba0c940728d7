"""Helpers shared by the real-data benchmarks: common options, runs advanced epoch by epoch, run
metrics, number formatting."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dessilbi.config import RUN_LOCATION_KEYS, load_config
from dessilbi.run_files import atomic_write_text, config_differences, read_metrics
from dessilbi.train import train


def add_common_arguments(
    parser: argparse.ArgumentParser, *, epochs: int, data_dir: str, runs_dir: str, out: str
) -> None:
    """The options every real-data benchmark takes: budget, seed, threads and where files go."""
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: on a shared 2-core machine torch's "
                        "default of 2 threads ran 3-5x slower)")
    parser.add_argument("--data-dir", default=data_dir)
    parser.add_argument("--runs-dir", default=runs_dir)
    parser.add_argument("--out", type=Path, default=Path(out))


#: Where finished runs' per-epoch records are kept (committed, unlike runs/), so that a rerun
#: in a later session can skip a run it only needs the numbers of.
RECORDS = Path(__file__).parent / "results" / "runs"


def record_path(config: Any) -> Path:
    """The record of the run of ``config``: its name and the hash of what defines its numbers
    (``threads`` included: a run at another thread count is another run)."""
    return RECORDS / f"{config.run_directory_name()}-{config.config_hash()}.jsonl"


def recorded_history(config: Any) -> list[dict[str, Any]] | None:
    """The recorded per-epoch records of the run of ``config``, when a finished one is there
    (an unreadable record counts as none, with a warning)."""
    path = record_path(config)
    if not path.exists():
        return None
    try:
        history = read_metrics(path)
    except json.JSONDecodeError as exc:
        warnings.warn(f"{path}: unreadable record ({exc}); the run is trained again",
                      stacklevel=2)
        return None
    return history[: config.epochs] if len(history) >= config.epochs else None


def advance(config: Any, callbacks: Sequence[Any] = (), *,
            history_only: bool = False) -> list[dict[str, Any]]:
    """Train the run of ``config`` up to its ``epochs`` (resumed, with the same ``callbacks``;
    a run already there is only read back) and return its per-epoch records, which are kept
    in :data:`RECORDS` too. ``history_only``: the caller needs no files of the run, so a
    recorded finished run is not trained again (nor an unfinished directory resumed)."""
    run_dir = run_directory(config)
    if history_only:
        recorded = recorded_history(config)
        if recorded is not None:
            return recorded
    if (run_dir / "checkpoint.pt").exists():
        check_same_run(run_dir, config)
        history = read_history(run_dir)
        if len(history) >= config.epochs:
            return _recorded(config, history[: config.epochs])
        run_dir = train(config, quiet=True, resume_dir=run_dir, callbacks=callbacks).run_dir
    else:
        run_dir = train(config, quiet=True, callbacks=callbacks).run_dir
    return _recorded(config, read_history(run_dir))


def check_same_run(run_dir: Path, config: Any) -> None:
    """Refuse a run directory (the benchmarks name them without a hash) that holds a run of
    another config than ``config``, up to its length: its numbers are not this run's."""
    saved = load_config(run_dir / "config.yaml")
    if dataclasses.replace(saved, epochs=config.epochs).config_hash() != config.config_hash():
        differences = config_differences(run_dir / "config.yaml", config.to_dict(),
                                         {*RUN_LOCATION_KEYS, "epochs"})
        raise SystemExit(f"{run_dir} holds a run of another config ({differences}): move it "
                         "away or delete it to train this one")


def _recorded(config: Any, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    path = record_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(m) + "\n" for m in history)
    if not path.exists() or path.read_text() != text:
        atomic_write_text(text, path)
    return history


def run_directory(config: Any) -> Path:
    """Where the run of ``config`` lives."""
    return Path(config.out) / config.run_directory_name()


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run directory's ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics there")
    return read_metrics(path)


def _epoch_times(history: list[dict[str, Any]]) -> list[float]:
    # The first epoch pays for warm-up (allocations, caches); leave it out when there are more.
    times = [m["epoch_time"] for m in history]
    return times[1:] if len(times) > 1 else times


def mean_epoch_time(history: list[dict[str, Any]]) -> float:
    return statistics.mean(_epoch_times(history))


def median_epoch_time(history: list[dict[str, Any]]) -> float:
    return statistics.median(_epoch_times(history))


def fmt(value: float | None, digits: int = 2) -> str:
    """A number with ``digits`` decimals, or an en dash for a missing value."""
    return "–" if value is None else f"{value:.{digits}f}"
