"""Download the official archives, verify their md5 checksums and extract them safely.

Base URLs are looked up in this order:

1. the ``mirrors`` argument of :func:`download_dataset`;
2. the environment variable ``DESSILBI_DATA_MIRROR`` (comma-separated base URLs; it *replaces*
   the official list, so an offline site or a test never reaches out to the internet);
3. :data:`MIRRORS`, the official locations, tried in order.

A file is fetched as ``<base>/<file name>``. Every file must match its md5 in
:data:`CHECKSUMS` (or the ``checksums`` argument): a download is first written to a temporary
file next to its destination, verified, and only then renamed into place, so a partial or
corrupt download never sits under the final name.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from .base import DatasetError

__all__ = [
    "CHECKSUMS",
    "MIRRORS",
    "MIRROR_ENV",
    "download_dataset",
    "download_file",
    "extract_tar",
    "md5sum",
]

log = logging.getLogger(__name__)

MIRROR_ENV = "DESSILBI_DATA_MIRROR"

# Official locations (several for MNIST, whose original site often refuses downloads).
MIRRORS: dict[str, list[str]] = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ],
    "fashion_mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
    "cifar100": ["https://www.cs.toronto.edu/~kriz/"],
}

# md5 of the official files, as published with the data sets (and used by torchvision).
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "cifar10": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
    "cifar100": {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
}

# Folder under ``root`` that receives the files (the loaders look there), and whether the
# files are tar archives to extract into ``root``.
_LAYOUT: dict[str, tuple[str, bool]] = {
    "mnist": ("mnist", False),
    "fashion_mnist": ("fashion_mnist", False),
    "cifar10": (".", True),
    "cifar100": (".", True),
}

_CHUNK = 1 << 20


def md5sum(path: str | Path) -> str:
    """Hex md5 of a file (read in chunks)."""
    digest = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _mirror_list(name: str, mirrors: Sequence[str] | None) -> list[str]:
    if mirrors is not None:
        return list(mirrors)
    env = os.environ.get(MIRROR_ENV, "").strip()
    if env:
        return [part for part in env.replace(",", " ").split() if part]
    return list(MIRRORS[name])


def _fetch(url: str, destination: Path, md5: str, timeout: float) -> None:
    """Fetch ``url`` into a temporary file, check size and md5, rename it to ``destination``."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise DatasetError(f"{url}: only http and https URLs are supported")
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.",
                                    suffix=".part")  # fmt: skip
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        received = 0
        request = urllib.request.Request(url, headers={"User-Agent": "dessilbi-data"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
        if length is not None and length.isdigit() and received != int(length):
            raise DatasetError(
                f"{url}: expected {length} bytes, got {received} (connection dropped)"
            )
        got = digest.hexdigest()
        if got != md5:
            raise DatasetError(
                f"{url}: md5 {got} does not match the expected {md5} for {destination.name} "
                "(corrupt or tampered download; discarded)"
            )
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)


def download_file(
    filename: str,
    directory: str | Path,
    md5: str,
    mirrors: Sequence[str],
    *,
    timeout: float = 60.0,
) -> Path:
    """Download ``filename`` from the first mirror that serves it with the right md5.

    An existing file with the right md5 is kept as it is.

    Raises:
        DatasetError: every mirror failed; the message lists each failure.
    """
    directory = Path(directory)
    destination = directory / filename
    if destination.is_file() and md5sum(destination) == md5:
        return destination
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"{directory}: cannot create the download directory ({exc})") from exc
    failures: list[str] = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + filename
        log.info("downloading %s", url)
        try:
            _fetch(url, destination, md5, timeout)
            return destination
        except DatasetError as exc:
            failures.append(str(exc))
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            failures.append(f"{url}: {exc}")
    raise DatasetError(
        f"could not download {filename} into {directory}: "
        + ("; ".join(failures) if failures else "no mirror configured")
    )


