"""Readers for the idx format of MNIST and Fashion-MNIST (raw or gzip-compressed files)."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from .base import DatasetError, ImageDataset
from .info import dataset_info

__all__ = ["MNIST_FILES", "find_mnist_dir", "load_mnist", "read_idx"]

# idx type codes (third byte of the magic number) -> numpy dtype; multi-byte types are
# big-endian by definition of the format.
_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# File stems of the four official files, per split: (images, labels).
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions
_LABELS_MAGIC = 0x00000801  # uint8, 1 dimension

# Sub-folders searched under ``root``: the folder the downloader writes (``root/mnist``, same as
# the shared data copy) and torchvision's layout, so an existing torchvision download is reused.
_SUBDIRS = {
    "mnist": (".", "mnist", "MNIST/raw"),
    "fashion_mnist": (".", "fashion_mnist", "fashion-mnist", "FashionMNIST/raw"),
}
_DISPLAY = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def _read_bytes(path: Path) -> bytes:
    """Whole file contents, gunzipped when the name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DatasetError(f"{path}: corrupt or truncated gzip file ({exc})") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read file ({exc})") from exc


def read_idx(path: str | Path, expected_magic: int | None = None) -> npt.NDArray[np.generic]:
    """Read one idx file (``.gz`` or raw) into a numpy array of its declared shape and type.

    Args:
        path: the file.
        expected_magic: if given, the magic number the file must have (2051 for image files,
            2049 for label files).

    Raises:
        DatasetError: unreadable file, unknown magic, or a size that disagrees with the header
            (which is what a truncated download looks like).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        want = f"idx magic {expected_magic}" if expected_magic is not None else "an idx header"
        raise DatasetError(
            f"{path}: expected {want}, got {data[:4].hex() or 'an empty file'} "
            f"({len(data)} bytes; not an idx file)"
        )
    magic = int.from_bytes(data[:4], "big")
    dtype = _IDX_TYPES[data[2]]
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(
            f"{path}: expected an idx header of {header} bytes, got {len(data)} bytes "
            "(truncated file)"
        )
    dims = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    expected = header + math.prod(dims) * dtype.itemsize
    shape_text = "x".join(str(d) for d in dims)
    if expected_magic is not None and magic != expected_magic:
        raise DatasetError(
            f"{path}: expected idx magic {expected_magic}, got {magic} "
            f"({ndim}-d {dtype} of shape {shape_text})"
        )
    if len(data) != expected:
        raise DatasetError(
            f"{path}: expected idx magic {magic} and {shape_text} {dtype} values "
            f"({expected} bytes), got {len(data)} bytes (truncated or corrupt file)"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    # Native byte order and a writable copy, so torch.from_numpy neither warns nor aliases
    # the read-only bytes object.
    return array.astype(dtype.newbyteorder("="), copy=True)


def _existing(directory: Path, stem: str) -> Path | None:
    """The raw file if present (faster to read), else the ``.gz`` file, else ``None``."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_mnist_dir(root: str | Path, variant: str = "mnist", split: str = "train") -> Path | None:
    """The first folder under ``root`` holding both idx files of ``split``, or ``None``."""
    if variant not in _SUBDIRS:
        raise ValueError(f"unknown idx data set {variant!r}; expected one of {sorted(_SUBDIRS)}")
    root = Path(root)
    images_stem, labels_stem = MNIST_FILES[split]
    for sub in _SUBDIRS[variant]:
        directory = root / sub
        if _existing(directory, images_stem) and _existing(directory, labels_stem):
            return directory.resolve()
    return None


def load_mnist(root: str | Path, split: str = "train", variant: str = "mnist") -> ImageDataset:
    """Load MNIST or Fashion-MNIST from the idx files under ``root``.

    Files may be raw or ``.gz`` and may lie in ``root`` itself, in ``root/mnist`` (or
    ``root/fashion_mnist``), or in torchvision's ``root/MNIST/raw`` (``root/FashionMNIST/raw``).

    Args:
        root: data directory.
        split: ``"train"`` or ``"test"``.
        variant: ``"mnist"`` or ``"fashion_mnist"``.

    Raises:
        DatasetError: files missing, truncated, corrupt or inconsistent with each other.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    root = Path(root)
    directory = find_mnist_dir(root, variant, split)
    images_stem, labels_stem = MNIST_FILES[split]
    if directory is None:
        searched = ", ".join(str(root / sub) for sub in _SUBDIRS[variant])
        raise DatasetError(
            f"no {_DISPLAY[variant]} files under {root}: expected {images_stem}[.gz] and "
            f"{labels_stem}[.gz] in one of {searched} (pass download=True / --download to "
            "fetch them)"
        )
    images_path = _existing(directory, images_stem)
    labels_path = _existing(directory, labels_stem)
    assert images_path is not None and labels_path is not None  # guaranteed by find_mnist_dir
    images = read_idx(images_path, _IMAGES_MAGIC)
    labels = read_idx(labels_path, _LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{labels_path}: expected {images.shape[0]} labels to match {images_path}, "
            f"got {labels.shape[0]}"
        )
    info = dataset_info(variant)
    classes = info.classes
    if labels.size and int(labels.max()) >= len(classes):
        raise DatasetError(
            f"{labels_path}: expected labels 0..{len(classes) - 1}, got {int(labels.max())}"
        )
    return ImageDataset(
        images=torch.from_numpy(images).unsqueeze(1),
        labels=torch.from_numpy(labels).to(torch.int64),
        classes=list(classes),
        mean=info.mean,
        std=info.std,
        name=variant,
        split=split,
    )
