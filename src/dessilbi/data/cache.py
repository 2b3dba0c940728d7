"""On-disk cache of decoded image tensors, so that JPEG folders are decoded only once.

The cache lives in ``$DESSILBI_CACHE`` (set it to ``off`` to disable caching), else in
``$XDG_CACHE_HOME/dessilbi`` or ``~/.cache/dessilbi``. Entries are keyed by a string that
describes the source files (path, size, modification time, ...); a changed source yields a new
key, so a stale entry is never returned. Reading uses ``torch.load(weights_only=True)``, which
cannot execute code even if a cache file was tampered with.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["cache_dir", "load_cached", "save_cached"]

_CACHE_FORMAT = 1  # bump when the payload layout changes
_DISABLED = {"", "0", "off", "none", "false", "no"}


def cache_dir() -> Path | None:
    """The cache directory, or ``None`` when caching is disabled (``DESSILBI_CACHE=off``)."""
    env = os.environ.get("DESSILBI_CACHE")
    if env is not None:
        return None if env.strip().lower() in _DISABLED else Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    try:
        base = Path(xdg) if xdg else Path.home() / ".cache"
    except RuntimeError:  # no home directory can be determined
        return None
    return base / "dessilbi"


def _entry_path(tag: str, key: str) -> Path | None:
    directory = cache_dir()
    if directory is None:
        return None
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]
    return directory / f"{tag}-{digest}.pt"


def load_cached(tag: str, key: str) -> dict[str, Any] | None:
    """The payload stored under ``(tag, key)``, or ``None`` if absent, unreadable or stale."""
    path = _entry_path(tag, key)
    if path is None or not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # any unreadable cache entry (truncated, other format) is rebuilt
        return None
    if (
        not isinstance(payload, dict)
        or payload.get("format") != _CACHE_FORMAT
        or payload.get("key") != key
    ):
        return None
    return payload


def save_cached(tag: str, key: str, payload: dict[str, Any]) -> Path | None:
    """Store ``payload`` (tensors, lists, strings, numbers) under ``(tag, key)``.

    The file is written under a temporary name and renamed into place, so concurrent readers
    never see half a file. Returns the path, or ``None`` (with a warning) when the cache is
    disabled or cannot be written: caching is an optimisation, never a reason to fail.
    """
    path = _entry_path(tag, key)
    if path is None:
        return None
    tmp_name: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            torch.save({**payload, "format": _CACHE_FORMAT, "key": key}, handle)
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as exc:
        warnings.warn(
            f"could not write the dataset cache {path} ({exc}); the data will be decoded again "
            "next time (set DESSILBI_CACHE to a writable directory, or to 'off')",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
    return path
