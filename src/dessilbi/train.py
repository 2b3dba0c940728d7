"""One training loop for every experiment: single process or DDP, path recording, exact resume.

A run directory holds:

- ``config.yaml``: the resolved configuration;
- ``init.pt``: the initial weights (winning tickets rewind to them);
- ``metrics.jsonl``: one JSON line per epoch (losses, accuracies of W and W̃, selected groups);
- ``path.pt``: the sparse-structure path (group norms of W, support of Γ, entry epochs/steps);
- ``checkpoint.pt``: everything needed to continue bitwise (model, optimizer, scheduler, RNGs);
- ``model.pt``: the final weights.

Every file is written atomically (temporary file, then rename), so a crash never leaves a
half-written file under its final name.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from dessilbi.config import ConfigError, TrainConfig
from dessilbi.data import (
    BatchAugment,
    DatasetInfo,
    FolderDataset,
    ImageDataset,
    dataset_info,
    load_dataset,
)
from dessilbi.models import build_model
from dessilbi.optim import DessiLBI
from dessilbi.path import PathRecorder, selected_groups, sparse_weights
from dessilbi.structure import structured_param_groups

__all__ = [
    "CheckpointError",
    "RunResult",
    "TrainingError",
    "build_optimizer",
    "format_summary",
    "load_checkpoint",
    "train",
]

CHECKPOINT_FORMAT = "dessilbi-checkpoint"
CHECKPOINT_VERSION = 1


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, a run directory in the way, ...)."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or belongs to another run."""


@dataclass
class RunResult:
    """What a finished (or already complete) run reports."""

    run_dir: Path
    epochs: int
    test_acc: float
    test_acc_sparse: float | None
    selected: dict[str, tuple[int, int]] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)
    optimizer: Optimizer | None = field(default=None, repr=False)


