"""One training loop for every experiment: single process or DDP, path recording, exact resume.

Every command (``train`` now; ``prune``, ``retrain`` and ``grow`` later) runs this loop; they
differ only in what they pass to :func:`train`: the model (an object, a factory, or weights to
start from), the optimizer factory, callbacks after every step and epoch (see
:mod:`dessilbi.callbacks`), and the mask provider that defines the sparse network evaluated every
epoch (see :mod:`dessilbi.masks`).

A run directory holds:

- ``config.yaml``: the resolved configuration;
- ``init.pt``: the initial weights (winning tickets rewind to them);
- ``metrics.jsonl``: one JSON line per epoch (losses, accuracies of W and W̃, selected groups);
- ``path.pt``: the sparse-structure path (group norms of W, support of Γ, entry epochs/steps);
- ``checkpoint.pt``: everything needed to continue bitwise (model and its architecture,
  optimizer, scheduler, gradient scaler, RNGs, callback states);
- ``model.pt``: the final weights.

Every file is written atomically (temporary file, then rename), so a crash never leaves a
half-written file under its final name. Per epoch ``path.pt`` is written first, then
``metrics.jsonl``, then ``checkpoint.pt``; a resume from the checkpoint of epoch ``e`` cuts the
others back to epoch ``e``.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from tqdm import tqdm

from dessilbi.batches import (
    AnyDataset,
    TrainBatches,
    evaluate,
    example_input,
    input_normalization,
    load_run_data,
    training_augment,
)
from dessilbi.callbacks import Callback
from dessilbi.config import ConfigError, TrainConfig
from dessilbi.data import ImageDataset, dataset_info
from dessilbi.distributed import DistInfo, gather_states, init_distributed
from dessilbi.masks import MaskProvider, gamma_support, masked_weights
from dessilbi.models import equalize_filter_norms, scale_filter_norms
from dessilbi.numerics import (
    autocast_factory,
    flush_denormal,
    gradient_scaler,
    input_preparer,
    intra_op_threads,
)
from dessilbi.optim import DessiLBI
from dessilbi.path import selected_groups
from dessilbi.path_record import PathRecorder
from dessilbi.run_files import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointError,
    RunFiles,
    TrainingError,
    TrainingInterrupted,
    load_checkpoint,
    load_weights,
)
from dessilbi.run_state import Architecture, ModelFactory, OptimizerFactory, TrainingRun
from dessilbi.schedule import lr_multiplier
from dessilbi.selection import StartEpochThresholds, split_coupled_groups
from dessilbi.structure import (
    NORM_TYPES,
    distinct_group_names,
    structured_param_groups,
    unwrap_model,
)

__all__ = [
    "CheckpointError",
    "RunResult",
    "TrainingError",
    "TrainingInterrupted",
    "build_optimizer",
    "format_summary",
    "load_checkpoint",
    "train",
]


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


# --------------------------------------------------------------------------- optimizer


def _layer_type_options(
    config: TrainConfig, model: nn.Module, groups: list[dict[str, Any]]
) -> None:
    """Per-layer-type λ, group scaling and ν (``conv_lam``, ``linear_group_scaling``,
    ``norm_nu``, ...)."""
    conv_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    kind_of = {
        id(p): "conv" if isinstance(m, conv_types) else "linear" if isinstance(m, nn.Linear)
        else "norm" if isinstance(m, NORM_TYPES) else ""
        for m in model.modules() for p in m.parameters(recurse=False)
    }
    lams = {"conv": config.conv_lam, "linear": config.linear_lam, "norm": config.norm_lam}
    scalings = {"conv": config.conv_group_scaling, "linear": config.linear_group_scaling}
    for group in groups:
        if group["structure"] is None:
            continue
        kind = kind_of.get(id(group["params"][0])) or ""
        lam, scaling = lams.get(kind), scalings.get(kind)
        group["lam"] = config.lam if lam is None else lam
        group["group_scaling"] = config.group_scaling if scaling is None else scaling
        if kind == "norm" and config.norm_nu is not None:
            group["nu"] = config.norm_nu


def _config_callbacks(config: TrainConfig) -> list[Callback]:
    """The callbacks the config asks for (``selection_start``: per-layer λ calibration)."""
    if config.optimizer == "dessilbi" and config.selection_start is not None:
        return [StartEpochThresholds(config.selection_start, config.selection_calibration,
                                     config.selection_extrapolation)]
    return []


def _tied_groups(config: TrainConfig, model: nn.Module, groups: list[dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """``conv_structure: tied``: the conv filter groups regrouped by the layers a residual
    addition ties (torch-pruning's dependency graph, traced on one zero image)."""
    from dessilbi.subnet.tied import tie_filter_groups

    return tie_filter_groups(groups, unwrap_model(model), example_input(config))


def build_optimizer(config: TrainConfig, model: nn.Module) -> Optimizer:
    """The optimizer of ``config`` for ``model`` (DessiLBI, SGD or Adam).

    DessiLBI's param groups come from :func:`dessilbi.structured_param_groups` (structure by
    module type), with λ and the group scaling set per layer type (``conv_lam``,
    ``linear_lam``, ``conv_group_scaling``, ``linear_group_scaling``; each defaults to the
    global ``lam`` / ``group_scaling``); with ``selection_start`` one group per coupled tensor,
    whose λ :class:`~dessilbi.selection.StartEpochThresholds` sets after the calibration. The
    baselines get the same decay / no-decay split.
    """
    coupled = config.optimizer == "dessilbi"
    tied = coupled and config.conv_structure == "tied"
    groups = structured_param_groups(
        model,
        conv=("filter" if tied else config.conv_structure) if coupled else None,
        linear=config.linear_structure if coupled else None,
        norm=config.norm_structure if coupled else None,
        exclude=config.exclude if coupled else (),
        weight_decay=config.weight_decay,
        norm_weight_decay=config.norm_weight_decay,
    )
    if coupled:
        _layer_type_options(config, model, groups)
        if tied:
            groups = _tied_groups(config, model, groups)
        if config.selection_start is not None:
            groups = split_coupled_groups(groups)
        return DessiLBI(groups, lr=config.lr, kappa=config.kappa, nu=config.nu,
                        momentum=config.momentum, dampening=config.dampening,
                        nesterov=config.nesterov)
    for group in groups:
        del group["structure"]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               dampening=config.dampening, nesterov=config.nesterov)
    return torch.optim.Adam(groups, lr=config.lr)


