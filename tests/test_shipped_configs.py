"""Every shipped config trains, and every documented ``dessilbi train`` example is runnable.

* Each config of :func:`dessilbi.config.builtin_configs` (new ones included, automatically) trains
  one epoch of one or two steps on tiny stand-in data written in the format its ``dataset``
  reads. Only where the run goes and how big it is are overridden (data dir, epochs, batch
  sizes, workers, out, device); model, optimizer, structures and λ are the shipped ones.
* Each ``dessilbi train ...`` example of README.md and of ``dessilbi --help`` names a shipped
  config and options that ``dessilbi train --help`` lists, resolves to a valid config through
  the real command line, and its ``--data-dir`` holds the data its config reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import math
import pickle
import re
import shlex
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import dessilbi
import dessilbi.train as train_module
from dessilbi import cli
from dessilbi.config import builtin_configs, load_config
from dessilbi.data import DatasetError, FolderDataset, dataset_info, load_dataset, load_image_folder
from dessilbi.data.info import CIFAR10_CLASSES, CIFAR100_CLASSES
from dessilbi.models import build_model

try:
    from PIL import Image
except ImportError:  # the image-folder stand-ins need Pillow
    Image = None

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHARED = (REPO / ".." / "shared").resolve()
SHIPPED = sorted(builtin_configs())


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoded images are cached in the test's own folder, never in the user's cache."""
    monkeypatch.setenv("DESSILBI_CACHE", str(tmp_path / "cache"))


# ============================================================================ stand-in data


@dataclasses.dataclass(frozen=True)
class StandIn:
    """Tiny data in one data set's on-disk format, and what a run on it must look like."""

    root: Path | None  # the data_dir (None: embedded data)
    num_classes: int
    in_channels: int
    image_size: int
    batch_size: int
    steps: int  # training steps of one epoch at batch_size


