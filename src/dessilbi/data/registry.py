"""One entry point, :func:`load_dataset`, for every supported data set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from .base import DatasetError, ImageDataset, default_root
from .cifar import find_cifar_dir, load_cifar
from .download import download_dataset
from .folder import find_split_source, load_image_folder, scan_classes
from .idx import find_mnist_dir, load_mnist
from .info import CIFAR10_CLASSES, DATASET_NAMES, dataset_info

__all__ = ["digits_test_mask", "load_dataset"]

# Where the CIFAR-10 JPEG copy may sit under root: directly, or in the shared-data folder name.
_JPEG_SUBDIRS = (".", "cifar10-jpeg", "cifar10_jpeg")


def digits_test_mask(labels: npt.NDArray[np.integer]) -> npt.NDArray[np.bool_]:
    """Deterministic stratified 80/20 split of the digits: every 5th sample of each class is test.

    Taking samples by position instead of drawing a random permutation keeps the split
    identical across numpy and scikit-learn versions (1,797 images -> 1,442 train, 355 test).
    """
    mask = np.zeros(labels.shape[0], dtype=bool)
    for label in np.unique(labels):
        mask[np.flatnonzero(labels == label)[4::5]] = True
    return mask


def _load_digits(split: str) -> ImageDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetError(
            "the 'digits' data set ships with scikit-learn, which is not installed: "
            "pip install scikit-learn"
        ) from exc
    bunch = load_digits()
    # Pixel values are counts 0..16; rescale to the 0..255 range of every other data set.
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    test = digits_test_mask(labels)
    keep = test if split == "test" else ~test
    info = dataset_info("digits")
    return ImageDataset(
        images=torch.from_numpy(np.ascontiguousarray(images[keep])).unsqueeze(1),
        labels=torch.from_numpy(labels[keep]),
        classes=list(info.classes),
        mean=info.mean,
        std=info.std,
        name="digits",
        split=split,
    )


def load_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    download: bool = False,
) -> ImageDataset:
    """Load a data set into memory as a uint8 :class:`ImageDataset`.

    Args:
        name: ``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``,
            ``cifar10_jpeg`` or ``imagefolder`` (see :data:`DATASET_NAMES`).
        root: data directory (ignored for ``digits``); ``None`` means :func:`default_root`
            (``$DESSILBI_DATA`` or ``./data``). Where the files may lie under it:

            * mnist / fashion_mnist: idx files (raw or ``.gz``) in ``root``, ``root/mnist``
              (``root/fashion_mnist``) or torchvision's ``root/MNIST/raw``
              (``root/FashionMNIST/raw``);
            * cifar10 / cifar100: ``root/cifar-10-batches-py`` / ``root/cifar-100-python``;
            * cifar10_jpeg: ``<split>.zip`` or ``<split>/<class>/*.jpg`` in ``root`` or
              ``root/cifar10-jpeg``;
            * imagefolder: ``root/<split>/<class>/*.jpg|jpeg|png`` or ``root/<split>.zip``.
        split: ``"train"`` or ``"test"`` (``imagefolder`` accepts any split folder name).
        download: fetch MNIST, Fashion-MNIST or CIFAR into ``root`` if they are missing.

    Raises:
        DatasetError: unknown name, or files missing, corrupt or inconsistent (the message
            names the file and what was expected).
    """
    key = name.lower().replace("-", "_")
    if key not in DATASET_NAMES:
        raise DatasetError(f"unknown data set {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    if key != "imagefolder" and split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r} for {key}; expected 'train' or 'test'")
    if key == "digits":
        return _load_digits(split)
    data_root = Path(root) if root is not None else default_root()
    if key in ("mnist", "fashion_mnist"):
        if download and find_mnist_dir(data_root, key, split) is None:
            download_dataset(key, data_root)
        return load_mnist(data_root, split, key)
    if key in ("cifar10", "cifar100"):
        if download and find_cifar_dir(data_root, key, split) is None:
            download_dataset(key, data_root)
        return load_cifar(data_root, split, key)
    if key == "cifar10_jpeg":
        if download and find_split_source(data_root, split, _JPEG_SUBDIRS) is None:
            raise DatasetError(
                f"cifar10_jpeg has no download: expected {split}.zip under {data_root} or "
                f"{data_root / 'cifar10-jpeg'}; use cifar10 with download=True instead"
            )
        info = dataset_info(key)
        return load_image_folder(
            data_root,
            split,
            classes=CIFAR10_CLASSES,
            name=key,
            mean=info.mean,
            std=info.std,
            subdirs=_JPEG_SUBDIRS,
        )
    # imagefolder: label other splits with the training classes so that labels agree even when
    # a split lacks a class.
    classes = None
    if split != "train":
        train_source = find_split_source(data_root, "train")
        if train_source is not None:
            classes = scan_classes(train_source)
    return load_image_folder(data_root, split, classes=classes, name=key)
