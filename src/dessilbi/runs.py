"""Loading a finished (or running) run back from its directory alone.

Example::

    import dessilbi

    run = dessilbi.load_run("runs/mnist-lenet5-dessilbi-nu20-seed0-1a2b3c")
    run.model                  # the trained network with its dense weights W (eval mode)
    sparse = dessilbi.load_run(run.run_dir, weights="sparse").model   # W̃ = W ⊙ 1[Γ ≠ 0]
    pruned = dessilbi.load_run(run.run_dir, weights="pruned").model   # W̃, pruned filters off
    resumable = dessilbi.load_run(run.run_dir, with_optimizer=True)   # + optimizer and state
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.optim import Optimizer

from dessilbi.config import ConfigError, TrainConfig, load_config
from dessilbi.optim.proximal import group_axis
from dessilbi.path_record import PathRecord, load_path
from dessilbi.run_files import CheckpointError, load_checkpoint, load_model_file
from dessilbi.run_state import Architecture

__all__ = ["LoadedRun", "load_run"]

_WEIGHTS = ("dense", "sparse", "pruned")


@dataclass
class LoadedRun:
    """A run read back from its directory.

    Attributes:
        run_dir: the run directory.
        config: its resolved configuration (``config.yaml``).
        model: the network, built from the saved architecture, in eval mode.
        architecture: how the network was built (registered model and its arguments).
        epoch: the epoch the weights are from.
        weights: ``"dense"`` (W), ``"sparse"`` (W̃ = W ⊙ 1[Γ ≠ 0], from ``path.pt``) or
            ``"pruned"`` (W̃ with the unselected filters' biases and norm affine zeroed too).
        optimizer: with ``with_optimizer=True``, the optimizer with its state (V, Γ, momentum).
    """

    run_dir: Path
    config: TrainConfig
    model: nn.Module
    architecture: Architecture
    epoch: int
    weights: str
    optimizer: Optimizer | None = None


def load_run(
    run_dir: str | os.PathLike[str],
    *,
    weights: str = "dense",
    with_optimizer: bool = False,
) -> LoadedRun:
    """Read a run back from its directory: the model (W or W̃), the config, the optimizer.

    The weights come from ``checkpoint.pt`` (the last finished epoch) or, when it was deleted,
    from ``model.pt`` with its architecture in ``model.json``. ``weights="sparse"`` zeroes every
    coupled weight outside the support of Γ recorded in ``path.pt`` at that epoch (the paper's
    W̃; biases and normalisation parameters stay, as in the ``test_acc_sparse`` of
    ``metrics.jsonl``). ``weights="pruned"`` is the pruned network: W̃, and for filter-coupled
    layers also the bias entries of the unselected filters and the affine weight and bias of the
    normalisation channels that follow them (found with torch-pruning's dependency graph, see
    :mod:`dessilbi.subnet.dependency`), so an unselected channel is exactly zero after its norm,
    as if the filter were removed. ``with_optimizer=True`` needs ``checkpoint.pt``.

    Raises:
        ConfigError: no ``config.yaml`` (not a run directory).
        CheckpointError: missing or damaged weights, or no checkpoint for the optimizer.
        ValueError: an unknown ``weights``, or ``"sparse"`` for a run without a path.
    """
    if weights not in _WEIGHTS:
        raise ValueError(f"invalid weights: {weights!r} (expected 'dense', 'sparse' or "
                         "'pruned')")
    root = Path(run_dir)
    if with_optimizer and weights != "dense":
        raise ValueError("with_optimizer=True loads the dense weights W the optimizer state "
                         "belongs to; load the sparse network separately")
    if not (root / "config.yaml").is_file():
        raise ConfigError(f"{root}: not a dessilbi run directory (no config.yaml)")
    config = load_config(root / "config.yaml")
    ckpt = load_checkpoint(root / "checkpoint.pt") if (root / "checkpoint.pt").is_file() else None
    if ckpt is not None:
        architecture = Architecture.from_dict(ckpt["architecture"])
        state, epoch = ckpt["model"], int(ckpt["epoch"])
    elif with_optimizer:
        raise CheckpointError(f"{root / 'checkpoint.pt'}: missing; the optimizer state is there")
    else:
        state, meta = load_model_file(root)
        architecture, epoch = Architecture.from_dict(meta["architecture"]), int(meta["epoch"])
    with torch.random.fork_rng(devices=[]):  # building draws weights: keep the caller's RNG
        model = architecture.build()
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{root}: the weights do not fit their architecture ({exc})") from exc
    optimizer = None
    if ckpt is not None and with_optimizer:
        from dessilbi.train import build_optimizer  # the training stack, only when asked for

        optimizer = build_optimizer(config, model)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{root / 'checkpoint.pt'}: its optimizer state does not fit the optimizer of "
                f"config.yaml (was the run trained with an optimizer factory of its own?): {exc}"
            ) from exc
    if weights != "dense":
        if config.optimizer != "dessilbi":
            raise ValueError(f"{root}: a {config.optimizer} run has no sparse network W̃ (only "
                             "DessiLBI runs select groups); load weights='dense'")
        record = _keep_support(model, root, epoch)
        if weights == "pruned":
            _prune_unselected(model, record, epoch, config)
    return LoadedRun(root, config, model.eval(), architecture, epoch, weights, optimizer)


def _prune_unselected(model: nn.Module, record: PathRecord, epoch: int,
                      config: TrainConfig) -> None:
    """Zero the biases and norm affine of the filters unselected at ``epoch`` as well."""
    from dessilbi.batches import example_input
    from dessilbi.data import DatasetError
    from dessilbi.subnet import support_mask, zero_pruned_filters

    keep = support_mask(record, epoch).keep
    try:
        example = example_input(config)
    except DatasetError as exc:
        raise ValueError(f"the pruned network needs the input shape of {config.dataset}: "
                         f"{exc}") from exc
    zero_pruned_filters(model, keep, example)


@torch.no_grad()
def _keep_support(model: nn.Module, root: Path, epoch: int) -> PathRecord:
    """Zero every coupled weight outside Γ's support at ``epoch`` (read from ``path.pt``)."""
    path_file = root / "path.pt"
    if not path_file.is_file():
        raise ValueError(f"{path_file}: missing, so the run has no sparse network W̃ (only "
                         "DessiLBI runs record one); load weights='dense'")
    record = load_path(path_file)
    if epoch not in record.epochs:
        raise ValueError(f"{path_file}: holds no support for epoch {epoch}")
    params = dict(model.named_parameters())
    unknown = [name for name in record.names if name not in params]
    if unknown:
        raise ValueError(f"{path_file}: records layers the model does not have: {unknown[:3]}")
    for name in record.names:
        if any(record.group_shape(name, epoch)):  # coupled at that epoch
            params[name].mul_(weight_mask(record, name, epoch, params[name].shape))
    return record


def weight_mask(record: PathRecord, name: str, epoch: int, shape: torch.Size) -> torch.Tensor:
    """The support of layer ``name`` at ``epoch`` as a bool mask of the weight's ``shape``."""
    support = record.support(name, epoch)
    structure = record.structure(name)
    if structure == "element":
        return support.reshape(shape)
    view = [1] * len(shape)
    view[group_axis(structure)] = -1
    return support.view(view).expand(shape)