def _idx(array: np.ndarray) -> bytes:
    """uint8 ``array`` in the idx format: magic 0x0000 08 <ndim>, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_set(root: Path, rng: np.random.Generator) -> StandIn:
    """The four official MNIST-style files (gzip), one training image of every class."""
    batch = 5
    for stem, labels in (("train", np.arange(10)), ("t10k", np.array([3, 1, 4]))):
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        (root / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
        (root / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))
    return StandIn(root, 10, 1, 28, batch, 10 // batch)


def _pickle_batch(labels: list[int], label_key: str, rng: np.random.Generator) -> bytes:
    data = rng.integers(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)
    # protocol 2 and bytes keys, like the official Python-2 pickles
    return pickle.dumps({label_key.encode(): labels, b"data": data}, protocol=2)


def _write_cifar10(root: Path, rng: np.random.Generator) -> StandIn:
    """``cifar-10-batches-py``: data_batch_1..5 (2 images each), test_batch, batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for k in range(5):
        batch = _pickle_batch([2 * k, 2 * k + 1], "labels", rng)
        (folder / f"data_batch_{k + 1}").write_bytes(batch)
    (folder / "test_batch").write_bytes(_pickle_batch([0, 5, 9], "labels", rng))
    meta = {b"label_names": [name.encode() for name in CIFAR10_CLASSES]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return StandIn(root, 10, 3, 32, 5, 2)


def _write_cifar100(root: Path, rng: np.random.Generator) -> StandIn:
    """``cifar-100-python``: train, test and meta with fine labels."""
    folder = root / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(_pickle_batch(list(range(0, 100, 10)), "fine_labels", rng))
    (folder / "test").write_bytes(_pickle_batch([7, 42, 99], "fine_labels", rng))
    meta = {b"fine_label_names": [name.encode() for name in CIFAR100_CLASSES]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return StandIn(root, 100, 3, 32, 5, 2)


def _image(rng: np.random.Generator, height: int, width: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _write_cifar10_jpeg(root: Path, rng: np.random.Generator) -> StandIn:
    """The JPEG copy's layout: ``train.zip`` / ``test.zip`` with ``<split>/<class>/NNNN.jpg``."""
    splits = {"train": CIFAR10_CLASSES, "test": CIFAR10_CLASSES[::4]}
    for split, classes in splits.items():
        with zipfile.ZipFile(root / f"{split}.zip", "w") as archive:
            for name in classes:
                archive.writestr(f"{split}/{name}/0000.jpg", _image(rng, 32, 32, "JPEG"))
    return StandIn(root, 10, 3, 32, 5, 2)


def _write_image_folder(root: Path, rng: np.random.Generator) -> StandIn:
    """``<root>/train/<class>/*.png`` and ``<root>/val/<class>/*.png``, three classes.

    Small images of different sizes: the lazy folder reader resizes and crops them to 224.
    """
    counts = {"train": {"bee": 2, "cat": 1, "owl": 1}, "val": {"bee": 1, "cat": 1, "owl": 1}}
    for split, spec in counts.items():
        for name, count in spec.items():
            (root / split / name).mkdir(parents=True)
            for k in range(count):
                png = _image(rng, 24 + 5 * k, 30, "PNG")
                (root / split / name / f"{k:04d}.png").write_bytes(png)
    return StandIn(root, 3, 3, 224, 2, 2)


def _digits(root: Path, rng: np.random.Generator) -> StandIn:
    """Embedded in scikit-learn: no files; two steps of half the training set."""
    n_train = len(load_dataset("digits", split="train"))
    return StandIn(None, 10, 1, 8, n_train // 2, 2)


#: data set -> writer of its stand-in data (the format that data set's loader reads)
STAND_INS: dict[str, Callable[[Path, np.random.Generator], StandIn]] = {
    "digits": _digits,
    "mnist": _write_idx_set,
    "fashion_mnist": _write_idx_set,
    "cifar10": _write_cifar10,
    "cifar100": _write_cifar100,
    "cifar10_jpeg": _write_cifar10_jpeg,
    "imagefolder": _write_image_folder,
}


def make_stand_in(dataset: str, root: Path) -> StandIn:
    if dataset not in STAND_INS:
        pytest.fail(
            f"no stand-in data for data set {dataset!r}: add a writer of its format to STAND_INS "
            "so that the shipped configs reading it are trained here"
        )
    if dataset in ("cifar10_jpeg", "imagefolder") and Image is None:
        pytest.skip("Pillow is not installed")
    root.mkdir(parents=True)
    return STAND_INS[dataset](root, np.random.default_rng(0))


@pytest.mark.parametrize("dataset", sorted(STAND_INS))
def test_stand_in_data_is_read_by_the_real_loader(dataset: str, tmp_path: Path) -> None:
    stand_in = make_stand_in(dataset, tmp_path / "data")
    info = dataset_info(dataset, stand_in.root)
    if info.lazy:
        train = FolderDataset(stand_in.root, "train")
        image, _ = train[0]
        assert tuple(image.shape) == (3, stand_in.image_size, stand_in.image_size)
        assert len(FolderDataset(stand_in.root, "val").classes) == stand_in.num_classes
    else:
        train = load_dataset(dataset, stand_in.root, "train")
        load_dataset(dataset, stand_in.root, "test")
        assert tuple(train.images.shape[1:]) == (
            stand_in.in_channels, stand_in.image_size, stand_in.image_size
        )
    assert len(train) // stand_in.batch_size == stand_in.steps
    assert (info.num_classes or len(train.classes)) == stand_in.num_classes


# ============================================================================ shipped configs


# A few stand-in steps an epoch: a selection_start config's calibration rightly warns.
@pytest.mark.filterwarnings("ignore:selection_start:UserWarning")
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_trains_one_epoch_on_stand_in_data(name: str, tmp_path: Path) -> None:
    shipped = load_config(name)
    stand_in = make_stand_in(shipped.dataset, tmp_path / "data")
    overrides: dict[str, Any] = {
        "epochs": 1, "batch_size": stand_in.batch_size, "eval_batch_size": 4, "workers": 0,
        "out": str(tmp_path / "runs"), "device": "cpu",
    }
    if stand_in.root is not None:
        overrides["data_dir"] = str(stand_in.root)
    config = load_config(name, overrides)
    # Only the size and the place of the run changed: model, optimizer, structures, λ, ν, the
    # schedule and the data set's settings are the shipped ones (a cosine schedule follows
    # epochs: schedule_epochs resolves to 1).
    changed = {
        key for key, value in config.to_dict().items() if shipped.to_dict()[key] != value
    }
    assert changed <= set(overrides) | {"schedule_epochs"}

    result = train_module.train(config, quiet=True)

    run_dir = result.run_dir
    assert run_dir.parent == tmp_path / "runs"
    for file in ("config.yaml", "init.pt", "metrics.jsonl", "checkpoint.pt", "model.pt"):
        assert (run_dir / file).is_file(), file
    if config.optimizer == "dessilbi":
        assert (run_dir / "path.pt").is_file()
    assert load_config(run_dir / "config.yaml").to_dict() == config.to_dict()

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["epoch"] == 1 and record["step"] == stand_in.steps
    assert math.isfinite(record["train_loss"])
    assert 0.0 <= record["test_acc"] <= 100.0

    # The model is the config's model, sized for the stand-in data's classes and images.
    arch = {"num_classes": stand_in.num_classes, "in_channels": stand_in.in_channels,
            "image_size": stand_in.image_size, **config.model_kwargs}
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True, mmap=True)
    assert ckpt["architecture"] == {"name": config.model, "kwargs": arch}
    assert (ckpt["epoch"], ckpt["step"]) == (1, stand_in.steps)
    expected = build_model(config.model, **arch)
    model = result.model
    assert model is not None and type(model) is type(expected)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in expected.state_dict().items()
    }
    model.eval()
    with torch.no_grad():
        logits = model(torch.zeros(1, stand_in.in_channels, stand_in.image_size,
                                   stand_in.image_size))
    assert tuple(logits.shape) == (1, stand_in.num_classes)

    if config.optimizer == "dessilbi":
        assert isinstance(result.optimizer, dessilbi.DessiLBI)
        assert result.test_acc_sparse is not None and result.selected

    # And it loads back from the run directory alone, W and (DessiLBI) W̃.
    loaded = dessilbi.load_run(run_dir)
    assert loaded.architecture.to_dict() == ckpt["architecture"]
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    if config.optimizer == "dessilbi":
        masks = dessilbi.support_masks(model, result.optimizer)
        sparse = dessilbi.load_run(run_dir, weights="sparse").model.state_dict()
        for name, mask in masks.items():
            assert torch.equal(sparse[name], model.state_dict()[name] * mask), name


# ============================================================================ documented examples


@dataclasses.dataclass(frozen=True)
class Example:
    """One ``dessilbi train`` command of the documentation."""

    where: str  # "README.md:LINE" or "dessilbi --help:LINE"
    command: str  # as written (continuation lines joined, comment dropped)
    argv: tuple[str, ...]  # the words after ``dessilbi train``
    nproc: int  # torchrun's --nproc_per_node (1 without torchrun)

    @property
    def key(self) -> tuple[str, str]:
        return self.where.split(":")[0], self.command


_PLACEHOLDER = re.compile(r"<[^<>]+>")


def _example(where: str, text: str) -> Example | None:
    command = " ".join(text.replace("\\\n", " ").split())
    if not re.search(r"\bdessilbi train\b", command):
        return None
    # "<run directory>" is one word of the command: protect it from shlex
    words = shlex.split(_PLACEHOLDER.sub(lambda m: m[0].replace(" ", "\0"), command),
                        comments=True)
    words = [w.replace("\0", " ") for w in words]
    for k in range(len(words) - 1):
        if words[k] == "dessilbi" and words[k + 1] == "train":
            nproc = 1
            for word in words[:k]:
                if word.startswith("--nproc_per_node="):
                    nproc = int(word.split("=", 1)[1])
            shown = command.split("#")[0].strip()
            return Example(where, shown, tuple(words[k + 2 :]), nproc)
    return None


def readme_examples(text: str) -> list[Example]:
    """``dessilbi train`` lines of the fenced code blocks and inline code spans."""
    found: list[Example] = []
    lines = text.splitlines()
    prose = []
    fenced = False
    k = 0
    while k < len(lines):
        line = lines[k]
        if line.lstrip().startswith("```"):
            fenced = not fenced
            prose.append("")
            k += 1
            continue
        if not fenced:
            prose.append(line)
            k += 1
            continue
        start = k
        while lines[k].endswith("\\") and k + 1 < len(lines):
            k += 1
        prose.append("")
        prose.extend("" for _ in range(start, k))
        example = _example(f"README.md:{start + 1}", "\n".join(lines[start : k + 1]))
        if example is not None:
            found.append(example)
        k += 1
    flat = "\n".join(prose)
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", flat):
        if match[1].strip().startswith("dessilbi train"):
            line_no = flat.count("\n", 0, match.start()) + 1
            example = _example(f"README.md:{line_no}", match[1])
            if example is not None:
                found.append(example)
    return sorted(found, key=lambda e: int(e.where.split(":")[1]))


def _cli_output(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        cli.main(list(argv))
    return out.getvalue()


def help_examples(text: str) -> list[Example]:
    """The example lines of ``dessilbi --help`` (its description)."""
    found = []
    lines = text.splitlines()
    for k, line in enumerate(lines, start=1):
        if "dessilbi train" in line:
            end = k
            while lines[end - 1].rstrip().endswith("\\") and end < len(lines):
                end += 1  # a command continued on the next line
            example = _example(f"dessilbi --help:{k}", "\n".join(lines[k - 1 : end]))
            if example is not None:
                found.append(example)
    return found


def train_options() -> set[str]:
    """Every option string ``dessilbi train --help`` lists (``--flip, --no-flip`` give both)."""
    options = set()
    for line in _cli_output("train", "--help").splitlines():
        if re.match(r"^\s+-", line):
            invocation = re.split(r"\s{2,}", line.strip())[0]
            options.update(part.split()[0] for part in invocation.split(", "))
    return options


README_EXAMPLES = readme_examples(README.read_text(encoding="utf-8"))
HELP_EXAMPLES = help_examples(_cli_output("--help"))
EXAMPLES = README_EXAMPLES + HELP_EXAMPLES

# Examples that cannot run as written today: (source, command) -> why. Strict: an example that
# is fixed (or whose data appears) turns its case into a failure, so this list stays true.
_DATA_MISSING: dict[tuple[str, str], str] = {}


def _cases(marks: dict[tuple[str, str], str]) -> list[Any]:
    return [
        pytest.param(
            e, id=e.where,
            marks=[pytest.mark.xfail(strict=True, reason=marks[e.key])] if e.key in marks else [],
        )
        for e in EXAMPLES
    ]


def test_the_documentation_has_its_examples() -> None:
    """The parsers find the examples (an empty list would make the checks below vacuous)."""
    configs = {_value(e.argv, "--config") for e in README_EXAMPLES}
    assert {"mnist_lenet5", "cifar10_resnet20", "cifar10_resnet56_ticket_group"} <= configs
    assert any("--resume" in e.argv for e in README_EXAMPLES)
    assert any(e.nproc == 2 for e in README_EXAMPLES)
    assert len(HELP_EXAMPLES) >= 5
    assert set(_DATA_MISSING) <= {e.key for e in EXAMPLES}, "an xfail names no example"


def _value(argv: tuple[str, ...], option: str) -> str | None:
    for k, word in enumerate(argv):
        if word == option and k + 1 < len(argv):
            return argv[k + 1]
        if word.startswith(option + "="):
            return word.split("=", 1)[1]
    return None


class _Stop(Exception):
    """Raised by the stand-in ``train``: the command line resolved a config; nothing trains."""


def _resolve(example: Example, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run the example's command line up to training; the config it would train."""
    seen: list[Any] = []

    def fake_train(config: Any, **kwargs: Any) -> Any:
        seen.append((config, kwargs))
        raise _Stop

    monkeypatch.setattr(train_module, "train", fake_train)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(["train", *example.argv])
        except _Stop:
            code = None
        except SystemExit as exc:  # --help, or argparse refusing the command line
            code = exc.code
    if code == 0 and "--help" in example.argv:
        return None
    said = err.getvalue().strip().splitlines()[-1:]  # argparse: usage, then the error
    assert code is None and seen, f"{example.command}: exit {code}: {' '.join(said)}"
    return seen[0][0]


def _resume_targets(path: str) -> list[str]:
    """Shipped configs whose run directory the (possibly placeholder) path can be (or a run
    directory derived from, as ``dessilbi prune`` writes them beside it)."""
    path = re.sub(r"-(compact|prune)-<[^/]*$", "", path)
    pattern = re.compile(".+".join(re.escape(p) for p in _PLACEHOLDER.split(path)))
    if not _PLACEHOLDER.search(path):
        return SHIPPED[:1]
    return [
        name for name in SHIPPED
        if pattern.fullmatch(str(Path(load_config(name).out) / load_config(name).default_run_name))
    ]


@pytest.mark.parametrize("example", _cases({}))
def test_example_names_a_shipped_config_and_known_options(
    example: Example, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_name = _value(example.argv, "--config")
    if config_name is not None:
        assert config_name in SHIPPED, f"{example.command}: --config {config_name} is not shipped"
    known = train_options()
    for word in example.argv:
        if word.startswith("--"):
            assert word.split("=")[0] in known, f"{example.command}: {word} is not an option"
    resume = _value(example.argv, "--resume")
    if resume is None:
        config = _resolve(example, monkeypatch)
        if config is not None:
            assert config.batch_size % example.nproc == 0, "the global batch does not split"
        return
    # A resume example: put the run directory it names (as the shipped configs it can be)
    # in place, and let the command line accept the overrides it passes.
    targets = _resume_targets(resume)
    assert targets, f"{example.command}: {resume} is no shipped config's run directory"
    for name in targets:
        run_dir = tmp_path / name / _PLACEHOLDER.sub("x", resume)
        run_dir.mkdir(parents=True)
        load_config(name).save(run_dir / "config.yaml")
        argv = [w if w != resume else str(run_dir) for w in example.argv]
        config = _resolve(dataclasses.replace(example, argv=tuple(argv)), monkeypatch)
        assert config.model == load_config(name).model


def missing_data(dataset: str, root: Path) -> str | None:
    """Why ``root`` does not hold both splits of ``dataset`` as its loader reads them, or None.

    Cheap: the JPEG copy and image folders are located and indexed, not decoded.
    """
    try:
        if dataset == "digits":
            return None
        if dataset == "cifar10_jpeg":
            for split in ("train", "test"):
                # where load_dataset looks: <root>/<split>.zip|<split>/ or root/cifar10-jpeg/...
                load_image_folder(root, split, classes=CIFAR10_CLASSES, name="cifar10_jpeg",
                                  subdirs=(".", "cifar10-jpeg", "cifar10_jpeg"),
                                  max_per_class=1, use_cache=False)
            return None
        if dataset_info(dataset, root).lazy:
            FolderDataset(root, "train")
            FolderDataset(root, "val" if (root / "val").is_dir() else "test")
            return None
        for split in ("train", "test"):
            load_dataset(dataset, root, split)
    except DatasetError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("example", _cases(_DATA_MISSING))
def test_example_data_dir_holds_the_data_its_config_reads(
    example: Example, monkeypatch: pytest.MonkeyPatch
) -> None:
    if _value(example.argv, "--resume") is not None or "--help" in example.argv:
        return  # a resumed run reads the data of its saved config
    config = _resolve(example, monkeypatch)
    if config.dataset == "digits":
        return
    if config.download and config.dataset in ("mnist", "fashion_mnist", "cifar10", "cifar100"):
        return  # fetched when missing (not here: tests stay offline)
    written = config.data_dir if config.data_dir is not None else "data"
    root = (REPO / written).resolve()  # the README's commands run from the repository root
    if root.is_relative_to(SHARED) and not SHARED.is_dir():
        pytest.skip(f"the shared data folder {SHARED} is not on this machine")
    problem = missing_data(config.dataset, root)
    assert problem is None, (
        f"{example.where}: {example.command}: --data-dir {written} does not hold the "
        f"{config.dataset} data of --config: {problem}"
    )