def _member_problem(member: tarfile.TarInfo, destination: Path) -> str | None:
    """Why ``member`` must not be extracted into ``destination``, or ``None`` if it is safe."""
    name = member.name.replace("\\", "/")
    path = PurePosixPath(name)
    if path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in path.parts:
        return "path contains '..'"
    target = (destination / name).resolve()
    if not target.is_relative_to(destination):
        return "path escapes the destination"
    if member.isdev() or not (
        member.isfile() or member.isdir() or member.issym() or member.islnk()
    ):
        return "device, fifo or other special file"
    if member.issym() or member.islnk():
        link = member.linkname.replace("\\", "/")
        if PurePosixPath(link).is_absolute():
            return f"link to absolute path {member.linkname!r}"
        # Symbolic links are relative to the member's folder, hard links to the archive root.
        base = (destination / name).parent if member.issym() else destination
        if not (base / link).resolve().is_relative_to(destination):
            return f"link {member.linkname!r} points outside the destination"
    return None


def extract_tar(archive: str | Path, destination: str | Path) -> list[Path]:
    """Safely extract a tar archive (any compression) into ``destination``.

    Every member is checked first: absolute paths, ``..`` components, links pointing outside
    ``destination`` and device files make the whole archive be refused. Extraction then goes
    to a temporary folder (with ``filter="data"`` where Python supports it) whose top-level
    entries are renamed into ``destination``, replacing older copies, so an interrupted
    extraction never leaves a half-filled folder under the final name.

    Returns:
        The top-level paths created in ``destination``.

    Raises:
        DatasetError: unreadable archive or an unsafe member (named in the message).
    """
    archive = Path(archive)
    destination = Path(destination).resolve()
    destination.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                problem = _member_problem(member, destination)
                if problem is not None:
                    raise DatasetError(
                        f"{archive}: refusing to extract member {member.name!r}: {problem}"
                    )
            staging = Path(tempfile.mkdtemp(dir=destination, prefix=".extract-"))
            try:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(staging, members, filter="data")
                else:  # pragma: no cover - Python without PEP 706; members were checked above
                    tar.extractall(staging, members)
                created = []
                for entry in sorted(staging.iterdir()):
                    target = destination / entry.name
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)
                    elif target.exists() or target.is_symlink():
                        target.unlink()
                    os.replace(entry, target)
                    created.append(target)
                return created
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DatasetError(f"{archive}: expected a readable tar archive, got {exc}") from exc


def download_dataset(
    name: str,
    root: str | Path,
    *,
    mirrors: Sequence[str] | None = None,
    checksums: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download (and extract) data set ``name`` into ``root``, where :func:`load_dataset` finds it.

    MNIST and Fashion-MNIST are stored as the four ``.gz`` files in ``root/mnist`` and
    ``root/fashion_mnist``; CIFAR-10/100 archives are kept in ``root`` and extracted there
    (``root/cifar-10-batches-py``, ``root/cifar-100-python``).

    Args:
        name: ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"`` or ``"cifar100"``.
        root: data directory.
        mirrors: base URLs to use instead of ``$DESSILBI_DATA_MIRROR`` / :data:`MIRRORS`.
        checksums: file name -> md5 to use instead of :data:`CHECKSUMS` (e.g. in tests);
            a file without a checksum is never downloaded.
        timeout: socket timeout in seconds.

    Returns:
        The folder holding the downloaded files.

    Raises:
        DatasetError: unknown name, all mirrors failed, checksum mismatch, unsafe archive.
    """
    key = name.lower().replace("-", "_")
    if key not in _LAYOUT:
        raise DatasetError(
            f"no download available for {name!r}; downloadable: {', '.join(_LAYOUT)}"
        )
    subdir, is_archive = _LAYOUT[key]
    directory = Path(root) / subdir
    table = dict(CHECKSUMS[key] if checksums is None else checksums)
    urls = _mirror_list(key, mirrors)
    missing = [filename for filename in CHECKSUMS[key] if filename not in table]
    if missing:  # checked before fetching anything, so nothing unverified is ever written
        raise DatasetError(
            f"no md5 checksum for {', '.join(missing)}; refusing an unverified download"
        )
    for filename in CHECKSUMS[key]:
        path = download_file(filename, directory, table[filename], urls, timeout=timeout)
        if is_archive:
            extract_tar(path, directory)
    return directory.resolve()
