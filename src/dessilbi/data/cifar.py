"""Readers for the official CIFAR-10 / CIFAR-100 "python version" pickle batches.

Pickle files can run arbitrary code when loaded, so they are read with a restricted unpickler
that only resolves the handful of numpy globals an array needs; anything else is refused.
"""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from .base import DatasetError, ImageDataset
from .info import dataset_info

__all__ = ["CIFAR_LAYOUT", "find_cifar_dir", "load_cifar", "read_cifar_pickle"]

try:  # numpy >= 2 moved the implementation modules to numpy._core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


# Private helper that protocol-5 pickles of arrays reference; looked up by name because the
# numpy stubs do not declare it.
_FROMBUFFER: Callable[..., Any] = vars(_numeric)["_frombuffer"]


def _checked_dtype(*args: Any) -> np.dtype:
    # Object arrays would let a pickle smuggle arbitrary Python objects into the data.
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("object dtypes are not allowed in a CIFAR batch")
    return dtype


def _checked_reconstruct(subtype: Any, *args: Any) -> Any:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("only plain numpy arrays are allowed in a CIFAR batch")
    return _multiarray._reconstruct(subtype, *args)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles bytes (protocol < 3) as _codecs.encode(text, "latin1"); other codecs
    # (e.g. compression codecs) have no business in a data file.
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed in a CIFAR batch")
    return text.encode("latin1")


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _checked_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytearray"): bytearray,
    ("__builtin__", "bytearray"): bytearray,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only :data:`_ALLOWED_GLOBALS` (plain containers need no globals)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: not an array type a CIFAR batch needs"
            ) from None


def read_cifar_pickle(path: str | Path) -> dict[str, Any]:
    """Safely load one CIFAR pickle file into a dict with ``str`` keys.

    Raises:
        DatasetError: missing or unreadable file, a pickle that is truncated or corrupt, one
            that needs globals other than numpy arrays, or a top-level object that is not a dict.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            # latin1 maps the Python-2 strings of the official files to str and lets numpy
            # restore the raw array bytes unchanged.
            obj = _RestrictedUnpickler(handle, encoding="latin1").load()
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OSError) as exc:  # fmt: skip
        raise DatasetError(
            f"{path}: expected a CIFAR python pickle batch, could not unpickle it "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


# Per variant: (folder inside root, train files, test files, label key, meta file, names key).
CIFAR_LAYOUT: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str, str, str]] = {
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{k}" for k in range(1, 6)),
        ("test_batch",),
        "labels",
        "batches.meta",
        "label_names",
    ),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "fine_labels", "meta",
                 "fine_label_names"),
}  # fmt: skip
_DISPLAY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def _split_files(variant: str, split: str) -> tuple[str, ...]:
    layout = CIFAR_LAYOUT[variant]
    if split == "train":
        return layout[1]
    if split == "test":
        return layout[2]
    raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")


def find_cifar_dir(root: str | Path, variant: str = "cifar10", split: str = "train") -> Path | None:
    """The folder under ``root`` holding the batch files of ``split`` (``root/<official
    folder>`` or ``root`` itself), or ``None``."""
    if variant not in CIFAR_LAYOUT:
        raise ValueError(f"unknown CIFAR variant {variant!r}; expected one of {list(CIFAR_LAYOUT)}")
    root = Path(root)
    files = _split_files(variant, split)
    for directory in (root / CIFAR_LAYOUT[variant][0], root):
        if all((directory / name).is_file() for name in files):
            return directory.resolve()
    return None


def _batch_arrays(
    path: Path, label_key: str
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    batch = read_cifar_pickle(path)
    data = batch.get("data")
    labels = batch.get(label_key)
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or (data.shape[1] != 3 * 32 * 32)
    ):
        got = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DatasetError(f"{path}: expected 'data' as a uint8 array [N, 3072], got {got}")
    if labels is None:
        raise DatasetError(f"{path}: expected a '{label_key}' entry, found keys {sorted(batch)}")
    label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
    if label_array.shape[0] != data.shape[0]:
        raise DatasetError(
            f"{path}: expected {data.shape[0]} labels to match the images, "
            f"got {label_array.shape[0]}"
        )
    return data, label_array


def load_cifar(root: str | Path, split: str = "train", variant: str = "cifar10") -> ImageDataset:
    """Load CIFAR-10 or CIFAR-100 from the official python batches under ``root``.

    ``root`` may contain the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``)
    or be that folder. CIFAR-100 uses the 100 fine labels.

    Raises:
        DatasetError: batches missing, corrupt, or not in the official layout.
    """
    root = Path(root)
    files = _split_files(variant, split)
    folder, _, _, label_key, meta_name, names_key = CIFAR_LAYOUT[variant]
    directory = find_cifar_dir(root, variant, split)
    if directory is None:
        jpeg = variant == "cifar10" and any(
            (where / f"{split}.zip").is_file() or (where / split).is_dir()
            for where in (root, root / "cifar10-jpeg")
        )
        hint = (f"; {root} holds the JPEG copy of CIFAR-10, which --dataset cifar10_jpeg reads"
                if jpeg else " (pass download=True / --download to fetch them)")
        raise DatasetError(
            f"no {_DISPLAY[variant]} batches under {root}: expected {', '.join(files)} in "
            f"{root / folder} or {root}{hint}"
        )
    arrays = [_batch_arrays(directory / name, label_key) for name in files]
    data = np.concatenate([a[0] for a in arrays]) if len(arrays) > 1 else arrays[0][0]
    labels = np.concatenate([a[1] for a in arrays]) if len(arrays) > 1 else arrays[0][1]
    info = dataset_info(variant)
    classes = list(info.classes)
    meta_path = directory / meta_name
    if meta_path.is_file():
        names = read_cifar_pickle(meta_path).get(names_key)
        if isinstance(names, list) and len(names) == info.num_classes:
            classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DatasetError(
            f"{directory}: expected labels 0..{len(classes) - 1}, "
            f"got {int(labels.min())}..{int(labels.max())}"
        )
    # Each row holds the 1024 red, then green, then blue values of a 32x32 image in row-major
    # order, which is exactly [3, 32, 32] in C order.
    # np.require copies only when needed (e.g. a read-only buffer from a protocol-5 pickle), so
    # that torch.from_numpy gets a writable array it may share.
    data = np.require(data, requirements=["C", "W"])
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32))
    return ImageDataset(
        images=images,
        labels=torch.from_numpy(np.require(labels, requirements=["C", "W"])),
        classes=classes,
        mean=info.mean,
        std=info.std,
        name=variant,
        split=split,
    )