# --------------------------------------------------------------------------- set-up


@dataclass
class _RunData:
    """The data of a run on its device: batches, test set, and the input transforms."""

    train_set: AnyDataset
    test_set: AnyDataset
    batches: TrainBatches
    prepare_train: Callable[..., torch.Tensor]
    prepare_test: Callable[..., torch.Tensor]
    num_classes: int


def _load_data(config: TrainConfig, dist_info: DistInfo, device: torch.device) -> _RunData:
    info = dataset_info(config.dataset, config.data_dir)
    train_set, test_set = load_run_data(config, dist_info)
    lazy = not isinstance(train_set, ImageDataset)
    augment = training_augment(config, info, lazy)
    if isinstance(test_set, ImageDataset):
        test_set = test_set.to(device)  # once, not at every evaluation
    return _RunData(
        train_set=train_set,
        test_set=test_set,
        batches=TrainBatches(train_set, config, dist_info, device),
        prepare_train=input_preparer(augment, config.channels_last),
        prepare_test=input_preparer(input_normalization(config, info), config.channels_last),
        num_classes=info.num_classes or len(train_set.classes),
    )


def default_architecture(config: TrainConfig, data: _RunData) -> Architecture:
    """The registered model of ``config``, sized for its data set."""
    info = dataset_info(config.dataset, config.data_dir)
    return Architecture(config.model, {
        "num_classes": data.num_classes,
        "in_channels": info.in_channels,
        "image_size": info.image_size[0],
        **config.model_kwargs,
    })


