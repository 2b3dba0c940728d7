"""``selection_start``: per-layer λ calibrated so that every layer starts selecting at one epoch."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dessilbi import DessiLBI
from dessilbi.config import ConfigError, TrainConfig, load_config
from dessilbi.models import build_model
from dessilbi.path_record import load_path
from dessilbi.selection import CALIBRATING_LAM, split_coupled_groups, start_thresholds
from dessilbi.structure import structured_param_groups
from dessilbi.train import train

START = 5


class WithProbes(nn.Module):
    """The digits CNN plus two probe layers that get no gradient (their output is multiplied by
    zero), one 10x the other: their V grows by (lr/ν)·W per step and W only shrinks by the
    coupling's pull, so the predicted entry can be checked exactly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = build_model("small_cnn", num_classes=10, in_channels=1, image_size=8)
        self.probe_small = nn.Linear(8, 4)
        self.probe_big = nn.Linear(8, 4)
        with torch.no_grad():
            self.probe_big.weight.copy_(10 * self.probe_small.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)[:, :8]
        probes = self.probe_small(flat).sum(1, keepdim=True) + self.probe_big(flat).sum(1,
                                                                                       True)
        return self.net(x) + 0 * probes


def _config(out: Path, **overrides: Any) -> TrainConfig:
    values = {"epochs": 6, "linear_structure": "filter", "exclude": ["net.fc"],
              "weight_decay": 0.0, "out": str(out), **overrides}
    return load_config("digits", values)


def _first_entries(run_dir: Path) -> dict[str, int]:
    record = load_path(run_dir / "path.pt")
    out = {}
    for name in record.names:
        entry = record.entry_epoch(name)
        out[name] = int(entry[entry >= 0].min()) if bool((entry >= 0).any()) else -1
    return out


def _lams(run_dir: Path) -> dict[str, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return lines[0]["selection_lam"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("runs")
    # nu 70 at lr 0.1 forgets the initial weights over 700 steps, 32 of the digits' 22-step
    # epochs: a calibration over epoch 1 measures the transient, and says so.
    with pytest.warns(UserWarning, match=r"adds up to 0\.00 of its time constant .*later than "
                      r"epoch 5: calibrate over 33 epochs"):
        return train(_config(out, selection_start=START), model=WithProbes(), quiet=True)


def test_every_layer_starts_selecting_in_the_chosen_epoch(calibrated: Any) -> None:
    """The probes (no gradient, 10x apart in scale) enter in epoch 5 exactly, with λ 10x apart;
    the trained conv layers within an epoch of it (their W grows, so ‖V‖ grows faster than the
    linear prediction); nothing enters during the calibration epoch."""
    entries = _first_entries(calibrated.run_dir)
    assert entries["probe_small.weight"] == entries["probe_big.weight"] == START
    for conv in ("net.conv1.weight", "net.conv2.weight", "net.conv3.weight"):
        assert entries[conv] in (START - 1, START), (conv, entries)
    lams = _lams(calibrated.run_dir)
    assert set(lams) == set(entries)
    assert lams["probe_big.weight"] == pytest.approx(10 * lams["probe_small.weight"], rel=1e-6)
    saved = load_config(calibrated.run_dir / "config.yaml")
    assert saved.selection_start == START and saved.selection_calibration == 1


def test_the_calibrated_run_is_dessilbi_with_those_lams_from_step_0(
        calibrated: Any, tmp_path: Path) -> None:
    """Per-layer λ fixed from the first step to the calibrated values: bitwise the same run."""
    lams = _lams(calibrated.run_dir)

    def fixed(config: TrainConfig, model: nn.Module) -> DessiLBI:
        groups = split_coupled_groups(structured_param_groups(
            model, conv="filter", linear="filter", exclude=["net.fc"], weight_decay=0.0))
        for group in groups:
            if group["structure"] is not None:
                assert group["lam"] == CALIBRATING_LAM
                group["lam"] = lams[group["param_names"][0]]
        return DessiLBI(groups, lr=config.lr, kappa=config.kappa, nu=config.nu,
                        momentum=config.momentum, nesterov=config.nesterov)

    plain = train(_config(tmp_path), model=WithProbes(), optimizer_factory=fixed, quiet=True)
    assert plain.model is not None and calibrated.model is not None
    for (name, a), b in zip(calibrated.model.state_dict().items(),
                            plain.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for p, q in zip(calibrated.optimizer.param_groups, plain.optimizer.param_groups,
                    strict=True):
        for x, y in zip(p["params"], q["params"], strict=True):
            for key in ("v", "gamma"):
                if key in calibrated.optimizer.state[x]:
                    assert torch.equal(calibrated.optimizer.state[x][key],
                                       plain.optimizer.state[y][key])


@pytest.mark.filterwarnings("ignore:selection_start:UserWarning")  # the fixture's, again
def test_a_resumed_calibrated_run_continues_bitwise(calibrated: Any, tmp_path: Path) -> None:
    first = train(_config(tmp_path, selection_start=START, epochs=3), model=WithProbes(),
                  quiet=True)
    resumed = train(_config(tmp_path, selection_start=START, epochs=6),
                    model=WithProbes(), resume_dir=first.run_dir, quiet=True)
    assert resumed.model is not None and calibrated.model is not None
    for (name, a), b in zip(calibrated.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert _lams(resumed.run_dir) == _lams(calibrated.run_dir)


def test_calibration_warns_only_before_the_pull_has_settled(tmp_path: Path) -> None:
    """The warning sums the pull κ·lr/ν actually applied before the last calibration epoch (at
    each step's lr): a strong pull at lr 0.1 settles W within epoch 1, and a tenfold drop of lr
    after it (which makes ν/(κ·lr) at the end of the calibration 100 steps, more than the
    digits' 22-step epochs) must not make it warn."""
    from dessilbi.selection import _warn_if_unsettled, pull_rate, settling_steps

    group = {"nu": 0.5, "kappa": 1.0, "lr": 0.01}
    assert pull_rate(group) == pytest.approx(0.02) and settling_steps(group) == pytest.approx(50)
    with pytest.warns(UserWarning, match=r"adds up to 0\.40 of its time constant.*calibrate "
                      r"over 4 epochs \(selection_calibration 4, selection_start after it\)"):
        _warn_if_unsettled(0.4, 0.4, calibration=2, start=5)
    with pytest.warns(UserWarning, match="pulls nothing"):
        _warn_if_unsettled(0.0, 0.0, calibration=2, start=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_unsettled(1.0, 1.0, calibration=2, start=5)
        run = train(_config(tmp_path, nu=1.0, selection_start=4, selection_calibration=2,
                            schedule="multistep", milestones=[1], epochs=3), model=WithProbes(),
                    quiet=True)
    assert run.epochs == 3


def test_threshold_rule_and_bad_settings() -> None:
    before, after = torch.tensor([0.0, 1.0]), torch.tensor([2.0, 1.5])
    assert start_thresholds(before, after, 3.5, 0.0) == pytest.approx(2.0 + 3.5 * 2.0)
    assert start_thresholds(before, after, 3.5, 100.0) == pytest.approx(100.0, rel=1e-6)
    with pytest.raises(ConfigError, match="invalid selection_start: 1 .*after the 1 calib"):
        load_config("digits", {"selection_start": 1})
    with pytest.raises(ConfigError, match="invalid selection_calibration: 0"):
        load_config("digits", {"selection_start": 4, "selection_calibration": 0})
    # Keys added later do not move the run directories of configs that leave them unset.
    assert load_config("digits").config_hash() == "064979"
