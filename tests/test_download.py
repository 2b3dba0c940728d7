"""Tests of downloads, checksums and safe extraction (``dessilbi.data.download``).

Small files in the true formats (gzip idx files; a tar.gz of CIFAR pickle batches in the
official layout) are served from a local HTTP server bound to 127.0.0.1, never the internet.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from dessilbi.data import CHECKSUMS, DatasetError, download_dataset, extract_tar, load_dataset

MNIST_NAMES = {
    "train-images-idx3-ubyte.gz": (2051, (5, 28, 28)),
    "train-labels-idx1-ubyte.gz": (2049, (5,)),
    "t10k-images-idx3-ubyte.gz": (2051, (3, 28, 28)),
    "t10k-labels-idx1-ubyte.gz": (2049, (3,)),
}


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """(base URL, served folder) of an HTTP server on 127.0.0.1 with an OS-chosen port."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("DESSILBI_DATA_MIRROR", raising=False)
    served = tmp_path / "served"
    served.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def serve_mnist(folder: Path) -> dict[str, np.ndarray]:
    """Write the four MNIST .gz files (tiny, true idx format); return their arrays."""
    rng = np.random.default_rng(0)
    arrays = {}
    for name, (magic, shape) in MNIST_NAMES.items():
        array = rng.integers(0, 10 if magic == 2049 else 256, size=shape, dtype=np.uint8)
        header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
        (folder / name).write_bytes(gzip.compress(header + array.tobytes()))
        arrays[name] = array
    return arrays