def _example_batch(architecture: Architecture) -> torch.Tensor:
    """Four seeded random inputs of the architecture's shape (the global RNG left alone)."""
    size = int(architecture.kwargs.get("image_size", 32))
    shape = (4, int(architecture.kwargs.get("in_channels", 3)), size, size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _initial_model(
    model: nn.Module | ModelFactory | None,
    architecture: Architecture,
    init_weights: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None,
    equal_norms: bool = False,
    norm_scale: float = 1.0,
) -> nn.Module:
    """The model to train: given, or built; then loaded with ``init_weights`` if given, else its
    filters brought to equal norms per layer if ``equal_norms`` and scaled by ``norm_scale``
    (given weights are W(0) as they are: a pruned network continued, a ticket rewound)."""
    built = model if isinstance(model, nn.Module) else (model or Architecture.build)(architecture)
    if init_weights is None:
        example = _example_batch(architecture)
        try:
            if equal_norms:
                equalize_filter_norms(built, example)
            scale_filter_norms(built, norm_scale, example)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    else:
        if isinstance(init_weights, str | os.PathLike):
            where: object = init_weights
            weights = load_weights(Path(init_weights))
        else:
            where, weights = "init_weights", dict(init_weights)
        try:
            built.load_state_dict(weights)
        except RuntimeError as exc:
            raise CheckpointError(f"{where}: does not fit the model ({exc})") from exc
    return built


# --------------------------------------------------------------------------- checkpoints


def _rng_states(loop: _Loop) -> dict[str, list[torch.Tensor]]:
    """Every rank's RNG states (ranks draw different augmentations)."""
    run = loop.run
    cuda = run.device.type == "cuda"
    return {
        "torch": gather_states(torch.get_rng_state(), run.dist),
        "augment": gather_states(loop.aug_gen.get_state(), run.dist),
        "cuda": gather_states(torch.cuda.get_rng_state(run.device), run.dist) if cuda else [],
    }


def _checkpoint(loop: _Loop, rng: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
    """Everything a resume needs (the path lives in ``path.pt``, written just before)."""
    run = loop.run
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_name": run.config.model,
        "architecture": run.architecture.to_dict(),
        "dataset": run.config.dataset,
        "epoch": run.epoch,
        "step": run.step,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": loop.scaler.state_dict(),
        "rng": rng,
        "callbacks": {c.name: c.state_dict() for c in loop.callbacks},
    }


def _restore(loop: _Loop, ckpt: dict[str, Any]) -> None:
    """Continue from ``ckpt``: weights, optimizer, schedule, RNGs, callbacks, path, metrics."""
    run, where = loop.run, loop.files.checkpoint_path
    try:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{where}: does not match this run's model/optimizer ({exc})"
        ) from exc
    run.scheduler.load_state_dict(ckpt["scheduler"])
    # The lr of the coming epoch, from this run's schedule (a resume may have stretched it).
    for group in run.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * run.lr_multiplier(run.scheduler.last_epoch)
    run.scheduler._last_lr = [group["lr"] for group in run.optimizer.param_groups]
    if ckpt["scaler"]:
        loop.scaler.load_state_dict(ckpt["scaler"])
    rng, rank = ckpt["rng"], run.dist.rank
    if len(rng["torch"]) != run.dist.world_size:
        raise CheckpointError(
            f"{where}: written by {len(rng['torch'])} processes, resumed with "
            f"{run.dist.world_size}; resume with the same number of processes"
        )
    torch.set_rng_state(rng["torch"][rank])
    loop.aug_gen.set_state(rng["augment"][rank])
    if run.device.type == "cuda" and rng.get("cuda"):
        torch.cuda.set_rng_state(rng["cuda"][rank], run.device)
    _restore_callbacks(loop, ckpt["callbacks"])
    run.epoch, run.step = int(ckpt["epoch"]), int(ckpt["step"])
    baseline_without_path = (not isinstance(run.optimizer, DessiLBI)
                             and not loop.files.path_path.exists())
    if loop.recorder is not None and not baseline_without_path:
        # (A baseline run made before baselines recorded their norms has no path.pt: its
        # recording starts here.)
        loop.recorder.load_state_dict(loop.files.read_path())
        # path.pt is written before the checkpoint: after a crash between the two it holds
        # one epoch more, which the resumed run records again.
        loop.recorder.truncate(run.epoch, run.step)
    loop.records = loop.files.resume_records(run.epoch)
    loop.saved_epoch = run.epoch
    loop.files.write_config(run.config)  # a resume may have extended the run


