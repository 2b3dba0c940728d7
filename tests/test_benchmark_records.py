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


def test_records_of_unfinished_or_damaged_runs_count_as_none(
        tmp_path: Path, records: Path) -> None:
    config = _config(tmp_path)
    path = _runs.record_path(config)
    path.parent.mkdir(parents=True)
    path.write_text('{"epoch": 1}\n')  # one of the two epochs
    assert _runs.recorded_history(config) is None
    path.write_text('{"epoch": 1}\n{"epo')  # cut off mid-write
    with pytest.warns(UserWarning, match="unreadable record"):
        assert _runs.recorded_history(config) is None


def test_a_run_directory_of_another_config_is_refused(
        tmp_path: Path, records: Path, one_thread: None) -> None:
    """The benchmarks name run directories without a hash: one left from an earlier config
    must not pass its numbers off as the new config's (nor be recorded under its hash)."""
    _runs.advance(_config(tmp_path))
    changed = _config(tmp_path, lr=0.05)
    with pytest.raises(SystemExit, match=r"holds a run of another config \(lr: 0.1 -> 0.05\)"):
        _runs.advance(changed)
    assert not _runs.record_path(changed).exists()
    # A longer run of the same config is the same run, continued.
    assert [m["epoch"] for m in _runs.advance(_config(tmp_path, epochs=3))] == [1, 2, 3]
