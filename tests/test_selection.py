"""``selection_start``: per-layer λ calibrated so that every layer starts selecting at one epoch."""

from __future__ import annotations

import json
import math
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
    # (W(0) is then most of every layer's V: the second warning, initialisation-driven, is
    # another test's subject.)
    with pytest.warns(UserWarning, match=r"adds up to 0\.00 of its time constant .*later than "
                      r"epoch 5: calibrate over 33 epochs"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "selection_start: the initial weights alone")
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
        # The probes never move, so their W(0) alone crosses: that warning is another test's.
        warnings.filterwarnings("ignore", "selection_start: the initial weights alone")
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


@pytest.mark.filterwarnings("ignore:selection_start:UserWarning")
def test_schedule_extrapolation_meets_the_start_under_a_decaying_lr(tmp_path: Path) -> None:
    """A strong pull (ν 5 at lr 0.1: W(0) fades over 50 steps, 2.3 of the digits' 22-step
    epochs) and a cosine schedule: V's growth slows after the calibration in two ways that a
    straight line misses. The schedule extrapolation is exact for the probes (no gradient), so
    they enter in the start epoch; the straight line sets λ too high and they enter late."""
    settings = {"nu": 5.0, "selection_start": 5, "selection_calibration": 2,
                "schedule": "cosine", "epochs": 8}
    entries = {}
    for rule in ("schedule", "linear"):
        run = train(_config(tmp_path / rule, selection_extrapolation=rule, **settings),
                    model=WithProbes(), quiet=True)
        entries[rule] = _first_entries(run.run_dir)
    assert entries["schedule"]["probe_small.weight"] == 5
    assert entries["schedule"]["probe_big.weight"] == 5
    for conv in ("net.conv1.weight", "net.conv2.weight", "net.conv3.weight"):
        assert entries["schedule"][conv] in (4, 5), entries  # trained: up to an epoch early
    for probe in ("probe_small.weight", "probe_big.weight"):
        assert entries["linear"][probe] == -1 or entries["linear"][probe] > 5


@pytest.mark.filterwarnings("ignore:selection_start. the pull:UserWarning")
def test_init_share_is_what_w0_alone_puts_into_v_by_the_end(tmp_path: Path) -> None:
    """``selection_init_share`` = o(T)·max‖W_g(0)‖ / λ_l. The probes get no gradient, so their
    λ is o(E − ½)·max‖W_g(0)‖ and their share o(T)/o(E − ½), summed here step by step at the
    cosine's lr: above 1, and the calibration names them (and only them). The trained
    convolutions' V has the data's part too (their W grows), so W(0) alone stays below their λ
    (0.71–0.91 of it); the straight line keeps no W(0) and reports no share."""
    from dessilbi.schedule import lr_multiplier
    from dessilbi.selection import pull_offset

    settings = {"nu": 5.0, "selection_start": 5, "selection_calibration": 2,
                "schedule": "cosine", "epochs": 8}
    config = _config(tmp_path / "schedule", **settings)
    with pytest.warns(UserWarning, match=r"initial weights alone carry 2 layer\(s\) over their "
                      r"lambda .*probe_\w+\.weight \(1\.\d\d\), probe_\w+\.weight"):
        run = train(config, model=WithProbes(), quiet=True)
    lines = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps, shares = lines[0]["step"], lines[1]["selection_init_share"]
    multiplier = lr_multiplier(config)
    lrs = [config.lr * multiplier(e) for e in range(config.epochs) for _ in range(steps)]
    at_end, _ = pull_offset(lrs, config.kappa, config.nu)
    at_start, _ = pull_offset(lrs[:round(4.5 * steps)], config.kappa, config.nu)
    for probe in ("probe_small.weight", "probe_big.weight"):
        assert shares[probe] == pytest.approx(at_end / at_start, rel=1e-5)
    assert at_end / at_start > 1.001
    for conv in ("net.conv1.weight", "net.conv2.weight", "net.conv3.weight"):
        assert 0.5 < shares[conv] < 1, shares
    line = train(_config(tmp_path / "linear", selection_extrapolation="linear", **settings),
                 model=WithProbes(), quiet=True).run_dir / "metrics.jsonl"
    assert "selection_init_share" not in json.loads(line.read_text().splitlines()[1])


