"""Static metadata of the known data sets (no file access, except to list an image folder)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .base import DatasetError, DatasetInfo

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "DATASET_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "dataset_info",
]

# The official label order of CIFAR-10 (it happens to be alphabetical).
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# The official fine-label order of CIFAR-100 (``fine_label_names`` in ``meta``); used when the
# metadata file is absent and by :func:`dataset_info`, which must not read files.
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

MNIST_CLASSES = tuple(str(digit) for digit in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
# The widely used (if slightly mis-computed: it averages per-image stds) CIFAR-10 constants,
# kept so that results compare with the literature.
_CIFAR10_STD = (0.2023, 0.1994, 0.2010)

_INFOS: dict[str, DatasetInfo] = {
    # Digits: mean/std of the deterministic training split after rescaling 0..16 -> 0..255.
    "digits": DatasetInfo("digits", 10, 1, (8, 8), (0.3052,), (0.3760,), classes=MNIST_CLASSES),
    "mnist": DatasetInfo("mnist", 10, 1, (28, 28), (0.1307,), (0.3081,), classes=MNIST_CLASSES),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", 10, 1, (28, 28), (0.2860,), (0.3530,), classes=FASHION_MNIST_CLASSES
    ),
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, (32, 32), _CIFAR10_MEAN, _CIFAR10_STD, 4, True, CIFAR10_CLASSES
    ),
    "cifar10_jpeg": DatasetInfo(
        "cifar10_jpeg", 10, 3, (32, 32), _CIFAR10_MEAN, _CIFAR10_STD, 4, True, CIFAR10_CLASSES
    ),
    "cifar100": DatasetInfo(
        "cifar100",
        100,
        3,
        (32, 32),
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        4,
        True,
        CIFAR100_CLASSES,
    ),
    # A generic folder read lazily with ImageNet preprocessing: random-resized-crop and flip
    # happen per sample in FolderDataset, so the batch augmentation only normalises.
    "imagefolder": DatasetInfo(
        "imagefolder", 0, 3, (224, 224), IMAGENET_MEAN, IMAGENET_STD, 0, False, (), True
    ),
}

DATASET_NAMES = tuple(_INFOS)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def list_classes(split_dir: Path) -> list[str]:
    """Sorted names of the class sub-folders of ``split_dir`` (hidden folders skipped)."""
    return sorted(
        entry.name
        for entry in split_dir.iterdir()
        if entry.is_dir() and not entry.name.startswith(".")
    )


def dataset_info(name: str, root: str | Path | None = None) -> DatasetInfo:
    """Metadata of data set ``name`` without loading it.

    Args:
        name: one of :data:`DATASET_NAMES`.
        root: only used for ``"imagefolder"``, whose classes are the sub-folders of
            ``root/train``; the other data sets have fixed metadata.

    Raises:
        DatasetError: unknown name, or ``"imagefolder"`` without a usable ``root``.
    """
    key = name.lower().replace("-", "_")
    if key not in _INFOS:
        raise DatasetError(f"unknown data set {name!r}; expected one of {', '.join(_INFOS)}")
    info = _INFOS[key]
    if key != "imagefolder":
        return info
    if root is None:
        raise DatasetError(
            "imagefolder: the number of classes depends on the folder; pass its root"
        )
    train_dir = Path(root) / "train"
    if not train_dir.is_dir():
        raise DatasetError(f"imagefolder: expected a directory {train_dir}, found none")
    classes = list_classes(train_dir)
    if not classes:
        raise DatasetError(f"imagefolder: expected class sub-folders in {train_dir}, found none")
    return replace(info, num_classes=len(classes), classes=tuple(classes))
