"""Image folders: ``<root>/<split>/<class>/*.jpg|jpeg|png`` unpacked or as ``<root>/<split>.zip``.

Two ways to read them:

* :func:`load_image_folder` decodes a small folder (CIFAR-size) once into one uint8 tensor held
  in memory and caches the decoded tensor on disk (see :mod:`dessilbi.data.cache`).
* :class:`FolderDataset` reads a large folder (ImageNet-size) lazily, one file per sample, with
  the standard ImageNet preprocessing, for use with a :class:`torch.utils.data.DataLoader`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import DatasetError, ImageDataset
from .cache import load_cached, save_cached
from .info import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, list_classes

__all__ = [
    "MAX_IN_MEMORY",
    "FolderDataset",
    "find_split_source",
    "load_image_folder",
    "random_resized_crop_box",
]

# Above this many images a folder is not decoded into memory (ImageNet's 1.28M training images
# would need ~190 GB at 224x224); FolderDataset reads such folders lazily instead.
MAX_IN_MEMORY = 200_000


def _require_pillow() -> None:
    """Fail with a clear message when Pillow is missing (it is only needed for image files)."""
    if importlib.util.find_spec("PIL") is None:  # pragma: no cover - depends on the environment
        raise DatasetError("reading JPEG/PNG images needs Pillow: pip install pillow")


@dataclass(frozen=True)
class SplitSource:
    """Where the images of one split live: an unpacked folder or a zip archive."""

    kind: str  # "dir" or "zip"
    path: Path


def find_split_source(
    root: str | Path, split: str, subdirs: Sequence[str] = (".",)
) -> SplitSource | None:
    """Locate ``<root>/<sub>/<split>/`` or ``<root>/<sub>/<split>.zip`` for each ``sub``.

    An unpacked folder wins over a zip next to it (it is what the user last touched).
    """
    for sub in subdirs:
        base = Path(root) / sub
        if (base / split).is_dir():
            return SplitSource("dir", (base / split).resolve())
        if (base / f"{split}.zip").is_file():
            return SplitSource("zip", (base / f"{split}.zip").resolve())
    return None


def _is_image_name(parts: Sequence[str]) -> bool:
    # Skip hidden files and macOS resource forks (``__MACOSX/``, ``._x.jpg``) that zip tools add.
    if any(part.startswith(".") or part == "__MACOSX" for part in parts):
        return False
    return parts[-1].lower().endswith(IMAGE_EXTENSIONS)


def _scan(source: SplitSource) -> list[tuple[str, str]]:
    """``(member, class name)`` of every image, sorted by class then name.

    ``member`` is the zip member name, or the path relative to the split folder.
    """
    entries: list[tuple[str, str]] = []
    if source.kind == "zip":
        try:
            with zipfile.ZipFile(source.path) as archive:
                names = [info.filename for info in archive.infolist() if not info.is_dir()]
        except (zipfile.BadZipFile, OSError) as exc:
            raise DatasetError(f"{source.path}: expected a zip archive, got {exc}") from exc
        for name in names:
            parts = PurePosixPath(name).parts
            if len(parts) >= 2 and _is_image_name(parts):
                entries.append((name, parts[-2]))
    else:
        for class_name in list_classes(source.path):
            for dirpath, dirnames, filenames in os.walk(source.path / class_name):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for filename in filenames:
                    if _is_image_name((filename,)):
                        relative = Path(dirpath, filename).relative_to(source.path)
                        entries.append((relative.as_posix(), class_name))
    entries.sort(key=lambda entry: (entry[1], entry[0]))
    return entries


def scan_classes(source: SplitSource) -> list[str]:
    """Sorted class names present in ``source``."""
    return sorted({class_name for _, class_name in _scan(source)})


def _label_entries(
    source: SplitSource, classes: Sequence[str] | None, max_per_class: int | None
) -> tuple[list[tuple[str, int]], list[str]]:
    entries = _scan(source)
    if not entries:
        raise DatasetError(
            f"{source.path}: expected images ({', '.join(IMAGE_EXTENSIONS)}) in class folders "
            "<class>/<image>, found none"
        )
    found = sorted({class_name for _, class_name in entries})
    class_list = list(classes) if classes is not None else found
    index = {name: k for k, name in enumerate(class_list)}
    unknown = [name for name in found if name not in index]
    if unknown:
        raise DatasetError(
            f"{source.path}: unexpected class folder(s) {unknown[:5]}; expected only "
            f"{class_list[:10]}{' ...' if len(class_list) > 10 else ''}"
        )
    labelled: list[tuple[str, int]] = []
    taken: dict[str, int] = {}
    for member, class_name in entries:
        if max_per_class is not None and taken.get(class_name, 0) >= max_per_class:
            continue
        taken[class_name] = taken.get(class_name, 0) + 1
        labelled.append((member, index[class_name]))
    return labelled, class_list


def _source_key(source: SplitSource, entries: Sequence[tuple[str, int]], extra: str) -> str:
    """A string that changes whenever the decoded result could change."""
    if source.kind == "zip":
        stat = source.path.stat()
        files = f"{stat.st_size}:{stat.st_mtime_ns}"
    else:
        digest = hashlib.sha256()
        for member, label in entries:
            stat = (source.path / member).stat()
            digest.update(f"{member}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        files = digest.hexdigest()
    return f"{source.kind}:{source.path}:{files}:{len(entries)}:{extra}"


def _decode_rgb(blob: bytes, name: str) -> np.ndarray:
    """Decode one JPEG/PNG to an ``[H, W, 3]`` uint8 array, naming the file on failure."""
    _require_pillow()
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as exc:
        # OSError covers Pillow's UnidentifiedImageError and "image file is truncated".
        raise DatasetError(
            f"{name}: expected a JPEG or PNG image, could not decode it ({exc})"
        ) from exc


def _decode_all(
    read: Callable[[str], bytes], entries: Sequence[tuple[str, int]], where: Path
) -> np.ndarray:
    """Decode all images into one ``[N, H, W, 3]`` array; all must share one size."""
    # Serial on purpose: Pillow holds the GIL while decoding small JPEGs, so threads do not help,
    # and a process pool costs a torch import per worker; 50,000 CIFAR JPEGs take ~3 s, once,
    # since the result is cached.
    out: np.ndarray | None = None
    for k, (member, _) in enumerate(entries):
        name = f"{where}/{member}" if where.suffix != ".zip" else f"{where}:{member}"
        pixels = _decode_rgb(read(member), name)
        if out is None:
            out = np.empty((len(entries), *pixels.shape), dtype=np.uint8)
        elif pixels.shape != out.shape[1:]:
            raise DatasetError(
                f"{name}: expected {out.shape[1]}x{out.shape[2]} pixels like the first image "
                f"{entries[0][0]}, got {pixels.shape[0]}x{pixels.shape[1]}; images of "
                "different sizes cannot be stacked in memory, use FolderDataset instead"
            )
        out[k] = pixels
    assert out is not None  # entries is never empty here
    return out


def _valid_payload(payload: dict[str, object], count: int) -> bool:
    images, labels = payload.get("images"), payload.get("labels")
    return (
        isinstance(images, torch.Tensor)
        and isinstance(labels, torch.Tensor)
        and images.dtype == torch.uint8
        and images.dim() == 4
        and images.shape[0] == count
        and labels.dtype == torch.int64
        and labels.shape == (count,)
    )


def load_image_folder(
    root: str | Path,
    split: str = "train",
    *,
    classes: Sequence[str] | None = None,
    name: str = "imagefolder",
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    subdirs: Sequence[str] = (".",),
    max_per_class: int | None = None,
    use_cache: bool = True,
) -> ImageDataset:
    """Decode an image folder or zip into memory: ``<root>/<split>/<class>/<image>``.

    Args:
        root: directory containing ``<split>/`` or ``<split>.zip``.
        split: split folder name, e.g. ``"train"`` or ``"test"``.
        classes: class names in label order; default: the sorted class folder names.
            Pass the training classes when loading another split so labels agree.
        name: data set name stored in the result and used in the cache file name.
        mean, std: per-channel normalisation constants stored in the result.
        subdirs: sub-folders of ``root`` searched in order (``"."`` is ``root`` itself).
        max_per_class: decode at most this many images per class (the first ones by name);
            handy for quick experiments and tests.
        use_cache: read and write the decoded tensor from/to the on-disk cache.

    Raises:
        DatasetError: folder missing or empty, unknown class folders, an undecodable image,
            images of different sizes, or more than :data:`MAX_IN_MEMORY` images.
    """
    source = find_split_source(root, split, subdirs)
    if source is None:
        bases = [Path(root) / sub for sub in subdirs]
        options = " or ".join(
            f"{b / split}/<class>/*.jpg|jpeg|png or {b / split}.zip" for b in bases
        )
        raise DatasetError(f"no {name} images for split {split!r} under {root}: expected {options}")
    entries, class_list = _label_entries(source, classes, max_per_class)
    if len(entries) > MAX_IN_MEMORY:
        raise DatasetError(
            f"{source.path}: {len(entries)} images are more than the {MAX_IN_MEMORY} held in "
            "memory; read this folder lazily with FolderDataset"
        )
    key = _source_key(source, entries, f"{split}:{max_per_class}:{'|'.join(class_list)}")
    tag = f"{name}-{split}"
    cached = load_cached(tag, key) if use_cache else None
    if cached is not None and not _valid_payload(cached, len(entries)):
        cached = None  # written by something else under our name: decode afresh
    if cached is not None:
        images, labels = cached["images"], cached["labels"]
    else:
        if source.kind == "zip":
            with zipfile.ZipFile(source.path) as archive:
                pixels = _decode_all(archive.read, entries, source.path)
        else:
            pixels = _decode_all(lambda m: (source.path / m).read_bytes(), entries, source.path)
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor([label for _, label in entries], dtype=torch.int64)
        if use_cache:
            save_cached(tag, key, {"images": images, "labels": labels})
    return ImageDataset(
        images=images,
        labels=labels,
        classes=class_list,
        mean=mean,
        std=std,
        name=name,
        split=split,
    )


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Sample the Inception-style random crop ``(left, top, crop_width, crop_height)``.

    A crop covering a uniform fraction in ``scale`` of the area with a log-uniform aspect ratio
    in ``ratio`` is tried 10 times; if none fits, the largest centred crop whose aspect ratio is
    clamped into ``ratio`` is used.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        draws = torch.rand(2, generator=generator).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * draws[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * draws[1])
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
            return left, top, crop_w, crop_h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        crop_w, crop_h = round(height * ratio[1]), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


class FolderDataset(Dataset[tuple[torch.Tensor, int]]):
    """Lazy image folder ``<root>/<split>/<class>/*.jpg|jpeg|png`` for data too large for memory.

    Each item is ``(uint8 tensor [3, crop_size, crop_size], label)``. Training preprocessing is a
    random-resized crop (scale 0.08..1, aspect 3/4..4/3) resized to ``crop_size`` plus a random
    horizontal flip; evaluation resizes the shorter side to ``resize_size`` and takes the centre
    ``crop_size`` square. Normalisation is left to :class:`BatchAugment` on the training device
    (with ``crop_padding=0, flip=False``), which keeps the worker-to-GPU transfer in uint8.

    Randomness comes from torch's default generator; a DataLoader seeds it differently in each
    worker from its own ``generator``, so runs are reproducible given that seed.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        train: bool | None = None,
        crop_size: int = 224,
        resize_size: int = 256,
        classes: Sequence[str] | None = None,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        """Index the files of ``root/split`` (no image is opened here).

        Args:
            root: directory containing the split folders.
            split: split folder name.
            train: random augmentation if ``True``, deterministic centre crop if ``False``;
                default ``split == "train"``.
            crop_size: output side length.
            resize_size: evaluation: shorter side is resized to this before the centre crop.
            classes: class names in label order; default: sorted folders of ``root/train`` if
                it exists (so all splits share labels), else of ``root/split``.
            scale, ratio: random-resized-crop ranges (area fraction, aspect ratio).
        """
        self.root = Path(root)
        self.split = split
        self.train = (split == "train") if train is None else train
        if resize_size < crop_size:
            raise ValueError(f"resize_size {resize_size} must be >= crop_size {crop_size}")
        self.crop_size = crop_size
        self.resize_size = resize_size
        self.scale = scale
        self.ratio = ratio
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DatasetError(
                f"no image folder {split_dir}: expected {split_dir}/<class>/*.jpg|jpeg|png"
            )
        if classes is None:
            train_dir = self.root / "train"
            classes = list_classes(train_dir if train_dir.is_dir() else split_dir)
        entries, self.classes = _label_entries(SplitSource("dir", split_dir), classes, None)
        self.samples = [(split_dir / member, label) for member, label in entries]
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        """Always 3: every image is converted to RGB."""
        return 3

    @property
    def image_size(self) -> tuple[int, int]:
        """``(crop_size, crop_size)``."""
        return self.crop_size, self.crop_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        _require_pillow()
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:
            raise DatasetError(
                f"{path}: expected a JPEG or PNG image, could not decode it ({exc})"
            ) from exc
        bilinear = Image.Resampling.BILINEAR
        size = self.crop_size
        if self.train:
            left, top, width, height = random_resized_crop_box(
                image.width, image.height, self.scale, self.ratio
            )
            # resize(box=...) crops and scales in one resampling pass.
            image = image.resize(
                (size, size), bilinear, box=(left, top, left + width, top + height)
            )
            if bool(torch.rand(()) < 0.5):
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            short = min(image.width, image.height)
            new_w = max(self.resize_size, round(image.width * self.resize_size / short))
            new_h = max(self.resize_size, round(image.height * self.resize_size / short))
            image = image.resize((new_w, new_h), bilinear)
            left = (new_w - size) // 2
            top = (new_h - size) // 2
            image = image.crop((left, top, left + size, top + size))
        pixels = np.array(image, dtype=np.uint8)  # a writable copy torch may own
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), label