def test_future_pull_sums_the_steps_it_stands_for() -> None:
    """The geometric series per epoch against the literal per-step sums (the oracle), over a
    cosine schedule and a target in the middle of an epoch."""
    from dessilbi.selection import _future_pull, pull_offset

    class Run:
        @staticmethod
        def lr_multiplier(epoch: int) -> float:
            return 0.5 * (1 + math.cos(math.pi * epoch / 10))

    group = {"initial_lr": 0.1, "lr": 0.07, "kappa": 2.0, "nu": 5.0}
    steps, state = 22, (0.7, 0.3)
    lrs = [0.1 * Run.lr_multiplier(e) for e in range(3, 7) for _ in range(steps)]
    lrs = lrs[: 3 * steps + steps // 2]  # epochs 4, 5, 6 and half of 7 (counted from 1)
    offset, _ = pull_offset(lrs, group["kappa"], group["nu"], state)
    got = _future_pull(group, Run(), 3, 6.5, steps, state)  # type: ignore[arg-type]
    assert got[0] == pytest.approx(offset - state[0], rel=1e-12)
    assert got[1] == pytest.approx(sum(lrs), rel=1e-12)


def test_pull_offset_is_the_initial_weights_part_of_v() -> None:
    """With no gradient, DessiLBI's V after t steps is exactly pull_offset's o(t)·W(0)."""
    from dessilbi.selection import pull_offset

    torch.manual_seed(0)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w0 = w.detach().clone()
    opt = DessiLBI([{"params": [w], "structure": "filter", "lam": 1e30}], lr=0.3, kappa=1.5,
                   nu=2.0, momentum=0.9)
    lrs = [0.3, 0.3, 0.1, 0.1, 0.05]
    for lr in lrs:
        opt.param_groups[0]["lr"] = lr
        w.grad = torch.zeros_like(w)
        opt.step()
    offset, left = pull_offset(lrs, 1.5, 2.0)
    torch.testing.assert_close(opt.state[w]["v"], offset * w0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(w.detach(), left * w0, rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore:selection_start:UserWarning")
def test_a_run_resumed_during_the_calibration_gets_the_same_lams(tmp_path: Path) -> None:
    settings = {"selection_start": 5, "selection_calibration": 3}
    whole = train(_config(tmp_path / "whole", **settings), model=WithProbes(), quiet=True)
    first = train(_config(tmp_path / "parts", epochs=2, **settings), model=WithProbes(),
                  quiet=True)
    resumed = train(_config(tmp_path / "parts", **settings), model=WithProbes(),
                    resume_dir=first.run_dir, quiet=True)
    lines = (resumed.run_dir / "metrics.jsonl").read_text().splitlines()
    lams = [json.loads(line).get("selection_lam") for line in lines]
    assert lams[2] is not None and lams[2] == _lams_at(whole.run_dir, 2)
    shares = json.loads(lines[2])["selection_init_share"]  # W(0) came through the checkpoint
    whole_line = json.loads((whole.run_dir / "metrics.jsonl").read_text().splitlines()[2])
    assert shares == whole_line["selection_init_share"] and len(shares) == len(lams[2])
    assert whole.model is not None and resumed.model is not None
    for (name, a), b in zip(whole.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def _lams_at(run_dir: Path, index: int) -> Any:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[index])["selection_lam"]


def test_checkpoints_of_other_calibrations_are_refused() -> None:
    from dessilbi.selection import StartEpochThresholds

    callback = StartEpochThresholds(5, 2)
    state = StartEpochThresholds(5, 2, "linear").state_dict()
    with pytest.raises(ValueError, match="with the linear extrapolation; resume it with the "):
        callback.load_state_dict(state)
    old = {"start": 5, "calibration": 2, "lams": {}, "before": {}, "seen_max": {}}
    with pytest.raises(ValueError, match="during the calibration by an earlier version"):
        StartEpochThresholds(5, 2, "linear").load_state_dict(old)
    StartEpochThresholds(5, 2, "linear").load_state_dict({**old, "lams": {"a": 1.0}})
    with pytest.raises(ValueError, match="selection_extrapolation 'straight'"):
        StartEpochThresholds(5, 2, "straight")
    with pytest.raises(ConfigError, match="invalid selection_extrapolation: 'cubic'"):
        load_config("digits", {"selection_extrapolation": "cubic"})


def test_equal_filter_norms_change_nothing_behind_a_batch_norm() -> None:
    """Behind a batch norm (training mode) the equalised filters compute the same; a conv with
    no batch norm after it computes something else (its filters were rescaled too)."""
    from dessilbi.models import equalize_filter_norms

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(5, 3, 9, 9)
    hidden, out = net[:3](x), net(x)
    norms = net[0].weight.detach().flatten(1).norm(dim=1)
    assert float(norms.max() / norms.min()) > 1.1  # the draw spreads them
    assert equalize_filter_norms(net) == 2
    after = net[0].weight.flatten(1).norm(dim=1)
    torch.testing.assert_close(after, torch.full_like(after, float(norms.square().mean().sqrt())))
    torch.testing.assert_close(net[:3](x), hidden, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(net(x), out, atol=1e-3)
    # Given inputs to check on, that network is refused and left as it was.
    torch.manual_seed(0)
    mixed = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    drawn = [p.detach().clone() for p in mixed.parameters()]
    with pytest.raises(ValueError, match=r"equal_filter_norms changes what Sequential computes"):
        equalize_filter_norms(mixed, x)
    assert all(torch.equal(a, b) for a, b in zip(mixed.parameters(), drawn, strict=True))
    bn_only = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    assert equalize_filter_norms(bn_only, x) == 1


def _bn_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 64, 10))


def test_a_run_with_equal_filter_norms_starts_from_them(tmp_path: Path) -> None:
    """``equal_filter_norms`` in the config: init.pt holds the equalised filters (the draw of
    the same seed, rescaled), and the saved config says so; a model whose convs do not all
    feed a batch norm (LeNet-style SmallCNN) is refused before anything is written."""
    settings = {"epochs": 1, "linear_structure": "none", "exclude": []}
    plain = train(_config(tmp_path / "plain", **settings), model=_bn_net(), quiet=True)
    equal = train(_config(tmp_path / "equal", equal_filter_norms=True, **settings),
                  model=_bn_net(), quiet=True)
    a = torch.load(plain.run_dir / "init.pt")["0.weight"].flatten(1)
    b = torch.load(equal.run_dir / "init.pt")["0.weight"].flatten(1)
    rms = a.norm(dim=1).square().mean().sqrt()
    torch.testing.assert_close(b.norm(dim=1), rms.expand(len(b)))
    torch.testing.assert_close(b, a * (rms / a.norm(dim=1))[:, None])
    assert load_config(equal.run_dir / "config.yaml").equal_filter_norms is True
    with pytest.raises(ConfigError, match="equal_filter_norms changes what SmallCNN computes"):
        train(_config(tmp_path / "refused", equal_filter_norms=True), quiet=True)
    assert not (tmp_path / "refused").exists()


def test_filter_norm_scale_changes_nothing_behind_a_batch_norm() -> None:
    """Every conv filter scaled: the same output behind a batch norm (up to its ε, 10⁻⁵ against
    a variance of about 10⁻² at Kaiming's scale × 0.1); refused where the output moves."""
    from dessilbi.models import scale_filter_norms

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4))
    for conv in (net[0], net[3]):
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    x = torch.randn(5, 3, 9, 9)
    before, out = net[0].weight.detach().clone(), net(x)
    assert scale_filter_norms(net, 0.1, x) == 2
    torch.testing.assert_close(net[0].weight.detach(), 0.1 * before)
    torch.testing.assert_close(net(x), out, rtol=1e-3, atol=1e-3)
    assert scale_filter_norms(net, 1.0, x) == 0
    # One conv without a batch norm after it is enough to refuse, and nothing is scaled then;
    # so is a scale at which the norms' epsilon matters.
    mixed = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1, bias=False))
    drawn = mixed[3].weight.detach().clone()
    with pytest.raises(ValueError, match=r"filter_norm_scale 0.5 changes what Sequential "
                       r"computes \(its output in training mode moved by 50\.0% of its size"):
        scale_filter_norms(mixed, 0.5, x)
    assert torch.equal(mixed[3].weight, drawn)
    with pytest.raises(ValueError, match="filter_norm_scale 0.001 changes what"):
        scale_filter_norms(net, 0.001, x)