def add_to_tar(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def serve_cifar10(folder: Path) -> dict[str, dict]:
    """cifar-10-python.tar.gz with tiny pickle batches in the official layout."""
    rng = np.random.default_rng(1)
    batches = {}
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name in names:
            batch = {
                "batch_label": name,
                "labels": [int(v) for v in rng.integers(0, 10, size=2)],
                "data": rng.integers(0, 256, size=(2, 3072), dtype=np.uint8),
                "filenames": ["a.png", "b.png"],
            }
            add_to_tar(tar, f"cifar-10-batches-py/{name}", pickle.dumps(batch, protocol=2))
            batches[name] = batch
        meta = {"label_names": [f"c{k}" for k in range(10)], "num_cases_per_batch": 2}
        add_to_tar(tar, "cifar-10-batches-py/batches.meta", pickle.dumps(meta, protocol=2))
    return batches


def test_download_mnist_and_load(server: tuple[str, Path], tmp_path: Path) -> None:
    url, served = server
    arrays = serve_mnist(served)
    checksums = {name: md5(served / name) for name in MNIST_NAMES}
    root = tmp_path / "data"
    folder = download_dataset("mnist", root, mirrors=[url], checksums=checksums)
    assert folder == (root / "mnist").resolve()
    assert sorted(p.name for p in folder.iterdir()) == sorted(MNIST_NAMES)  # no temp files left
    train = load_dataset("mnist", root, "train")
    test = load_dataset("mnist", root, "test")
    assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte.gz"]))
    assert train.labels.tolist() == arrays["train-labels-idx1-ubyte.gz"].tolist()
    assert torch.equal(test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte.gz"]))
    assert test.labels.tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()


def test_load_dataset_download_uses_env_mirror_and_checksum_table(
    server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, served = server
    arrays = serve_mnist(served)
    monkeypatch.setitem(CHECKSUMS, "fashion_mnist", {n: md5(served / n) for n in MNIST_NAMES})
    # A dead first mirror must be skipped in favour of the working one.
    monkeypatch.setenv("DESSILBI_DATA_MIRROR", f"http://127.0.0.1:9/nothing/,{url}")
    data = load_dataset("fashion_mnist", tmp_path, "test", download=True)
    assert data.labels.tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()
    assert data.classes[-1] == "Ankle boot"
    assert (tmp_path / "fashion_mnist" / "t10k-images-idx3-ubyte.gz").is_file()


def test_download_cifar10_extracts_official_layout(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    url, served = server
    batches = serve_cifar10(served)
    archive = "cifar-10-python.tar.gz"
    root = tmp_path / "data"
    download_dataset("cifar10", root, mirrors=[url], checksums={archive: md5(served / archive)})
    assert (root / archive).is_file() and (root / "cifar-10-batches-py" / "test_batch").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging left behind
    train = load_dataset("cifar10", root, "train")
    expected = np.concatenate([batches[f"data_batch_{k}"]["data"] for k in range(1, 6)])
    assert torch.equal(train.images.reshape(10, -1), torch.from_numpy(expected))
    assert train.classes[3] == "c3"
    test = load_dataset("cifar10", root, "test")
    assert test.labels.tolist() == batches["test_batch"]["labels"]


def test_wrong_checksum_is_refused_and_leaves_no_file(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    url, served = server
    serve_mnist(served)
    checksums = {name: md5(served / name) for name in MNIST_NAMES}
    checksums["train-labels-idx1-ubyte.gz"] = "0" * 32
    with pytest.raises(DatasetError) as info:
        download_dataset("mnist", tmp_path, mirrors=[url], checksums=checksums)
    message = str(info.value)
    assert "train-labels-idx1-ubyte.gz" in message and "does not match the expected 000" in message
    folder = tmp_path / "mnist"
    assert not (folder / "train-labels-idx1-ubyte.gz").exists()
    assert not list(folder.glob(".*"))  # no temporary .part file either
    # Without a checksum a file is not downloaded at all.
    del checksums["t10k-images-idx3-ubyte.gz"]
    with pytest.raises(DatasetError, match="no md5 checksum for t10k-images"):
        download_dataset("mnist", tmp_path / "other", mirrors=[url], checksums=checksums)


def test_missing_file_on_every_mirror(server: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = server
    with pytest.raises(DatasetError, match=r"could not download cifar-100-python\.tar\.gz.*404"):
        download_dataset("cifar100", tmp_path, mirrors=[url])
    assert not (tmp_path / "cifar-100-python.tar.gz").exists()
    with pytest.raises(DatasetError, match="no download available for 'digits'"):
        download_dataset("digits", tmp_path)


@pytest.mark.parametrize(
    "member, kind",
    [
        ("../evil", "file"),
        ("/tmp/evil-absolute", "file"),
        ("cifar-10-batches-py/../../evil", "file"),
        ("cifar-10-batches-py/link", "symlink"),
        ("cifar-10-batches-py/dev", "device"),
    ],
)
def test_unsafe_tar_members_are_refused(tmp_path: Path, member: str, kind: str) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add_to_tar(tar, "cifar-10-batches-py/data_batch_1", b"fine")
        info = tarfile.TarInfo(member)
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "../../outside"
        elif kind == "device":
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        if kind == "file":
            add_to_tar(tar, member, b"pwned")
        else:
            tar.addfile(info)
    destination = tmp_path / "root"
    with pytest.raises(DatasetError, match=f"refusing to extract member '{member}'"):
        extract_tar(archive, destination)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil-absolute").exists()
    assert list(destination.iterdir()) == []  # nothing extracted, not even the safe member


def test_evil_archive_from_mirror_is_refused(server: tuple[str, Path], tmp_path: Path) -> None:
    url, served = server
    archive = served / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add_to_tar(tar, "../evil", b"pwned")
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match="refusing to extract member '../evil'"):
        download_dataset("cifar10", root, mirrors=[url], checksums={archive.name: md5(archive)})
    assert not (tmp_path / "evil").exists()


def test_safe_symlink_inside_destination_is_allowed(tmp_path: Path) -> None:
    archive = tmp_path / "ok.tar"
    with tarfile.open(archive, "w") as tar:
        add_to_tar(tar, "pkg/data", b"payload")
        info = tarfile.TarInfo("pkg/alias")
        info.type, info.linkname = tarfile.SYMTYPE, "data"
        tar.addfile(info)
    created = extract_tar(archive, tmp_path / "out")
    assert [p.name for p in created] == ["pkg"]
    assert (tmp_path / "out" / "pkg" / "alias").read_bytes() == b"payload"