def _restore_callbacks(loop: _Loop, saved: dict[str, Any]) -> None:
    names = {c.name for c in loop.callbacks}
    if set(saved) != names:
        raise CheckpointError(
            f"{loop.files.checkpoint_path}: saved with callbacks {sorted(saved)}, resumed with "
            f"{sorted(names)}; pass the same callbacks to continue the run"
        )
    for callback in loop.callbacks:
        try:
            callback.load_state_dict(saved[callback.name])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{loop.files.checkpoint_path}: {exc}") from exc


# --------------------------------------------------------------------------- the loop


@dataclass
class _Loop:
    """Everything a step needs that is not in the :class:`TrainingRun`."""

    run: TrainingRun
    data: _RunData
    files: RunFiles
    callbacks: list[Callback]
    recorder: PathRecorder | None
    mask_provider: MaskProvider | None
    scaler: torch.amp.GradScaler
    autocast: Callable[[], Any]
    aug_gen: torch.Generator
    say: Callable[[str], None]
    show: bool
    log_every: int
    records: list[dict[str, Any]] = field(default_factory=list)
    saved_epoch: int = 0  # the epoch of the checkpoint on disk
    recorded_optimizer: Optimizer | None = None  # the optimizer the recorder follows


def _train_step(loop: _Loop, images: torch.Tensor, labels: torch.Tensor, batch: int) -> Any:
    """One optimizer step on a batch; returns the (detached) loss and logits."""
    run = loop.run
    x = loop.data.prepare_train(images, loop.aug_gen)
    with loop.autocast():
        logits = run.net(x)
    loss = F.cross_entropy(logits.float(), labels)
    if not torch.isfinite(loss):
        where = f"epoch {run.epoch + 1}, step {batch + 1}"  # only for the message
        raise TrainingError(_diverged(loop, float(loss.detach()), where))
    run.optimizer.zero_grad(set_to_none=True)
    loop.scaler.scale(loss).backward()
    # Under fp16 a step whose gradients overflowed is skipped here (optimizer.step is not
    # called), so W, V and Γ do not move; without a scaler this is optimizer.step().
    loop.scaler.step(run.optimizer)
    loop.scaler.update()
    run.step += 1
    for callback in loop.callbacks:
        callback.on_step_end(run)
    if loop.recorder is not None:
        # On every rank (Γ is the same on all): a recorder error then stops every rank,
        # instead of rank 0 alone while the others wait in the next all-reduce.
        _follow_model(loop)
        loop.recorder.update_step(run.step)
    return loss.detach(), logits.detach()


def _diverged(loop: _Loop, loss: float, where: str) -> str:
    """The message of a non-finite loss, with the command that trains on."""
    run = loop.run
    saved = (f"the checkpoint of epoch {loop.saved_epoch}" if loop.saved_epoch
             else "no checkpoint yet")
    command = f"dessilbi train --config {run.run_dir / 'config.yaml'} --lr {run.config.lr / 10:g}"
    if run.config.run_name:
        command += f" --run-name {run.config.run_name}-lr{run.config.lr / 10:g}"
    return (f"the loss became {loss} at {where}; {run.run_dir} keeps {saved}. To train on with "
            f"a lower learning rate (another run, in a directory of its own): `{command}`")


class _StructureView:
    """The param groups DessiLBI would use, in place of a baseline optimizer for the recorder.

    A baseline's run records the group norms of the same layers (the SGD side of the paper's
    Figure 1); it has no Γ, so its support stays empty.
    """

    def __init__(self, config: TrainConfig, model: nn.Module) -> None:
        self.param_groups = structured_param_groups(
            model, conv=config.conv_structure, linear=config.linear_structure,
            norm=config.norm_structure, exclude=config.exclude,
        )
        self.state: dict[Any, Any] = {}


def _recorder_view(run: TrainingRun) -> Optimizer:
    """What the path recorder reads Γ and the structure from."""
    if isinstance(run.optimizer, DessiLBI):
        return run.optimizer
    return cast(Optimizer, _StructureView(run.config, run.model))


def _follow_model(loop: _Loop) -> None:
    """Point the path recorder at the current model (a callback may have replaced it)."""
    recorder, run = loop.recorder, loop.run
    if recorder is not None and (loop.recorded_optimizer is not run.optimizer
                                 or recorder.model is not run.model):
        recorder.model, recorder.optimizer = run.model, _recorder_view(run)
        loop.recorded_optimizer = run.optimizer