# --------------------------------------------------------------------------- set-up


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_pref: str) -> tuple[_Dist, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = _Dist(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    use_cuda = device_pref.startswith("cuda") or (
        device_pref == "auto" and torch.cuda.is_available()
    )
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"invalid device: {device_pref!r} (CUDA is not available here)")
    if use_cuda:
        device = torch.device(device_pref if ":" in device_pref else f"cuda:{info.local_rank}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if info.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return info, device


def _lr_multiplier(config: TrainConfig) -> Callable[[int], float]:
    """The schedule as a function of the epoch (LambdaLR keeps no callables in its state)."""
    if config.schedule == "step":
        return lambda epoch: config.lr_decay ** (epoch // config.lr_step)
    if config.schedule == "multistep":
        milestones = sorted(config.milestones)
        return lambda epoch: config.lr_decay ** sum(epoch >= m for m in milestones)
    if config.schedule == "cosine":
        total = config.epochs
        return lambda epoch: 0.5 * (1 + math.cos(math.pi * min(epoch, total) / total))
    return lambda epoch: 1.0


def build_optimizer(config: TrainConfig, model: nn.Module) -> Optimizer:
    """The optimizer of ``config`` for ``model`` (DessiLBI, SGD or Adam)."""
    if config.optimizer == "dessilbi":
        groups = structured_param_groups(
            model,
            conv=config.conv_structure,
            linear=config.linear_structure,
            exclude=config.exclude,
            weight_decay=config.weight_decay,
            norm_weight_decay=config.norm_weight_decay,
        )
        return DessiLBI(
            groups,
            lr=config.lr,
            kappa=config.kappa,
            nu=config.nu,
            lam=config.lam,
            momentum=config.momentum,
            dampening=config.dampening,
            nesterov=config.nesterov,
            group_scaling=config.group_scaling,
        )
    # Baselines get the same decay / no-decay split, without coupling.
    groups = structured_param_groups(
        model,
        conv=None,
        linear=None,
        weight_decay=config.weight_decay,
        norm_weight_decay=config.norm_weight_decay,
    )
    for group in groups:
        del group["structure"]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=config.lr,
            momentum=config.momentum,
            dampening=config.dampening,
            nesterov=config.nesterov,
        )
    return torch.optim.Adam(groups, lr=config.lr)


# --------------------------------------------------------------------------- data


class _Batches:
    """Training batches for one epoch, identical for a given (seed, epoch) on every run.

    In-memory sets are indexed on the training device; the data order of epoch ``e`` comes from
    a generator seeded with ``(seed, e)``, so resuming at an epoch boundary replays it exactly.
    Under DDP each global batch of ``batch_size`` is cut into equal shards, one per rank, so a
    step sees the same global batch as a single process would.
    """

    def __init__(
        self,
        data: ImageDataset | FolderDataset,
        config: TrainConfig,
        dist_info: _Dist,
        device: torch.device,
    ) -> None:
        if config.batch_size % dist_info.world_size:
            raise ConfigError(
                f"invalid batch_size: {config.batch_size} is not divisible by the "
                f"{dist_info.world_size} processes"
            )
        self.data = data
        self.config = config
        self.dist = dist_info
        self.device = device
        self.local_batch = config.batch_size // dist_info.world_size
        if isinstance(data, ImageDataset):
            self.images = data.images.to(device)
            self.labels = data.labels.to(device)
        self.num_batches = len(data) // config.batch_size
        if self.num_batches == 0:
            raise ConfigError(
                f"invalid batch_size: {config.batch_size} exceeds the {len(data)} training images"
            )

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order_gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.data), generator=order_gen)
        if isinstance(self.data, ImageDataset):
            lo = self.dist.rank * self.local_batch
            for b in range(self.num_batches):
                batch = order[b * self.config.batch_size : (b + 1) * self.config.batch_size]
                shard = batch[lo : lo + self.local_batch].to(self.device)
                yield self.images[shard], self.labels[shard]
            return
        # On-disk data: the same order, sharded the same way, read by worker processes.
        usable = order[: self.num_batches * self.config.batch_size].view(self.num_batches, -1)
        mine = usable[:, self.dist.rank * self.local_batch :][:, : self.local_batch].flatten()
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.data, mine.tolist()),
            batch_size=self.local_batch,
            shuffle=False,
            num_workers=self.config.workers,
            generator=torch.Generator().manual_seed(self.config.seed + epoch),
            pin_memory=self.device.type == "cuda",
        )
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device)


def _training_augment(config: TrainConfig, info: DatasetInfo) -> BatchAugment:
    """The batched training augmentation of an in-memory data set: its default, as configured."""
    if not config.augment:
        return BatchAugment(info.mean, info.std)
    padding = info.crop_padding if config.crop_padding is None else config.crop_padding
    flip = info.flip if config.flip is None else config.flip
    return BatchAugment(info.mean, info.std, padding, flip)


def _load_data(
    config: TrainConfig, dist_info: _Dist
) -> tuple[ImageDataset | FolderDataset, ImageDataset | FolderDataset]:
    info = dataset_info(config.dataset, config.data_dir)
    if info.lazy:
        if config.data_dir is None:
            raise ConfigError(f"invalid data_dir: None (the {config.dataset} data set needs one)")
        return (
            FolderDataset(config.data_dir, "train", train=True, crop_size=info.image_size[0]),
            FolderDataset(config.data_dir, "val" if Path(config.data_dir, "val").is_dir()
                          else "test", train=False, crop_size=info.image_size[0]),
        )
    # Only one process downloads; the others wait for it and then read the files.
    if config.download and dist_info.enabled and not dist_info.is_main:
        dist.barrier()
    train_set = load_dataset(config.dataset, config.data_dir, "train", download=config.download)
    test_set = load_dataset(config.dataset, config.data_dir, "test", download=config.download)
    if config.download and dist_info.enabled and dist_info.is_main:
        dist.barrier()
    return train_set, test_set


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    data: ImageDataset | FolderDataset,
    normalize: BatchAugment,
    config: TrainConfig,
    dist_info: _Dist,
    device: torch.device,
) -> float:
    """Top-1 accuracy in percent; under DDP each rank scores a slice and the counts are summed."""
    model.eval()
    n = len(data)
    lo = n * dist_info.rank // dist_info.world_size
    hi = n * (dist_info.rank + 1) // dist_info.world_size
    correct = torch.zeros((), dtype=torch.long, device=device)
    if isinstance(data, ImageDataset):
        for start in range(lo, hi, config.eval_batch_size):
            stop = min(start + config.eval_batch_size, hi)
            x = normalize(data.images[start:stop].to(device))
            correct += (model(x).argmax(1) == data.labels[start:stop].to(device)).sum()
    else:
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(data, range(lo, hi)),
            batch_size=config.eval_batch_size,
            num_workers=config.workers,
        )
        for images, labels in loader:
            correct += (model(normalize(images.to(device))).argmax(1) == labels.to(device)).sum()
    if dist_info.enabled:
        dist.all_reduce(correct)
    return 100.0 * int(correct) / n