def test_a_run_with_filter_norm_scale_starts_from_the_scaled_draw(tmp_path: Path) -> None:
    """init.pt holds the draw of the same seed times the scale (after equalising), the config
    records it; on a model without batch norm, and for a scale of 0, the run is refused before
    anything is written."""
    settings = {"epochs": 1, "linear_structure": "none", "exclude": []}
    plain = train(_config(tmp_path / "plain", **settings), model=_bn_net(), quiet=True)
    scaled = train(_config(tmp_path / "scaled", equal_filter_norms=True, filter_norm_scale=0.25,
                           **settings), model=_bn_net(), quiet=True)
    a = torch.load(plain.run_dir / "init.pt")
    b = torch.load(scaled.run_dir / "init.pt")
    rms = a["0.weight"].flatten(1).norm(dim=1).square().mean().sqrt()
    torch.testing.assert_close(b["0.weight"].flatten(1).norm(dim=1), 0.25 * rms.expand(4))
    torch.testing.assert_close(b["4.weight"], a["4.weight"])  # the linear layer as drawn
    assert load_config(scaled.run_dir / "config.yaml").filter_norm_scale == 0.25
    with pytest.raises(ConfigError, match="filter_norm_scale 0.5 changes what SmallCNN"):
        train(_config(tmp_path / "refused", filter_norm_scale=0.5), quiet=True)
    assert not (tmp_path / "refused").exists()
    for bad in (0.0, math.inf):
        with pytest.raises(ConfigError, match=f"invalid filter_norm_scale: {bad}"):
            load_config("digits", {"filter_norm_scale": bad})
    # Weights given by init_from are W(0) as they are: a warning, and init.pt holds them.
    with pytest.warns(UserWarning, match="equal_filter_norms and filter_norm_scale are not"):
        given = train(_config(tmp_path / "given", filter_norm_scale=0.25,
                              init_from=str(plain.run_dir / "init.pt"), **settings),
                      model=_bn_net(), quiet=True)
    assert torch.equal(torch.load(given.run_dir / "init.pt")["0.weight"], a["0.weight"])


def test_affine_norm_groups_start_selecting_in_the_chosen_epoch(tmp_path: Path) -> None:
    """``selection_start`` with ``norm_structure: affine``: one λ per batch norm (its scale and
    shift one tied group); no channel enters before the start epoch, most layers' first
    channels enter in it and the rest in the next, a scale always with its shift."""
    start = 4
    config = load_config("digits", {
        "model": "resnet20", "model_kwargs": {"widths": [4, 8, 8]}, "conv_structure": "none",
        "norm_structure": "affine", "norm_nu": 10, "linear_structure": "none", "epochs": 5,
        "selection_start": start, "selection_calibration": 2,
        "selection_extrapolation": "linear", "out": str(tmp_path)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the calibration's advice is another test's subject
        run_dir = train(config, quiet=True).run_dir
    entries = _first_entries(run_dir)
    assert len(entries) == 42 and set(entries.values()) <= {start, start + 1}
    assert sum(e == start for e in entries.values()) > len(entries) / 2
    record = load_path(run_dir / "path.pt")
    for name in record.names:
        if name.endswith(".bias"):
            assert torch.equal(record.entry_epoch(name),
                               record.entry_epoch(name.replace(".bias", ".weight")))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines[1]["selection_lam"]) == 21