def _train_epoch(loop: _Loop, epoch: int) -> dict[str, float]:
    """Train epoch ``epoch`` (counted from 0); the mean loss and accuracy over all ranks."""
    run, batches = loop.run, loop.data.batches
    run.net.train()
    started = time.perf_counter()
    totals = torch.zeros(3, dtype=torch.float64, device=run.device)
    bar = tqdm(batches.epoch(epoch), total=batches.num_batches, desc=f"epoch {epoch + 1}",
               leave=False, disable=not loop.show, dynamic_ncols=True)
    for i, (images, labels) in enumerate(bar):
        loss, logits = _train_step(loop, images, labels, i)
        with torch.no_grad():
            totals[0] += loss * labels.numel()
            totals[1] += (logits.argmax(1) == labels).sum()
            totals[2] += labels.numel()
        if loop.log_every and (i + 1) % loop.log_every == 0 and run.dist.is_main:
            print(f"epoch {epoch + 1} step {i + 1}/{batches.num_batches} "
                  f"loss {float(loss):.4f}", flush=True)
    lr_used = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    epoch_time = time.perf_counter() - started
    if run.dist.enabled:
        dist.all_reduce(totals)
    return {"lr": lr_used, "train_loss": float(totals[0] / totals[2]),
            "train_acc": 100.0 * float(totals[1] / totals[2]), "epoch_time": epoch_time}


def _evaluate_epoch(loop: _Loop) -> dict[str, Any]:
    """Test accuracy of W and of the sparse network (when there is a mask provider)."""
    run, data = loop.run, loop.data
    def score() -> float:
        return evaluate(run.net, data.test_set, data.prepare_test, loop.autocast, run.config,
                        run.dist, run.device)

    test_acc = score()
    sparse_acc = None
    if loop.mask_provider is not None:
        with masked_weights(run.model, loop.mask_provider(run.model, run.optimizer)):
            sparse_acc = score()
    selected = selected_groups(run.model, run.optimizer) \
        if isinstance(run.optimizer, DessiLBI) else {}
    return {"test_acc": test_acc, "test_acc_sparse": sparse_acc,
            "selected": {name: list(pair) for name, pair in selected.items()}}


def _run_epoch(loop: _Loop, epoch: int) -> dict[str, Any]:
    """Train, call the epoch callbacks, evaluate and save epoch ``epoch`` (counted from 0)."""
    run = loop.run
    trained = _train_epoch(loop, epoch)
    run.epoch = epoch + 1
    extra: dict[str, Any] = {}
    for callback in loop.callbacks:
        extra.update(callback.on_epoch_end(run) or {})
    _follow_model(loop)
    record = {"epoch": run.epoch, "step": run.step, **trained, **_evaluate_epoch(loop), **extra}
    loop.records.append(record)
    rng = _rng_states(loop)  # collective under DDP: every rank takes part
    if loop.recorder is not None:
        loop.recorder.record_epoch(run.epoch)
    recorder = loop.recorder
    loop.files.save_epoch(
        loop.records,
        recorder.state_dict if recorder is not None else None,
        lambda: _checkpoint(loop, rng),
    )
    loop.saved_epoch = run.epoch
    if run.dist.is_main:
        sparse = record["test_acc_sparse"]
        sparse_text = f" sparse {sparse:.2f}%" if sparse is not None else ""
        if not loop.show or loop.log_every:
            loop.say(f"epoch {run.epoch}/{run.config.epochs} loss {record['train_loss']:.4f} "
                     f"train {record['train_acc']:.2f}% test {record['test_acc']:.2f}%"
                     f"{sparse_text} ({record['epoch_time']:.1f} s)")
    if run.dist.enabled:
        dist.barrier()  # no rank runs ahead of the checkpoint of this epoch
    return record


def _make_say(show: bool) -> Callable[[str], None]:
    def say(line: str) -> None:
        # Flushed at once: quiet mode is meant for logs, and a log redirected to a file is
        # block-buffered, so a user tailing it would otherwise see nothing for many epochs.
        if show:
            tqdm.write(line)
        else:
            print(line, flush=True)

    return say


