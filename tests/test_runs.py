"""``dessilbi.load_run``: a run read back from nothing but its directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import dessilbi
from dessilbi.config import ConfigError, load_config
from dessilbi.models import build_model
from dessilbi.run_files import CheckpointError
from dessilbi.train import RunResult, train

sys.path.insert(0, str(Path(__file__).parent))
from compare import assert_same


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    out = tmp_path_factory.mktemp("runs")
    return train(load_config("digits", {"epochs": 2, "nu": 5, "out": str(out)}), quiet=True)


def test_the_trained_model_comes_back_with_its_config_and_optimizer(finished: RunResult) -> None:
    result = finished
    assert result.model is not None and result.optimizer is not None
    run = dessilbi.load_run(result.run_dir)
    assert run.epoch == 2 and run.weights == "dense" and run.config.nu == 5
    assert run.architecture.kwargs["in_channels"] == 1  # digits: 8x8 grey images
    with pytest.raises(RuntimeError):  # the registry's defaults (3 channels) would not fit
        build_model("small_cnn").load_state_dict(run.model.state_dict())
    assert_same(run.model.state_dict(), result.model.state_dict())
    assert not run.model.training

    again = dessilbi.load_run(result.run_dir, with_optimizer=True)
    assert isinstance(again.optimizer, dessilbi.DessiLBI)
    assert_same(again.optimizer.state_dict()["state"],
                result.optimizer.state_dict()["state"])


def test_the_sparse_network_is_w_on_the_support_of_gamma(finished: RunResult) -> None:
    result = finished
    assert result.model is not None and result.optimizer is not None
    sparse = dessilbi.load_run(result.run_dir, weights="sparse").model
    optimizer, model = result.optimizer, result.model
    masks = dessilbi.support_masks(model, optimizer)
    assert set(masks) == {"conv1.weight", "conv2.weight", "conv3.weight"}
    weights = sparse.state_dict()
    for name, value in model.state_dict().items():
        expected = value * masks[name] if name in masks else value
        assert torch.equal(weights[name], expected), name
    assert any(bool((~m).any()) for m in masks.values())  # something was zeroed


def test_the_pruned_network_also_zeroes_the_unselected_filters_biases(
        finished: RunResult) -> None:
    """weights="pruned": W̃, and the bias entries of the filters Γ did not select are zero (the
    digits CNN has no norm layers; tests/test_subnet.py covers batch norm)."""
    result = finished
    assert result.model is not None and result.optimizer is not None
    pruned = dessilbi.load_run(result.run_dir, weights="pruned")
    assert pruned.weights == "pruned"
    masks = dessilbi.support_masks(result.model, result.optimizer)
    weights = pruned.model.state_dict()
    zeroed = 0
    for name, value in result.model.state_dict().items():
        layer, _, kind = name.rpartition(".")
        mask = masks.get(f"{layer}.weight")
        if mask is None:
            assert torch.equal(weights[name], value), name
            continue
        kept = mask.flatten(1).any(1)
        expected = value * mask if kind == "weight" else value * kept
        assert torch.equal(weights[name], expected), name
        zeroed += int((~kept).sum()) if kind == "bias" else 0
    assert zeroed > 0


def test_without_the_checkpoint_the_final_weights_still_load(tmp_path: Path) -> None:
    config = load_config("digits", {"epochs": 1, "optimizer": "sgd", "out": str(tmp_path)})
    result = train(config, quiet=True)
    (result.run_dir / "checkpoint.pt").unlink()
    run = dessilbi.load_run(result.run_dir)
    assert run.epoch == 1 and result.model is not None
    assert_same(run.model.state_dict(), result.model.state_dict())
    with pytest.raises(CheckpointError, match="checkpoint.pt: missing; the optimizer state"):
        dessilbi.load_run(result.run_dir, with_optimizer=True)
    with pytest.raises(ValueError, match="a sgd run has no sparse network"):
        dessilbi.load_run(result.run_dir, weights="sparse")
    with pytest.raises(ValueError, match="a sgd run has no sparse network"):
        dessilbi.load_run(result.run_dir, weights="pruned")
    with pytest.raises(ValueError, match="invalid weights: 'compact'"):
        dessilbi.load_run(result.run_dir, weights="compact")
    with pytest.raises(ConfigError, match="config.yaml"):
        dessilbi.load_run(tmp_path / "nowhere")
