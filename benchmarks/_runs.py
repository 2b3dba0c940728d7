"""Helpers shared by the real-data benchmarks: common options, runs advanced epoch by epoch, run
metrics, number formatting."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def advance(config: Any, callbacks: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Train the run of ``config`` up to its ``epochs`` (resumed, with the same ``callbacks``;
    a run already there is only read back) and return its per-epoch records."""
    run_dir = run_directory(config)
    if (run_dir / "checkpoint.pt").exists():
        history = read_history(run_dir)
        if len(history) >= config.epochs:
            return history[: config.epochs]
        return read_history(train(config, quiet=True, resume_dir=run_dir,
                                  callbacks=callbacks).run_dir)
    return read_history(train(config, quiet=True, callbacks=callbacks).run_dir)


def run_directory(config: Any) -> Path:
    """Where the run of ``config`` lives."""
    return Path(config.out) / config.run_directory_name()


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run directory's ``metrics.jsonl``."""
    text = (run_dir / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


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