# --------------------------------------------------------------------------- files


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a dessilbi checkpoint with ``weights_only=True``, or raise :class:`CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here (nothing to resume)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{path}: damaged or not a torch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a dessilbi checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {ckpt.get('version')} is not supported "
            f"(this dessilbi writes version {CHECKPOINT_VERSION})"
        )
    return ckpt


def _config_differences(saved: Path, config: TrainConfig) -> str:
    """The keys whose values differ between the saved config and ``config`` ("" if none)."""
    if not saved.is_file():
        return f"{saved} is missing"
    old = yaml.safe_load(saved.read_text()) or {}
    new = config.to_dict()
    keys = sorted(k for k in set(old) | set(new) if k != "epochs" and old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- the loop


def _gather_states(state: torch.Tensor, dist_info: _Dist) -> list[torch.Tensor]:
    """Every rank's RNG state (ranks draw different augmentations)."""
    if not dist_info.enabled:
        return [state]
    gathered: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def train(
    config: TrainConfig,
    *,
    resume_dir: Path | None = None,
    quiet: bool = False,
    log_every: int = 0,
) -> RunResult:
    """Train ``config`` (or continue the run in ``resume_dir``) and return its final figures.

    Args:
        config: the run's configuration (on resume: the saved one, possibly with more epochs).
        resume_dir: a run directory with a ``checkpoint.pt`` to continue from.
        quiet: no progress bars; one line per epoch.
        log_every: also print a line every this many steps (0: never); useful in logs.
    """
    dist_info, device = _init_distributed(config.device)
    run_dir = resume_dir if resume_dir is not None else Path(config.out) / (
        config.run_name or config.default_run_name
    )
    checkpoint_path = run_dir / "checkpoint.pt"
    if resume_dir is None and checkpoint_path.exists():
        # Rerunning the same configuration continues the run (or just reports it when it is
        # complete); a different configuration must not overwrite it.
        differences = _config_differences(run_dir / "config.yaml", config)
        if differences:
            raise TrainingError(
                f"run directory {run_dir} already holds a run with another configuration "
                f"({differences}); choose another --run-name or --out, or continue it with "
                f"`dessilbi train --resume {run_dir}`"
            )
        resume_dir = run_dir
    ckpt = load_checkpoint(checkpoint_path) if resume_dir is not None else None
    if ckpt is not None and ckpt["model_name"] != config.model:
        raise CheckpointError(
            f"{checkpoint_path}: written for model {ckpt['model_name']!r}, "
            f"but the config builds {config.model!r}"
        )

    info = dataset_info(config.dataset, config.data_dir)
    train_set, test_set = _load_data(config, dist_info)
    torch.manual_seed(config.seed)
    model = build_model(
        config.model,
        num_classes=info.num_classes if info.num_classes else len(train_set.classes),
        in_channels=info.in_channels,
        image_size=info.image_size[0],
        **config.model_kwargs,
    ).to(device)
    optimizer = build_optimizer(config, model)
    scheduler = LambdaLR(optimizer, _lr_multiplier(config))
    recorder = PathRecorder(model, optimizer) if isinstance(optimizer, DessiLBI) else None
    normalize = BatchAugment(info.mean, info.std)
    lazy = not isinstance(train_set, ImageDataset)
    if lazy and (config.crop_padding is not None or config.flip is not None):
        raise ConfigError(
            f"crop_padding and flip apply to in-memory data sets; {config.dataset} is read "
            "from disk with its own augmentation (random-resized crop and flip): leave them unset"
        )
    augment = normalize if lazy else _training_augment(config, info)
    aug_gen = torch.Generator(device=device).manual_seed(config.seed * 7919 + dist_info.rank)

    start_epoch, step = 0, 0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{checkpoint_path}: does not match this run's model/optimizer ({exc})"
            ) from exc
        scheduler.load_state_dict(ckpt["scheduler"])
        rng = ckpt["rng"]
        if len(rng["torch"]) != dist_info.world_size:
            raise CheckpointError(
                f"{checkpoint_path}: written by {len(rng['torch'])} processes, resumed with "
                f"{dist_info.world_size}; resume with the same number of processes"
            )
        torch.set_rng_state(rng["torch"][dist_info.rank])
        aug_gen.set_state(rng["augment"][dist_info.rank])
        if device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state(rng["cuda"][dist_info.rank], device)
        if recorder is not None:
            recorder.load_state_dict(ckpt["path"])
        start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
    elif dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
        _atomic_save(model.state_dict(), run_dir / "init.pt")

    metrics_path = run_dir / "metrics.jsonl"
    if dist_info.is_main:
        # Epochs after the checkpoint were lost with the crash; their lines are redone.
        kept = [m for m in _read_metrics(metrics_path) if m["epoch"] <= start_epoch]
        _atomic_write_text("".join(json.dumps(m) + "\n" for m in kept), metrics_path)

    net: nn.Module = (
        DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if dist_info.enabled
        else model
    )
    batches = _Batches(train_set, config, dist_info, device)
    if isinstance(test_set, ImageDataset):
        test_set = test_set.to(device)  # once, not at every evaluation
    show = not quiet and dist_info.is_main
    def say(line: str) -> None:
        # Flushed at once: quiet mode is meant for logs, and a log redirected to a file is
        # block-buffered, so a user tailing it would otherwise see nothing for many epochs.
        if show:
            tqdm.write(line)
        else:
            print(line, flush=True)

    epochs_bar = tqdm(
        range(start_epoch, config.epochs), initial=start_epoch, total=config.epochs,
        desc="epochs", disable=not show, dynamic_ncols=True,
    )
    last: dict[str, Any] = {}
    for epoch in epochs_bar:
        net.train()
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        batch_bar = tqdm(
            batches.epoch(epoch), total=batches.num_batches, desc=f"epoch {epoch + 1}",
            leave=False, disable=not show, dynamic_ncols=True,
        )
        for i, (images, labels) in enumerate(batch_bar):
            x = augment(images, aug_gen)
            logits = net(x)
            loss = F.cross_entropy(logits, labels)
            if not torch.isfinite(loss):
                saved = f"the checkpoint of epoch {epoch}" if epoch else "no checkpoint yet"
                raise TrainingError(
                    f"the loss became {float(loss.detach())} at epoch {epoch + 1}, step {i + 1}; "
                    f"{run_dir} keeps {saved}. Lower the learning rate and restart or resume."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if recorder is not None and dist_info.is_main:
                recorder.update_step(step)
            with torch.no_grad():
                loss_sum += loss.detach() * labels.numel()
                correct += (logits.argmax(1) == labels).sum()
            seen += labels.numel()
            if log_every and (i + 1) % log_every == 0 and dist_info.is_main:
                print(f"epoch {epoch + 1} step {i + 1}/{batches.num_batches} "
                      f"loss {float(loss):.4f}", flush=True)
        lr_used = optimizer.param_groups[0]["lr"]
        scheduler.step()
        epoch_time = time.perf_counter() - started

        totals = torch.stack([loss_sum, correct.to(loss_sum.dtype),
                              torch.tensor(float(seen), device=device)])
        if dist_info.enabled:
            dist.all_reduce(totals)
        test_acc = _evaluate(net, test_set, normalize, config, dist_info, device)
        sparse_acc = None
        selected: dict[str, tuple[int, int]] = {}
        if isinstance(optimizer, DessiLBI):
            with sparse_weights(model, optimizer):
                sparse_acc = _evaluate(net, test_set, normalize, config, dist_info, device)
            selected = selected_groups(model, optimizer)
        last = {
            "epoch": epoch + 1,
            "step": step,
            "lr": lr_used,
            "train_loss": float(totals[0] / totals[2]),
            "train_acc": 100.0 * float(totals[1] / totals[2]),
            "test_acc": test_acc,
            "test_acc_sparse": sparse_acc,
            "selected": {name: list(pair) for name, pair in selected.items()},
            "epoch_time": epoch_time,
        }

        rng_state = {
            "torch": _gather_states(torch.get_rng_state(), dist_info),
            "augment": _gather_states(aug_gen.get_state(), dist_info),
            "cuda": _gather_states(torch.cuda.get_rng_state(device), dist_info)
            if device.type == "cuda" else [],
        }
        if dist_info.is_main:
            if recorder is not None:
                recorder.record_epoch(epoch + 1)
                _atomic_save(recorder.state_dict(), run_dir / "path.pt")
            with open(metrics_path, "a") as handle:
                handle.write(json.dumps(last) + "\n")
            _atomic_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "version": CHECKPOINT_VERSION,
                    "model_name": config.model,
                    "dataset": config.dataset,
                    "epoch": epoch + 1,
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_state,
                    "path": recorder.state_dict() if recorder is not None else {},
                },
                checkpoint_path,
            )
            sparse_text = f" sparse {sparse_acc:.2f}%" if sparse_acc is not None else ""
            if quiet or log_every:
                say(f"epoch {epoch + 1}/{config.epochs} loss {last['train_loss']:.4f} "
                    f"train {last['train_acc']:.2f}% test {test_acc:.2f}%{sparse_text} "
                    f"({epoch_time:.1f} s)")
            epochs_bar.set_postfix(loss=f"{last['train_loss']:.3f}", test=f"{test_acc:.2f}")
        if dist_info.enabled:
            dist.barrier()  # no rank runs ahead of the checkpoint of this epoch
    epochs_bar.close()

    if dist_info.is_main:
        _atomic_save(model.state_dict(), run_dir / "model.pt")
    if not last:
        history = _read_metrics(metrics_path)
        if not history:
            raise TrainingError(f"{run_dir}: nothing to report (no epoch recorded)")
        last = history[-1]
    return RunResult(
        run_dir=run_dir,
        epochs=int(last["epoch"]),
        test_acc=float(last["test_acc"]),
        test_acc_sparse=last["test_acc_sparse"],
        selected={k: (int(v[0]), int(v[1])) for k, v in last["selected"].items()},
        model=model,
        optimizer=optimizer,
    )


def format_summary(result: RunResult) -> str:
    """A short table: accuracies of W and W̃, selected groups per layer, the run directory."""
    lines = [f"run directory: {result.run_dir}", f"epochs: {result.epochs}",
             f"test accuracy, dense W:   {result.test_acc:6.2f}%"]
    if result.test_acc_sparse is not None:
        lines.append(f"test accuracy, sparse W~: {result.test_acc_sparse:6.2f}%")
    if result.selected:
        width = max(len(name) for name in result.selected)
        lines.append(f"{'layer':<{width}}  selected / groups")
        for name, (sel, total) in result.selected.items():
            lines.append(f"{name:<{width}}  {sel:>8} / {total}")
    return "\n".join(lines)
