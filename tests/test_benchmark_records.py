"""The benchmarks' records of finished runs: written when a run finishes, read instead of
training again when only the numbers are needed, and never for another config."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from dessilbi.config import load_config

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import _runs


@pytest.fixture
def records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "records"
    monkeypatch.setattr(_runs, "RECORDS", folder)
    return folder


def _config(tmp_path: Path, **changes: Any) -> Any:
    return load_config("digits", {"epochs": 2, "nu": 5, "out": str(tmp_path / "runs"),
                                  "run_name": "quick", **changes})


def test_a_finished_run_is_recorded_and_not_trained_again(
        tmp_path: Path, records: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    config = _config(tmp_path)
    history = _runs.advance(config)
    assert [m["epoch"] for m in history] == [1, 2]
    assert _runs.record_path(config).parent == records
    assert _runs.recorded_history(config) == history

    shutil.rmtree(_runs.run_directory(config))  # a new checkout: runs/ is not committed

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr(_runs, "train", no_training)
    assert _runs.advance(config, history_only=True) == history
    # A run whose files are needed, or another config, is not served by the record.
    with pytest.raises(AssertionError, match="trained again"):
        _runs.advance(config)
    assert _runs.recorded_history(_config(tmp_path, lr=0.05)) is None
    assert _runs.recorded_history(_config(tmp_path, epochs=3)) is None