def train(
    config: TrainConfig,
    *,
    resume_dir: Path | None = None,
    quiet: bool = False,
    log_every: int = 0,
    model: nn.Module | ModelFactory | None = None,
    init_weights: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None = None,
    optimizer_factory: OptimizerFactory | None = None,
    callbacks: Iterable[Callback] = (),
    mask_provider: MaskProvider | None = None,
    architecture: Architecture | None = None,
) -> RunResult:
    """Train ``config`` (or continue the run in ``resume_dir``) and return its final figures.

    Args:
        config: the run's configuration (on resume: the saved one, possibly with more epochs).
        resume_dir: a run directory with a ``checkpoint.pt`` to continue from.
        quiet: no progress bars; one line per epoch.
        log_every: also print a line every this many steps (0: never); useful in logs.
        model: the model to train, or a factory ``factory(architecture) -> model`` (default:
            the registered ``config.model``, sized for the data set). On resume the factory
            gets the architecture saved in the checkpoint, so a model that changed shape in
            training is rebuilt with its current shape; a model *object* must already have it.
        init_weights: weights to start from instead of a fresh initialisation: a file (another
            run's ``init.pt`` or ``model.pt``, or a checkpoint) or a state dict. Default:
            ``config.init_from``. Ignored on resume (the checkpoint has the weights).
        optimizer_factory: ``factory(config, model) -> optimizer`` (default:
            :func:`build_optimizer`).
        callbacks: hooks after every step and epoch; their state is saved in the checkpoint.
            On resume pass the same callbacks again (same names).
        architecture: what a new run builds (and saves in its checkpoints) instead of the
            registered ``config.model`` sized for the data set, e.g. a compact network's
            (:attr:`Architecture.kept`). Ignored on resume (the checkpoint has it).
        mask_provider: ``provider(model, optimizer) -> masks``: the sparse network evaluated
            every epoch (``test_acc_sparse``). Default: Γ's support under DessiLBI, none
            otherwise. (The default is set up when the first optimizer is a DessiLBI; a
            baseline optimizer's run records the group norms of the layers the config would
            couple, with an empty support.)

    Under ``precision: fp16`` a step whose *gradients* overflow is skipped by the gradient
    scaler; a non-finite *loss* stops the run like any divergence.
    """
    dist_info, device = init_distributed(config.device)
    files, ckpt = RunFiles.open(config, resume_dir, dist_info.is_main, dist_info.world_size)
    if ckpt is not None and int(ckpt["epoch"]) > config.epochs:
        raise TrainingError(
            f"{files.run_dir} has trained {ckpt['epoch']} epochs already, more than the "
            f"{config.epochs} asked for; a run is never cut back (nothing was changed)"
        )
    if init_weights is None and config.init_from is not None:
        init_weights = config.init_from
        if config.equal_filter_norms or config.filter_norm_scale != 1:
            warnings.warn(f"init_from {config.init_from}: its weights are W(0) as they are; "
                          "equal_filter_norms and filter_norm_scale are not applied to them",
                          stacklevel=2)
    # The thread count first: flushing then reaches every thread of the pool in use.
    with (intra_op_threads(config.threads),
          flush_denormal(device.type == "cpu" and config.flush_denormal)):
        data = _load_data(config, dist_info, device)
        if ckpt is not None:
            architecture = Architecture.from_dict(ckpt["architecture"])
        elif architecture is None:
            architecture = default_architecture(config, data)
        torch.manual_seed(config.seed)
        loop = _build_loop(
            config, files, data, dist_info, device,
            _initial_model(model, architecture, None if ckpt else init_weights,
                           config.equal_filter_norms and ckpt is None,
                           config.filter_norm_scale if ckpt is None else 1.0), architecture,
            optimizer_factory or build_optimizer, [*_config_callbacks(config), *callbacks],
            mask_provider, quiet,
            log_every,
        )
        if ckpt is not None:
            _restore(loop, ckpt)
        else:
            files.start(config, loop.run.model.state_dict())
        _announce(loop)
        for callback in loop.callbacks:
            callback.on_train_start(loop.run)
        try:
            _fit(loop)
        except KeyboardInterrupt:
            raise TrainingInterrupted(_kept(loop, "interrupted")) from None
    return _result(loop)


