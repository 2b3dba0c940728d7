"""Tests of the datasets layer (``dessilbi.data``): readers, metadata, cache and augmentation.

Every file format is exercised on small files written here in the true format; the real MNIST
and CIFAR-10 JPEG copies under ``../shared/data`` are used when present (skipped otherwise).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dessilbi.data import (
    DATASET_NAMES,
    BatchAugment,
    DatasetError,
    FolderDataset,
    ImageDataset,
    dataset_info,
    load_cifar,
    load_dataset,
    load_image_folder,
    load_mnist,
    random_resized_crop_box,
    read_cifar_pickle,
    read_idx,
)
from dessilbi.data import folder as folder_module

try:
    from PIL import Image
except ImportError:  # the image-folder tests need Pillow; everything else does not
    Image = None

needs_pillow = pytest.mark.skipif(Image is None, reason="Pillow is not installed")

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CIFAR10_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own decode cache, so no test reads or writes ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DESSILBI_CACHE", str(cache))
    return cache


# ----------------------------------------------------------------------------- file writers


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` in the idx format (gzip-compressed when the name ends in .gz)."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i4"): 0x0C}
    big_endian = array.astype(array.dtype.newbyteorder(">")) if array.itemsize > 1 else array
    code = codes[np.dtype(big_endian.dtype)]
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + big_endian.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def write_mnist(directory: Path, n_train: int = 6, n_test: int = 4, gz: bool = True, seed: int = 0):
    """Tiny MNIST-format file set; returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    out = {}
    for split, n, stem in (("train", n_train, "train"), ("test", n_test, "t10k")):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(directory / f"{stem}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{stem}-labels-idx1-ubyte{suffix}", labels)
        out[split] = (images, labels)
    return out


def cifar_batch(n: int, seed: int, label_key: str = "labels", classes: int = 10) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "batch_label": f"batch {seed}",
        label_key: [int(v) for v in rng.integers(0, classes, size=n)],
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        "filenames": [f"img_{seed}_{k}.png" for k in range(n)],
    }


