"""The files of a run directory: atomic writes, checkpoints, metrics and saved weights.

Every file is written to a temporary name in the same directory, flushed to disk, and renamed
over its final name, so a crash (even SIGKILL) never leaves a half-written file under a name
that a later run reads.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "RunFiles",
    "TrainingError",
    "TrainingInterrupted",
    "atomic_save",
    "atomic_write_text",
    "config_differences",
    "load_checkpoint",
    "load_model_file",
    "load_weights",
    "read_metrics",
    "write_metrics",
]

CHECKPOINT_FORMAT = "dessilbi-checkpoint"
#: 2: the path lives in ``path.pt`` only; architecture, callbacks and gradient scaler saved.
CHECKPOINT_VERSION = 2


class CheckpointError(RuntimeError):
    """A checkpoint (or a weights file) is missing, damaged, or belongs to another run."""


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (temporary file, fsync, rename)."""
    tmp = _temporary(path)
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename)."""
    tmp = _temporary(path)
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _torch_load(path: Path, what: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no {what} here")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{path}: damaged or not a torch file ({type(exc).__name__}: {exc})"
        ) from exc


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a dessilbi checkpoint with ``weights_only=True``, or raise :class:`CheckpointError`."""
    ckpt = _torch_load(path, "checkpoint (nothing to resume)")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a dessilbi checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {ckpt.get('version')} is not supported "
            f"(this dessilbi writes version {CHECKPOINT_VERSION} and does not upgrade older "
            "checkpoints); start the run again in another directory, or continue it with the "
            "dessilbi version that wrote it"
        )
    return ckpt


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict of weights: a bare one (``init.pt``, ``model.pt``) or a checkpoint's model."""
    loaded = _torch_load(path, "weights file")
    if isinstance(loaded, dict) and loaded.get("format") == CHECKPOINT_FORMAT:
        loaded = loaded.get("model")
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise CheckpointError(f"{path}: not a state dict of weights (name -> tensor)")
    return dict(loaded)