def _announce(loop: _Loop) -> None:
    """Say what this call does: a new run, a resumed one, or a finished one reported."""
    run = loop.run
    if not run.dist.is_main:
        return
    total = run.config.epochs
    if run.epoch == 0:
        loop.say(f"new run: {run.run_dir} ({total} epochs)")
    elif run.epoch < total:
        loop.say(f"resuming {run.run_dir} from epoch {run.epoch} of {total}")
    else:
        stretch = " --schedule-epochs N" if run.config.schedule == "cosine" else ""
        loop.say(f"{run.run_dir}: finished ({run.epoch}/{total} epochs), nothing to train; "
                 f"extend it with `dessilbi train --resume {run.run_dir} --epochs N{stretch}`")


def _kept(loop: _Loop, what: str) -> str:
    """What a stopped run leaves behind, and the command that continues it."""
    run, saved = loop.run, loop.saved_epoch
    kept = (f"{run.run_dir} keeps the checkpoint of epoch {saved}" if saved
            else f"{run.run_dir} has no checkpoint yet")
    again = (f"`dessilbi train --resume {run.run_dir}` continues from there" if saved
             else "the same command starts it again")
    return f"{what} in epoch {saved + 1}; {kept}; {again}"


def _build_loop(
    config: TrainConfig,
    files: RunFiles,
    data: _RunData,
    dist_info: DistInfo,
    device: torch.device,
    model: nn.Module,
    architecture: Architecture,
    optimizer_factory: OptimizerFactory,
    callbacks: list[Callback],
    mask_provider: MaskProvider | None,
    quiet: bool,
    log_every: int,
) -> _Loop:
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    names = [c.name for c in callbacks]
    if len(set(names)) != len(names):
        raise ValueError(f"callback names must be unique, got {names}")

    def wrap(m: nn.Module) -> nn.Module:
        if not dist_info.enabled:
            return m
        return DistributedDataParallel(m, device_ids=[device] if device.type == "cuda" else None)

    optimizer = optimizer_factory(config, model)
    multiplier = lr_multiplier(config)
    run = TrainingRun(
        config=config, run_dir=files.run_dir, device=device, dist=dist_info, model=model,
        net=wrap(model), optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier),
        lr_multiplier=multiplier, architecture=architecture, optimizer_factory=optimizer_factory,
        wrap=wrap,
    )
    if mask_provider is None and isinstance(optimizer, DessiLBI):
        mask_provider = gamma_support
    show = not quiet and dist_info.is_main
    return _Loop(
        run=run, data=data, files=files, callbacks=callbacks,
        recorder=PathRecorder(model, _recorder_view(run)), recorded_optimizer=optimizer,
        mask_provider=mask_provider,
        scaler=gradient_scaler(config.precision, device),
        autocast=autocast_factory(config.precision, device),
        aug_gen=torch.Generator(device=device).manual_seed(config.seed * 7919 + dist_info.rank),
        say=_make_say(show), show=show, log_every=log_every,
    )


def _fit(loop: _Loop) -> None:
    """Run the remaining epochs, then save the final weights."""
    run = loop.run
    bar = tqdm(range(run.epoch, run.config.epochs), initial=run.epoch, total=run.config.epochs,
               desc="epochs", disable=not loop.show, dynamic_ncols=True)
    for epoch in bar:
        record = _run_epoch(loop, epoch)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", test=f"{record['test_acc']:.2f}")
    bar.close()
    loop.files.save_model(run.model.state_dict(), run.architecture.to_dict(), run.epoch)


def _result(loop: _Loop) -> RunResult:
    run = loop.run
    if not loop.records:
        raise TrainingError(f"{run.run_dir}: nothing to report (no epoch recorded)")
    last = loop.records[-1]
    return RunResult(
        run_dir=run.run_dir,
        epochs=int(last["epoch"]),
        test_acc=float(last["test_acc"]),
        test_acc_sparse=last["test_acc_sparse"],
        selected={k: (int(v[0]), int(v[1])) for k, v in last["selected"].items()},
        model=run.model,
        optimizer=run.optimizer,
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
        for name in distinct_group_names(result.selected):  # a channel's scale and shift: once
            sel, total = result.selected[name]
            lines.append(f"{name:<{width}}  {sel:>8} / {total}")
    return "\n".join(lines)
