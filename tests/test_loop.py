"""The training loop's seams: callbacks with checkpointed state, a mask held fixed, starting
weights, model and optimizer factories, a model that changes shape, mask providers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dessilbi.callbacks import Callback
from dessilbi.config import TrainConfig, load_config
from dessilbi.models import build_model
from dessilbi.run_files import CheckpointError
from dessilbi.run_state import Architecture, TrainingRun
from dessilbi.train import train

SCRIPT = Path(__file__).with_name("masked_run.py")
sys.path.insert(0, str(SCRIPT.parent))
from compare import assert_same  # noqa: E402
from masked_run import conv2_masks  # noqa: E402


def _metrics(run: Path) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "epoch_time"} for m in lines]


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_fixed_mask_holds_through_momentum_and_decay_and_resumes_bitwise_after_sigkill(
    tmp_path: Path,
) -> None:
    whole = _script(str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stdout + whole.stderr  # 3: a masked entry moved

    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path / "killed"),
                             "--pause-at-step", str(22 + 9)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("paused at step 31"):  # it sleeps there: killed mid-epoch 2
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed = tmp_path / "killed" / "masked"
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = _script(str(tmp_path / "killed"))  # the same command continues the run
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    reference = tmp_path / "whole" / "masked"
    for name in ("model.pt", "path.pt"):
        assert_same(torch.load(reference / name, weights_only=True),
              torch.load(killed / name, weights_only=True), name)
    a = torch.load(reference / "checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    for key in ("model", "optimizer", "callbacks", "rng", "architecture"):
        assert_same(a[key], b[key], key)
    assert _metrics(reference) == _metrics(killed)
    assert _metrics(killed)[-1]["mask_kept"] == [16 * 16 * 9 + 16, 32 * 16 * 9 + 32]
    assert len(_metrics(killed)) == 3

    final = torch.load(killed / "model.pt", weights_only=True)
    for name, keep in conv2_masks().items():
        assert bool((final[name][~keep] == 0).all()), name
        assert bool((final[name][keep] != 0).all()), name
    # A pruned entry carries no optimizer state either: momentum, V and Γ are zero there.
    state = _optimizer_state_of(b["optimizer"], "conv2.weight")
    assert set(state) == {"momentum_buffer", "v", "gamma"}
    keep = conv2_masks()["conv2.weight"]
    for key, value in state.items():
        assert bool((value[~keep] == 0).all()), key
    assert bool((state["momentum_buffer"][keep] != 0).any())


def _optimizer_state_of(optimizer_state: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    for group in optimizer_state["param_groups"]:
        for index, param_name in zip(group["params"], group["param_names"], strict=True):
            if param_name == name:
                return optimizer_state["state"][index]
    raise KeyError(name)


def test_without_holding_the_mask_momentum_and_decay_revive_pruned_weights(
    tmp_path: Path,
) -> None:
    """The control of the test above: zeroing once is not enough."""
    control = _script(str(tmp_path), "--epochs", "1", "--no-hold")
    assert control.returncode == 0, control.stderr
    final = torch.load(tmp_path / "masked" / "model.pt", weights_only=True)
    keep = conv2_masks()["conv2.weight"]
    assert bool((final["conv2.weight"][~keep] != 0).any())


class _Crash(Exception):
    pass


class CrashAt(Callback):
    """Raises at a given step: an in-process stand-in for a killed run."""

    def __init__(self, step: int) -> None:
        self.at = step

    @property
    def name(self) -> str:  # the same name as in the uninterrupted run: no state to restore
        return "CrashAt"

    def on_step_end(self, run: TrainingRun) -> None:
        if run.step == self.at:
            raise _Crash


class Widen(Callback):
    """At the end of an epoch, widens the MLP's first hidden layer from 64 to 72 units."""

    def __init__(self, at_epoch: int = 1) -> None:
        self.at_epoch = at_epoch
        self.widened_at: int | None = None

    def on_epoch_end(self, run: TrainingRun) -> dict[str, Any]:
        if run.epoch == self.at_epoch:
            kwargs = {**run.architecture.kwargs, "hidden": [72, 32]}
            architecture = Architecture(run.architecture.name, kwargs)
            wider = architecture.build()
            old = run.model.state_dict()
            with torch.no_grad():  # keep the trained units, new ones start fresh
                for name, tensor in wider.state_dict().items():
                    slices = tuple(slice(0, n) for n in old[name].shape)
                    tensor[slices] = old[name]
            run.replace_model(wider, architecture)
            self.widened_at = run.step
        return {"width": int(run.model.state_dict()["layers.fc1.weight"].shape[0])}

    def state_dict(self) -> dict[str, Any]:
        return {"widened_at": self.widened_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.widened_at = state["widened_at"]


def _mlp_config(out: Path) -> TrainConfig:
    return load_config("digits", {"model": "mlp", "model_kwargs": {"hidden": [64, 32]},
                                  "epochs": 3, "nu": 5, "conv_structure": "none",
                                  "linear_structure": "filter", "out": str(out),
                                  "run_name": "grown"})


def test_a_model_that_changed_shape_resumes_from_its_saved_architecture(tmp_path: Path) -> None:
    whole = train(_mlp_config(tmp_path / "whole"), quiet=True, callbacks=[Widen(), CrashAt(-1)])
    config = _mlp_config(tmp_path / "crashed")
    with pytest.raises(_Crash):
        train(config, quiet=True, callbacks=[Widen(), CrashAt(22 + 5)])  # mid-epoch 2
    ckpt = torch.load(tmp_path / "crashed" / "grown" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["architecture"]["kwargs"]["hidden"] == [72, 32]
    widen = Widen()
    resumed = train(config, quiet=True, callbacks=[widen, CrashAt(-1)])
    assert widen.widened_at == 22  # restored from the checkpoint, not widened again

    assert resumed.model is not None and whole.model is not None
    assert resumed.model.state_dict()["layers.fc1.weight"].shape == (72, 64)
    assert_same(whole.model.state_dict(), resumed.model.state_dict())
    assert_same(torch.load(whole.run_dir / "path.pt", weights_only=True),
          torch.load(resumed.run_dir / "path.pt", weights_only=True))
    assert _metrics(whole.run_dir) == _metrics(resumed.run_dir)
    assert [m["width"] for m in _metrics(resumed.run_dir)] == [72, 72, 72]
    path = torch.load(resumed.run_dir / "path.pt", weights_only=True)
    assert "layers.fc1.weight" in path["names"]


def test_a_crash_between_path_file_and_checkpoint_resumes_bitwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """path.pt is one epoch ahead of the checkpoint (and of a widening): cut back on resume."""
    import dessilbi.run_files as run_files

    whole = train(_mlp_config(tmp_path / "whole"), quiet=True, callbacks=[Widen(2), CrashAt(-1)])
    real_save = run_files.atomic_save

    def save(obj: Any, path: Path) -> None:
        if path.name == "checkpoint.pt" and obj["epoch"] == 2:
            raise _Crash  # after path.pt and metrics.jsonl of epoch 2 were written
        real_save(obj, path)

    config = _mlp_config(tmp_path / "crashed")
    monkeypatch.setattr(run_files, "atomic_save", save)
    with pytest.raises(_Crash):
        train(config, quiet=True, callbacks=[Widen(2), CrashAt(-1)])
    monkeypatch.setattr(run_files, "atomic_save", real_save)
    run = tmp_path / "crashed" / "grown"
    assert torch.load(run / "path.pt", weights_only=True)["epochs"].tolist() == [1, 2]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1

    resumed = train(config, quiet=True, callbacks=[Widen(2), CrashAt(-1)])
    assert_same(torch.load(whole.run_dir / "path.pt", weights_only=True),
                torch.load(resumed.run_dir / "path.pt", weights_only=True))
    assert_same(torch.load(whole.run_dir / "model.pt", weights_only=True),
                torch.load(resumed.run_dir / "model.pt", weights_only=True))
    assert _metrics(whole.run_dir) == _metrics(resumed.run_dir)
    assert [m["width"] for m in _metrics(resumed.run_dir)] == [64, 72, 72]


def test_resume_with_other_callbacks_is_refused(tmp_path: Path) -> None:
    config = _mlp_config(tmp_path)
    with pytest.raises(_Crash):
        train(config, quiet=True, callbacks=[Widen(), CrashAt(30)])
    with pytest.raises(CheckpointError, match=r"callbacks \['CrashAt', 'Widen'\].*\['CrashAt'\]"):
        train(config, quiet=True, callbacks=[CrashAt(-1)])


def test_a_run_starts_from_given_weights_a_model_object_and_an_optimizer_factory(
    tmp_path: Path,
) -> None:
    first = train(load_config("digits", {"epochs": 1, "out": str(tmp_path), "seed": 3}),
                  quiet=True)
    init = first.run_dir / "init.pt"
    # From a file, through the config: seed 0 would draw other weights.
    second = train(load_config("digits", {"epochs": 1, "out": str(tmp_path),
                                          "init_from": str(init)}), quiet=True)
    assert_same(torch.load(init, weights_only=True),
          torch.load(second.run_dir / "init.pt", weights_only=True))
    # A model object and an optimizer factory: the run trains that very object.
    net = build_model("small_cnn", num_classes=10, in_channels=1, image_size=8)
    built: list[nn.Module] = []

    def adam(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
        built.append(model)
        return torch.optim.Adam(model.parameters(), lr=1e-3)

    third = train(load_config("digits", {"epochs": 1, "out": str(tmp_path), "run_name": "obj"}),
                  quiet=True, model=net, optimizer_factory=adam)
    assert third.model is net and built == [net]
    assert isinstance(third.optimizer, torch.optim.Adam)
    assert third.test_acc_sparse is None and third.selected == {}

    with pytest.raises(CheckpointError, match="nowhere.pt: no weights file"):
        train(load_config("digits", {"epochs": 1, "out": str(tmp_path), "run_name": "x"}),
              quiet=True, init_weights=tmp_path / "nowhere.pt")
    mlp_weights = build_model("mlp", num_classes=10, in_channels=1, image_size=8).state_dict()
    with pytest.raises(CheckpointError, match="does not fit the model"):
        train(load_config("digits", {"epochs": 1, "out": str(tmp_path), "run_name": "y"}),
              quiet=True, init_weights=mlp_weights)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y" / "checkpoint.pt").exists()


def test_sparse_evaluation_through_any_mask_provider(tmp_path: Path) -> None:
    """SGD with a provider that keeps nothing of conv3: the 'sparse' network is at chance."""
    def drop_conv3(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"conv3.weight": torch.zeros_like(model.conv3.weight, dtype=torch.bool),
                "conv3.bias": torch.zeros_like(model.conv3.bias, dtype=torch.bool)}

    config = load_config("digits", {"epochs": 2, "optimizer": "sgd", "out": str(tmp_path)})
    result = train(config, quiet=True, mask_provider=drop_conv3)
    assert result.test_acc > 80
    assert result.test_acc_sparse is not None and result.test_acc_sparse < 20
    assert result.model is not None and bool((result.model.conv3.weight != 0).all())


def test_fixed_mask_refuses_other_masks_on_resume_and_leaves_step_counters_alone() -> None:
    from dessilbi.callbacks import FixedMask
    from dessilbi.masks import apply_masks

    keep = {"weight": torch.tensor([[True, False], [False, True]])}
    mask = FixedMask(keep, name="ticket")
    assert mask.name == "ticket"
    mask.load_state_dict(FixedMask(keep).state_dict())  # the same masks: fine
    with pytest.raises(ValueError, match="ticket: the run was trained with other masks"):
        mask.load_state_dict(FixedMask({"weight": ~keep["weight"]}).state_dict())

    layer = nn.Linear(2, 2, bias=False)
    adam = torch.optim.Adam(layer.parameters())
    layer(torch.ones(1, 2)).sum().backward()
    adam.step()
    apply_masks(layer, keep, adam)
    state = adam.state[layer.weight]
    assert bool((layer.weight[~keep["weight"]] == 0).all())
    assert bool((state["exp_avg"][~keep["weight"]] == 0).all())
    assert float(state["step"]) == 1.0  # a counter, not per-entry state
