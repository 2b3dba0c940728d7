"""Data sets for dessilbi: loaders, metadata, downloads and batched augmentation.

Typical use::

    from dessilbi.data import BatchAugment, dataset_info, load_dataset

    train = load_dataset("cifar10", "data", "train", download=True).to("cuda")
    augment = BatchAugment.from_info(dataset_info("cifar10"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = augment(train.images[:128], gen)  # float32, augmented and normalised
    x_eval = augment(test_images)         # no generator: only normalised

Small data sets (digits, MNIST, Fashion-MNIST, CIFAR, the CIFAR-10 JPEG copy) are held in
memory as uint8 tensors; ImageNet-size folders are read lazily with :class:`FolderDataset`.
"""

from .augment import BatchAugment
from .base import DatasetError, DatasetInfo, ImageDataset, default_root
from .cache import cache_dir
from .cifar import load_cifar, read_cifar_pickle
from .download import CHECKSUMS, MIRROR_ENV, MIRRORS, download_dataset, extract_tar
from .folder import MAX_IN_MEMORY, FolderDataset, load_image_folder, random_resized_crop_box
from .idx import load_mnist, read_idx
from .info import DATASET_NAMES, dataset_info
from .registry import load_dataset

__all__ = [
    "CHECKSUMS",
    "DATASET_NAMES",
    "MAX_IN_MEMORY",
    "MIRRORS",
    "MIRROR_ENV",
    "BatchAugment",
    "DatasetError",
    "DatasetInfo",
    "FolderDataset",
    "ImageDataset",
    "cache_dir",
    "dataset_info",
    "default_root",
    "download_dataset",
    "extract_tar",
    "load_cifar",
    "load_dataset",
    "load_image_folder",
    "load_mnist",
    "random_resized_crop_box",
    "read_cifar_pickle",
    "read_idx",
]