def load_model_file(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``model.pt`` (the final weights) and ``model.json`` (their architecture and epoch)."""
    meta_path = run_dir / "model.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: missing (it is written when a run has finished)")
    try:
        meta = json.loads(meta_path.read_text())
        meta["architecture"]["name"], int(meta["epoch"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{meta_path}: damaged ({type(exc).__name__}: {exc})") from exc
    return load_weights(run_dir / "model.pt"), meta


def config_differences(saved: Path, current: Mapping[str, Any], ignore: set[str]) -> str:
    """The keys whose values differ between the saved config and ``current`` ("" if none)."""
    if not saved.is_file():
        return f"{saved} is missing"
    old = yaml.safe_load(saved.read_text()) or {}
    keys = sorted(
        k for k in set(old) | set(current) if k not in ignore and old.get(k) != current.get(k)
    )
    return ", ".join(f"{k}: {old.get(k)!r} -> {current.get(k)!r}" for k in keys)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The per-epoch records of ``metrics.jsonl`` (empty when the file does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(records: list[dict[str, Any]], path: Path) -> None:
    """Rewrite ``metrics.jsonl`` atomically with ``records`` (one JSON object per line)."""
    atomic_write_text("".join(json.dumps(r) + "\n" for r in records), path)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, a run directory in the way, ...)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C); the message says what was kept and how to go on.

    A ``KeyboardInterrupt``, so that ``except Exception`` in a user's sweep does not swallow it.
    """


#: Keys that may differ between a run directory's config and a rerun of it.
_RESUMABLE_KEYS = {
    "device", "workers", "eval_batch_size", "data_dir", "out", "download", "run_name"
}
#: Files a run leaves behind once it has trained an epoch.
_RESULT_FILES = ("metrics.jsonl", "path.pt", "model.pt", "model.json")


def _other_run_message(run_dir: Path, differences: str, epochs: int) -> str:
    """Why a run directory is refused, with the command that continues what it holds."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    only_epochs = differences.startswith("epochs:") and "," not in differences
    if only_epochs and int(saved.get("epochs", 0)) >= epochs:
        return (f"run directory {run_dir} holds this run extended to {saved['epochs']} epochs "
                f"(more than the {epochs} asked for); `dessilbi train --resume {run_dir}` "
                "reports it, or choose another --run-name or --out")
    extend = (f"`dessilbi train --resume {run_dir} --epochs {epochs}`" if only_epochs
              else f"`dessilbi train --resume {run_dir}`")
    return (f"run directory {run_dir} already holds a run with another configuration "
            f"({differences}); choose another --run-name or --out, or continue it with {extend}")


class RunFiles:
    """The files of one run directory, in the order and form the training loop keeps them.

    Only rank 0 writes; every method is a no-op on the other ranks.
    """

    def __init__(self, run_dir: Path, is_main: bool) -> None:
        self.run_dir = run_dir
        self.is_main = is_main
        self.metrics_path = run_dir / "metrics.jsonl"
        self.path_path = run_dir / "path.pt"
        self.checkpoint_path = run_dir / "checkpoint.pt"

    @classmethod
    def open(
        cls, config: Any, resume_dir: Path | None, is_main: bool, world_size: int = 1
    ) -> tuple[RunFiles, dict[str, Any] | None]:
        """The run directory of ``config`` and its checkpoint when the run is to be continued.

        Rerunning the same configuration continues the run (or just reports it when it is
        complete); a different configuration must not overwrite it, and neither must a new run
        overwrite the results of one whose checkpoint is gone.
        """
        run_dir = resume_dir if resume_dir is not None else Path(config.out) / (
            config.run_directory_name(world_size)
        )
        files = cls(run_dir, is_main)
        if resume_dir is None and files.checkpoint_path.exists():
            differences = config_differences(
                run_dir / "config.yaml", config.to_dict(), _RESUMABLE_KEYS
            )
            if differences:
                raise TrainingError(_other_run_message(run_dir, differences, config.epochs))
            resume_dir = run_dir
        if resume_dir is None:
            files.refuse_leftovers()
        ckpt = load_checkpoint(files.checkpoint_path) if resume_dir is not None else None
        if ckpt is not None and ckpt["model_name"] != config.model:
            raise CheckpointError(
                f"{files.checkpoint_path}: written for model {ckpt['model_name']!r}, "
                f"but the config builds {config.model!r}"
            )
        return files, ckpt

    def refuse_leftovers(self) -> None:
        """Refuse to start over in a directory holding results but no checkpoint to resume."""
        # A crash while epoch 1 was being saved leaves its path.pt and metrics line but no
        # checkpoint: nothing to lose there, the run starts over.
        epochs_recorded = len(read_metrics(self.metrics_path))
        if epochs_recorded <= 1 and not (self.run_dir / "model.pt").is_file():
            return
        left = [name for name in _RESULT_FILES if (self.run_dir / name).is_file()]
        if left:
            raise TrainingError(
                f"run directory {self.run_dir} holds the results of an earlier run "
                f"({', '.join(left)}) but no checkpoint.pt to continue from; a new run would "
                "overwrite them: move them away, or choose another --out or --run-name"
            )

    def start(self, config: Any, initial_weights: dict[str, torch.Tensor]) -> None:
        """A new run: the directory, ``config.yaml``, ``init.pt`` and an empty metrics file."""
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.write_config(config)
        atomic_save(initial_weights, self.run_dir / "init.pt")
        write_metrics([], self.metrics_path)

    def write_config(self, config: Any) -> None:
        """``config.yaml``: the resolved configuration (rewritten when a resume extends it)."""
        if self.is_main:
            atomic_write_text(yaml.safe_dump(config.to_dict(), sort_keys=False),
                              self.run_dir / "config.yaml")

    def resume_records(self, epoch: int) -> list[dict[str, Any]]:
        """Cut ``metrics.jsonl`` back to ``epoch`` (later lines were lost with a crash)."""
        kept = [m for m in read_metrics(self.metrics_path) if m["epoch"] <= epoch]
        if self.is_main:
            write_metrics(kept, self.metrics_path)
        return kept

    def read_path(self) -> dict[str, Any]:
        """The recorded path (``path.pt``), for a resume."""
        state = _torch_load(self.path_path, "path file (path.pt), needed to resume")
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path_path}: not a dessilbi path file")
        return state

    def save_model(self, weights: dict[str, torch.Tensor], architecture: dict[str, Any],
                   epoch: int) -> None:
        """``model.pt`` (a bare state dict) and ``model.json`` (what builds it, and when)."""
        if not self.is_main:
            return
        # The architecture first: a crash between the two renames can leave weights that it
        # does not build, which load_run reports, never weights read with a wrong epoch.
        atomic_write_text(json.dumps({"architecture": architecture, "epoch": epoch}, indent=1)
                          + "\n", self.run_dir / "model.json")
        atomic_save(weights, self.run_dir / "model.pt")

    def save_epoch(
        self,
        records: list[dict[str, Any]],
        path_state: Callable[[], dict[str, Any]] | None,
        checkpoint: Callable[[], dict[str, Any]],
    ) -> None:
        """An epoch's files, in this order: ``path.pt``, ``metrics.jsonl``, ``checkpoint.pt``.

        The checkpoint comes last, so whatever it says was finished is on disk in the others.
        """
        if not self.is_main:
            return
        if path_state is not None:
            atomic_save(path_state(), self.path_path)
        write_metrics(records, self.metrics_path)
        atomic_save(checkpoint(), self.checkpoint_path)