def write_cifar10(root: Path, per_batch: int = 3, protocol: int = 2) -> tuple[np.ndarray, ...]:
    """The official ``cifar-10-batches-py`` layout with tiny batches; returns the arrays."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = [cifar_batch(per_batch, seed) for seed in range(1, 6)]
    for k, batch in enumerate(train, start=1):
        (folder / f"data_batch_{k}").write_bytes(pickle.dumps(batch, protocol=protocol))
    test = cifar_batch(per_batch + 1, 99)
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=protocol))
    meta = {"label_names": CIFAR10_NAMES, "num_cases_per_batch": per_batch, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    train_x = np.concatenate([b["data"] for b in train])
    train_y = np.concatenate([b["labels"] for b in train])
    return train_x, train_y, test["data"], np.asarray(test["labels"])


def image_bytes(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


def make_folder(root: Path, split: str, spec: dict[str, int], fmt: str = "PNG", size=(6, 5)):
    """``root/split/<class>/<k>.<ext>`` with random images; returns {relative path: pixels}."""
    rng = np.random.default_rng(len(split))
    written = {}
    for class_name, count in spec.items():
        (root / split / class_name).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            pixels = rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)
            ext = "png" if fmt == "PNG" else "jpg"
            relative = f"{split}/{class_name}/{k:03d}.{ext}"
            (root / relative).write_bytes(image_bytes(pixels, fmt))
            written[relative] = pixels
    return written


# ----------------------------------------------------------------------------- metadata


def test_dataset_info_constants() -> None:
    cifar = dataset_info("cifar10")
    assert cifar.mean == (0.4914, 0.4822, 0.4465)
    assert cifar.std == (0.2023, 0.1994, 0.2010)
    assert (cifar.crop_padding, cifar.flip, cifar.image_size) == (4, True, (32, 32))
    assert list(cifar.classes) == CIFAR10_NAMES
    mnist = dataset_info("mnist")
    assert (mnist.mean, mnist.std, mnist.crop_padding, mnist.flip) == (
        (0.1307,),
        (0.3081,),
        0,
        False,
    )
    assert dataset_info("cifar100").num_classes == len(set(dataset_info("cifar100").classes)) == 100
    assert dataset_info("digits").image_size == (8, 8)
    assert dataset_info("CIFAR-10".replace("CIFAR-10", "cifar10")).in_channels == 3
    with pytest.raises(DatasetError, match="unknown data set 'svhn'"):
        dataset_info("svhn")
    with pytest.raises(DatasetError, match="pass its root"):
        dataset_info("imagefolder")


def test_dataset_info_imagefolder_counts_class_folders(tmp_path: Path) -> None:
    for name in ("b", "a", "c"):
        (tmp_path / "train" / name).mkdir(parents=True)
    info = dataset_info("imagefolder", tmp_path)
    assert info.num_classes == 3 and info.classes == ("a", "b", "c")
    assert info.lazy and info.image_size == (224, 224)


# ----------------------------------------------------------------------------- digits


def test_digits_split_shapes_and_determinism() -> None:
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    train = load_dataset("digits", None, "train")
    test = load_dataset("digits", "/nonexistent", "test")  # root is ignored
    assert len(train) + len(test) == 1797
    assert len(test) == 355  # every 5th sample of each class
    assert train.images.shape == (1442, 1, 8, 8) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert set(train.labels.tolist()) == set(range(10)) == set(test.labels.tolist())
    # Stratified: each class has ~20% of its samples in the test split.
    for c in range(10):
        n_test = int((test.labels == c).sum())
        n_all = n_test + int((train.labels == c).sum())
        assert n_test == n_all // 5
    # Pixel values 0..16 are rescaled to 0..255.
    raw = load_digits()
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    expected_first = np.rint(raw.images[0] * 255 / 16).astype(np.uint8)
    assert np.array_equal(train.images[0, 0].numpy(), expected_first)  # sample 0 is train
    # Deterministic across calls.
    again = load_dataset("digits", None, "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    # The fixed normalisation constants are the statistics of the training split.
    x = train.images.float() / 255
    assert abs(x.mean().item() - train.mean[0]) < 1e-3
    assert abs(x.std().item() - train.std[0]) < 1e-3
    assert train.num_classes == 10 and train.in_channels == 1 and train.image_size == (8, 8)


# ----------------------------------------------------------------------------- MNIST / idx


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason=f"shared MNIST copy not at {SHARED}")
def test_mnist_from_shared_data() -> None:
    train = load_dataset("mnist", SHARED, "train")
    test = load_dataset("mnist", SHARED, "test")
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert int(train.labels[0]) == 5
    assert abs((train.images.float() / 255).mean().item() - 0.1307) < 1e-3
    assert torch.bincount(test.labels).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009,
    ]  # fmt: skip
    assert train.mean == (0.1307,) and train.classes[5] == "5"


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_roundtrip(tmp_path: Path, suffix: str) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    ints = np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32)
    got = read_idx(write_idx(tmp_path / f"images{suffix}", images), expected_magic=2051)
    assert got.dtype == np.uint8 and np.array_equal(got, images)
    got_ints = read_idx(write_idx(tmp_path / f"ints{suffix}", ints.astype(">i4")))
    assert got_ints.dtype == np.int32 and np.array_equal(got_ints, ints)
    # Trailing bytes mean the header and the data disagree: refused, not silently ignored.
    raw = tmp_path / "long"
    raw.write_bytes(write_idx(tmp_path / "plain", images).read_bytes() + b"\0")
    with pytest.raises(DatasetError, match=r"2x3x4 uint8 values \(40 bytes\), got 41 bytes"):
        read_idx(raw)


@pytest.mark.parametrize(
    "subdir, variant",
    [
        (".", "mnist"),
        ("mnist", "mnist"),
        ("MNIST/raw", "mnist"),
        ("FashionMNIST/raw", "fashion_mnist"),
    ],
)
def test_load_mnist_layouts(tmp_path: Path, subdir: str, variant: str) -> None:
    arrays = write_mnist(tmp_path / subdir, gz=subdir != "MNIST/raw")
    for split in ("train", "test"):
        data = load_dataset(variant, tmp_path, split)
        images, labels = arrays[split]
        assert torch.equal(data.images[:, 0], torch.from_numpy(images))
        assert torch.equal(data.labels, torch.from_numpy(labels.astype(np.int64)))
    assert data.classes[0] == ("0" if variant == "mnist" else "T-shirt/top")


def test_fashion_mnist_does_not_pick_up_mnist_folder(tmp_path: Path) -> None:
    write_mnist(tmp_path / "mnist")
    with pytest.raises(DatasetError, match="no Fashion-MNIST files under"):
        load_dataset("fashion_mnist", tmp_path)


def test_mnist_missing_files_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", tmp_path)
    message = str(info.value)
    assert f"no MNIST files under {tmp_path}" in message
    assert "train-images-idx3-ubyte[.gz]" in message and "download" in message


def test_mnist_truncated_file_error(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1234])
    with pytest.raises(DatasetError) as info:
        load_mnist(tmp_path, "train")
    message = str(info.value)
    assert str(path) in message and "expected idx magic 2051" in message
    assert "6x28x28" in message and "got 1234 bytes" in message


def test_mnist_truncated_gzip_error(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz: corrupt or truncated gzip"):
        load_mnist(tmp_path, "test")


def test_mnist_wrong_magic_and_count_mismatch(tmp_path: Path) -> None:
    arrays = write_mnist(tmp_path, gz=False)
    # A label file where the image file should be.
    write_idx(tmp_path / "train-images-idx3-ubyte", arrays["train"][1])
    with pytest.raises(DatasetError, match="expected idx magic 2051, got 2049"):
        load_mnist(tmp_path, "train")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(7, dtype=np.uint8))
    with pytest.raises(DatasetError, match="expected 4 labels"):
        load_mnist(tmp_path, "test")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DatasetError, match="not an idx file"):
        load_mnist(tmp_path, "test")


# ----------------------------------------------------------------------------- CIFAR pickles


@pytest.mark.parametrize("protocol", [2, 5])
def test_load_cifar10_batches(tmp_path: Path, protocol: int) -> None:
    train_x, train_y, test_x, test_y = write_cifar10(tmp_path, protocol=protocol)
    train = load_dataset("cifar10", tmp_path, "train")
    assert train.images.shape == (15, 3, 32, 32)
    # Row layout: 1024 red values, then green, then blue, each row-major.
    assert torch.equal(train.images, torch.from_numpy(train_x).view(15, 3, 32, 32))
    assert int(train.images[4, 1, 2, 3]) == int(train_x[4, 1024 + 2 * 32 + 3])
    assert train.labels.tolist() == train_y.tolist()
    assert train.classes == CIFAR10_NAMES and train.mean == (0.4914, 0.4822, 0.4465)
    test = load_cifar(tmp_path / "cifar-10-batches-py", "test")  # the folder itself as root
    assert torch.equal(test.images.reshape(4, -1), torch.from_numpy(test_x))
    assert test.labels.tolist() == test_y.tolist()


def test_load_cifar100_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    batch = cifar_batch(5, 7, "fine_labels", classes=100)
    batch["coarse_labels"] = [0] * 5
    # bytes keys, as the official Python-2 pickles carry them
    (folder / "test").write_bytes(pickle.dumps({k.encode(): v for k, v in batch.items()}))
    names = [f"class_{k}" for k in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names}))
    data = load_dataset("cifar100", tmp_path, "test")
    assert data.labels.tolist() == batch["fine_labels"]
    assert data.classes == names and data.num_classes == 100


def test_cifar_pickle_with_foreign_global_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(DatasetError, match="refusing to load global"):
        read_cifar_pickle(path)
    assert not marker.exists()  # the payload never ran


def test_cifar_corrupt_and_missing_errors(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(DatasetError, match="data_batch_3: expected a CIFAR python pickle batch"):
        load_dataset("cifar10", tmp_path)
    batch.write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}))
    with pytest.raises(DatasetError, match=r"expected 'data' as a uint8 array \[N, 3072\]"):
        load_dataset("cifar10", tmp_path)
    batch.unlink()
    with pytest.raises(DatasetError, match="no CIFAR-10 batches under .*download"):
        load_dataset("cifar10", tmp_path)


# ----------------------------------------------------------------------------- image folders


@needs_pillow
def test_image_folder_png_exact_and_zip_equivalent(tmp_path: Path) -> None:
    written = make_folder(tmp_path / "d", "train", {"dog": 2, "cat": 3})
    data = load_dataset("imagefolder", tmp_path / "d", "train")
    assert data.classes == ["cat", "dog"]
    assert data.images.shape == (5, 3, 6, 5) and data.labels.tolist() == [0, 0, 0, 1, 1]
    order = sorted(written, key=lambda p: (p.split("/")[1], p))
    for k, relative in enumerate(order):  # PNG is lossless: exact pixels, class-major order
        assert np.array_equal(data.images[k].permute(1, 2, 0).numpy(), written[relative])
    # The same tree inside a zip (stored, with a hidden junk entry) loads identically.
    (tmp_path / "z").mkdir()
    with zipfile.ZipFile(tmp_path / "z" / "train.zip", "w") as archive:
        for relative in written:
            archive.write(tmp_path / "d" / relative, relative)
        archive.writestr("__MACOSX/train/cat/._000.png", b"junk")
    zipped = load_dataset("imagefolder", tmp_path / "z", "train")
    assert torch.equal(zipped.images, data.images) and torch.equal(zipped.labels, data.labels)


@needs_pillow
def test_image_folder_jpeg_and_test_split_uses_train_classes(tmp_path: Path) -> None:
    make_folder(tmp_path, "train", {"a": 1, "b": 1, "c": 1}, fmt="JPEG", size=(16, 16))
    written = make_folder(tmp_path, "test", {"c": 2}, fmt="JPEG", size=(16, 16))
    test = load_dataset("imagefolder", tmp_path, "test")
    assert test.classes == ["a", "b", "c"] and test.labels.tolist() == [2, 2]
    assert set(written) == {"test/c/000.jpg", "test/c/001.jpg"}
    # JPEG is lossy, so the oracle is Pillow's own decoding of the file.
    with Image.open(tmp_path / "test" / "c" / "001.jpg") as image:
        expected = np.asarray(image.convert("RGB"))
    assert np.array_equal(test.images[1].permute(1, 2, 0).numpy(), expected)


@needs_pillow
def test_image_folder_cache_is_used_and_invalidated(
    tmp_path: Path, _private_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_folder(tmp_path, "train", {"x": 2, "y": 2})
    first = load_image_folder(tmp_path, "train")
    assert len(list(_private_cache.glob("imagefolder-train-*.pt"))) == 1

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although a cache entry exists")

    monkeypatch.setattr(folder_module, "_decode_all", no_decode)
    cached = load_image_folder(tmp_path, "train")
    assert torch.equal(cached.images, first.images) and torch.equal(cached.labels, first.labels)
    # Rewriting a source file changes the key: the stale entry is not used.
    target = tmp_path / "train" / "y" / "001.png"
    target.write_bytes(image_bytes(np.zeros((6, 5, 3), np.uint8), "PNG"))
    os.utime(target, ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded although"):
        load_image_folder(tmp_path, "train")


@needs_pillow
def test_image_folder_unwritable_cache_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_folder(tmp_path, "train", {"x": 1})
    (tmp_path / "not_a_dir").write_text("file")
    monkeypatch.setenv("DESSILBI_CACHE", str(tmp_path / "not_a_dir" / "cache"))
    with pytest.warns(RuntimeWarning, match="could not write the dataset cache"):
        data = load_image_folder(tmp_path, "train")
    assert data.images.shape == (1, 3, 6, 5)
    monkeypatch.setenv("DESSILBI_CACHE", "off")
    assert torch.equal(load_image_folder(tmp_path, "train").images, data.images)


@needs_pillow
def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no imagefolder images for split 'train'"):
        load_dataset("imagefolder", tmp_path)
    make_folder(tmp_path, "train", {"x": 2})
    (tmp_path / "train" / "x" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DatasetError, match=r"bad\.jpg: expected a JPEG or PNG image"):
        load_dataset("imagefolder", tmp_path)
    (tmp_path / "train" / "x" / "bad.jpg").unlink()
    (tmp_path / "train" / "x" / "big.png").write_bytes(
        image_bytes(np.zeros((9, 9, 3), np.uint8), "PNG")
    )
    with pytest.raises(DatasetError, match="different sizes .* FolderDataset"):
        load_dataset("imagefolder", tmp_path)


@needs_pillow
def test_cifar10_jpeg_zip_layout_and_unknown_class(tmp_path: Path) -> None:
    (tmp_path / "cifar10-jpeg").mkdir()
    pixels = np.full((32, 32, 3), 200, np.uint8)
    with zipfile.ZipFile(tmp_path / "cifar10-jpeg" / "test.zip", "w") as archive:
        archive.writestr("test/truck/0000.jpg", image_bytes(pixels, "JPEG"))
        archive.writestr("test/airplane/0000.jpg", image_bytes(pixels, "JPEG"))
    data = load_dataset("cifar10_jpeg", tmp_path, "test")
    assert data.classes == CIFAR10_NAMES and data.labels.tolist() == [0, 9]
    assert abs(float(data.images.float().mean()) - 200) < 2
    with zipfile.ZipFile(tmp_path / "cifar10-jpeg" / "test.zip", "a") as archive:
        archive.writestr("test/unicorn/0000.jpg", image_bytes(pixels, "JPEG"))
    with pytest.raises(DatasetError, match="unexpected class folder"):
        load_dataset("cifar10_jpeg", tmp_path, "test")


@pytest.mark.skipif(
    not (SHARED / "cifar10-jpeg" / "test.zip").is_file(),
    reason=f"shared CIFAR-10 JPEG copy not at {SHARED}",
)
@needs_pillow
def test_shared_cifar10_jpeg_first_members() -> None:
    data = load_image_folder(
        SHARED / "cifar10-jpeg", "test", classes=CIFAR10_NAMES, max_per_class=2, use_cache=False
    )
    assert data.images.shape == (20, 3, 32, 32)
    assert data.labels.tolist() == [k // 2 for k in range(20)]
    assert 40 < float(data.images.float().mean()) < 200  # real pictures, not blank


# ----------------------------------------------------------------------------- lazy folders


@needs_pillow
def test_folder_dataset_eval_center_crop(tmp_path: Path) -> None:
    # 300x200 picture: red left half, blue right half. The shorter side goes to 256, giving
    # 384x256; the centre 224 crop starts at x=80, so the colour edge (x=192) lands at x=112.
    pixels = np.zeros((200, 300, 3), np.uint8)
    pixels[:, :150, 0] = 255
    pixels[:, 150:, 2] = 255
    (tmp_path / "val" / "k").mkdir(parents=True)
    (tmp_path / "val" / "k" / "a.png").write_bytes(image_bytes(pixels, "PNG"))
    dataset = FolderDataset(tmp_path, "val")
    assert not dataset.train and len(dataset) == 1 and dataset.classes == ["k"]
    image, label = dataset[0]
    assert image.shape == (3, 224, 224) and image.dtype == torch.uint8 and label == 0
    assert image[:, :, :110].float().mean(dim=(1, 2)).tolist() == [255.0, 0.0, 0.0]
    assert image[:, :, 114:].float().mean(dim=(1, 2)).tolist() == [0.0, 0.0, 255.0]


@needs_pillow
def test_folder_dataset_train_is_random_but_seedable(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "train" / "k").mkdir(parents=True)
    (tmp_path / "train" / "k" / "a.jpg").write_bytes(
        image_bytes(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), "JPEG")
    )
    dataset = FolderDataset(tmp_path, "train", crop_size=32, resize_size=36)
    torch.manual_seed(1)
    first = dataset[0][0]
    torch.manual_seed(1)
    assert torch.equal(dataset[0][0], first)
    assert first.shape == (3, 32, 32)
    assert not all(torch.equal(dataset[0][0], first) for _ in range(5))


def test_random_resized_crop_box_respects_ranges() -> None:
    generator = torch.Generator().manual_seed(0)
    for width, height in [(500, 375), (64, 64), (30, 300)]:
        for _ in range(200):
            left, top, w, h = random_resized_crop_box(width, height, generator=generator)
            assert left >= 0 and left + w <= width and top >= 0 and top + h <= height
            assert w >= 1 and h >= 1
            if (w, h) != (width, height):
                assert 0.08 * 0.9 <= w * h / (width * height) <= 1.0
                assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # A very thin image admits no crop in the ratio range: the centred fallback is clamped.
    assert random_resized_crop_box(1000, 10, scale=(0.99, 1.0)) == (493, 0, 13, 10)


# ----------------------------------------------------------------------------- BatchAugment


def reference_augment(images, generator, pad, flip, mean, std):
    """Slow per-sample oracle: pad, cut the window, flip, normalise, one sample at a time."""
    n = images.shape[0]
    offsets = (
        torch.randint(0, 2 * pad + 1, (n, 2), generator=generator) if pad else torch.zeros(n, 2)
    )
    flips = torch.randint(0, 2, (n,), generator=generator) if flip else torch.zeros(n)
    out = []
    h, w = images.shape[2:]
    for k in range(n):
        padded = F.pad(images[k].float(), (pad, pad, pad, pad))
        top, left = int(offsets[k, 0]), int(offsets[k, 1])
        window = padded[:, top : top + h, left : left + w]
        if flips[k]:
            window = window.flip(-1)
        out.append(window)
    x = torch.stack(out) / 255.0
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def random_batch(n: int = 16, c: int = 3, h: int = 8, w: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )


@pytest.mark.parametrize("pad, flip", [(4, False), (4, True), (0, True), (2, True)])
def test_batch_augment_matches_per_sample_reference(pad: int, flip: bool) -> None:
    images = random_batch()
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    augment = BatchAugment(mean, std, crop_padding=pad, flip=flip)
    got = augment(images, torch.Generator().manual_seed(123))
    want = reference_augment(images, torch.Generator().manual_seed(123), pad, flip, mean, std)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_batch_augment_crop_is_a_shifted_window_with_zero_border() -> None:
    # Independent of the drawing order: every output must equal one of the 9x9 windows of the
    # zero-padded input, and a batch of 64 must use many different offsets.
    images = random_batch(n=64, c=1, h=6, w=6, seed=1)
    augment = BatchAugment((0.0,), (1.0,), crop_padding=4)
    out = (augment(images, torch.Generator().manual_seed(5)) * 255).round().to(torch.uint8)
    padded = F.pad(images, (4, 4, 4, 4))
    seen = set()
    for k in range(64):
        matches = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(out[k], padded[k, :, dy : dy + 6, dx : dx + 6])
        ]
        assert matches, f"sample {k} is not a window of its padded image"
        seen.add(matches[0])
    assert len(seen) > 20


def test_batch_augment_flip_flips_some_samples() -> None:
    images = random_batch(n=32, seed=2)
    augment = BatchAugment((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), flip=True)
    out = (augment(images, torch.Generator().manual_seed(0)) * 255).round().to(torch.uint8)
    flipped = [torch.equal(out[k], images[k].flip(-1)) for k in range(32)]
    kept = [torch.equal(out[k], images[k]) for k in range(32)]
    assert all(f != s for f, s in zip(flipped, kept, strict=True))  # exactly one of the two
    assert 5 < sum(flipped) < 27


def test_batch_augment_reproducible_and_resumable() -> None:
    images = random_batch(n=32)
    augment = BatchAugment((0.5,) * 3, (0.25,) * 3, crop_padding=4, flip=True)
    generator = torch.Generator().manual_seed(7)
    first = augment(images, generator)
    state = generator.get_state()
    second = augment(images, generator)
    assert not torch.equal(first, second)  # the stream advances
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(7)))
    resumed = torch.Generator()
    resumed.set_state(state)
    assert torch.equal(second, augment(images, resumed))
    assert not torch.equal(first, augment(images, torch.Generator().manual_seed(8)))


def test_batch_augment_no_augmentation_without_generator_or_in_eval() -> None:
    images = random_batch()
    augment = BatchAugment((0.1, 0.2, 0.3), (0.5, 0.5, 0.5), crop_padding=4, flip=True)
    plain = augment(images)
    assert torch.equal(plain, augment.normalize(images))
    assert torch.equal(plain, augment(images, torch.Generator().manual_seed(0), train=False))
    torch.testing.assert_close(plain * 0.5 + torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1),
                               images.float() / 255)  # fmt: skip


def test_batch_augment_normalisation_numbers() -> None:
    info = dataset_info("cifar10")
    augment = BatchAugment.from_info(info)
    images = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    out = augment(images.contiguous())
    assert out.dtype == torch.float32 and out.shape == (1, 3, 1, 3)
    for c in range(3):
        m, s = info.mean[c], info.std[c]
        expected = torch.tensor([(0 - m) / s, (1 - m) / s, (128 / 255 - m) / s])
        torch.testing.assert_close(out[0, c, 0], expected, rtol=0, atol=1e-6)
    assert abs(float(out[0, 0, 0, 0]) - (-0.4914 / 0.2023)) < 1e-6
    assert BatchAugment.from_info(dataset_info("mnist")).augments is False


def test_batch_augment_input_checks() -> None:
    augment = BatchAugment((0.5,), (0.5,), crop_padding=2)
    with pytest.raises(TypeError, match="uint8"):
        augment(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="expected 1 channels"):
        augment(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="std must be positive"):
        BatchAugment((0.5,), (0.0,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batch_augment_cuda_matches_cpu_and_checks_generator_device() -> None:
    images = random_batch(n=64)
    augment = BatchAugment((0.5,) * 3, (0.25,) * 3, crop_padding=4, flip=True)
    cuda_gen = torch.Generator(device="cuda").manual_seed(3)
    out = augment(images.cuda(), cuda_gen)
    assert out.is_cuda and out.shape == images.shape
    # Same offsets drawn on the device feed the CPU oracle.
    oracle_gen = torch.Generator(device="cuda").manual_seed(3)
    offsets = torch.randint(0, 9, (64, 2), generator=oracle_gen, device="cuda").cpu()
    flips = torch.randint(0, 2, (64,), generator=oracle_gen, device="cuda").cpu()
    padded = F.pad(images, (4, 4, 4, 4))
    for k in range(64):
        window = padded[k, :, offsets[k, 0] : offsets[k, 0] + 8, offsets[k, 1] : offsets[k, 1] + 7]
        if flips[k]:
            window = window.flip(-1)
        torch.testing.assert_close(out[k].cpu(), augment.normalize(window[None])[0])
    with pytest.raises(ValueError, match="generator is on cpu"):
        augment(images.cuda(), torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- registry


def test_image_dataset_helpers_and_validation() -> None:
    data = ImageDataset(
        images=torch.zeros(4, 1, 2, 2, dtype=torch.uint8),
        labels=torch.tensor([0, 1, 0, 1]),
        classes=["a", "b"],
        mean=(0.5,),
        std=(0.5,),
    )
    assert data.subset([3, 1]).labels.tolist() == [1, 1] and len(data.subset([0])) == 1
    image, label = data[1]
    assert image.shape == (1, 2, 2) and label == 1
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(4, 1, 2, 2), data.labels, ["a"], (0.5,), (0.5,))
    with pytest.raises(ValueError, match="mean/std need 1 entries"):
        ImageDataset(data.images, data.labels, ["a"], (0.5, 0.5), (0.5, 0.5))


def test_registry_names_and_errors(tmp_path: Path) -> None:
    assert set(DATASET_NAMES) == {
        "digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "cifar10_jpeg", "imagefolder",
    }  # fmt: skip
    with pytest.raises(DatasetError, match="unknown data set 'svhn'"):
        load_dataset("svhn", tmp_path)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_dataset("mnist", tmp_path, "val")
    with pytest.raises(DatasetError, match="cifar10_jpeg has no download"):
        load_dataset("cifar10_jpeg", tmp_path, download=True)
