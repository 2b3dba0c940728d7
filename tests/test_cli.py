"""The command line and the config files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dessilbi.config import ConfigError, TrainConfig, builtin_configs, load_config
from dessilbi.data import DATASET_NAMES
from dessilbi.models import available_models

EXPECTED_CONFIGS = {
    "digits", "mnist_lenet5", "mnist_lenet5_sparse", "cifar10_vgg16_bn", "cifar10_resnet20",
    "cifar10_resnet56", "imagenet_resnet18", "cifar10_resnet56_ticket_group",
    "cifar10_vgg16_bn_ticket_group", "cifar10_resnet50_ticket_lasso",
    "cifar10_vgg16_bn_ticket_lasso", "mnist_lenet5_figure1", "cifar10_resnet20_selective",
    "cifar10_vgg16_bn_selective", "mnist_lenet5_selective",
}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dessilbi", *args],
        capture_output=True, text=True, timeout=300, check=False,
    )


def test_help_texts_are_useful_on_their_own() -> None:
    top = _cli("--help")
    assert top.returncode == 0
    assert "train" in top.stdout and "torchrun" in top.stdout and "--resume" in top.stdout
    sub = _cli("train", "--help")
    assert sub.returncode == 0
    for option in ("--config", "--resume", "--data-dir", "--out", "--epochs", "--seed", "--nu",
                   "--kappa", "--lam", "--nesterov", "--weight-decay", "--schedule",
                   "--conv-structure", "--quiet", "--device"):
        assert option in sub.stdout, option
    for name in EXPECTED_CONFIGS:
        assert name in sub.stdout


@pytest.mark.parametrize("name", sorted(EXPECTED_CONFIGS))
def test_every_shipped_config_loads_and_names_known_parts(name: str) -> None:
    assert set(builtin_configs()) == EXPECTED_CONFIGS
    config = load_config(name)
    assert config.dataset in DATASET_NAMES
    assert config.model in available_models()
    assert config.optimizer == "dessilbi"


def test_paper_settings_of_the_mnist_config() -> None:
    config = load_config("mnist_lenet5")
    assert (config.kappa, config.nu, config.lr, config.momentum) == (1.0, 20.0, 0.1, 0.9)
    assert (config.schedule, config.lr_step, config.lr_decay) == ("step", 20, 0.1)
    assert (config.epochs, config.batch_size) == (60, 128)


# (model, conv structure, conv λ, conv scaling, linear λ, ν) of the reference ticket runs.
REFERENCE_RUNS = {
    "cifar10_resnet56_ticket_group": ("resnet56_bottleneck", "filter", 0.1, "sqrt_size", 1.0, 100),
    "cifar10_vgg16_bn_ticket_group": ("vgg16_bn", "filter", 0.05, "sqrt_size", 1.0, 100),
    "cifar10_resnet50_ticket_lasso": ("resnet50_cifar", "element", 0.05, "none", 0.05, 500),
    "cifar10_vgg16_bn_ticket_lasso": ("vgg16_bn", "element", 0.03, "none", 0.03, 200),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_RUNS))
def test_reference_ticket_configs_build_the_reference_optimizer(name: str) -> None:
    from dessilbi.models import build_model
    from dessilbi.train import build_optimizer

    model_name, conv, conv_lam, scaling, linear_lam, nu = REFERENCE_RUNS[name]
    config = load_config(name)
    assert "Reproduces the reference code" in builtin_configs()[name].read_text()
    assert (config.model, config.nu, config.lr, config.batch_size) == (model_name, nu, 0.1, 64)
    assert (config.nesterov, config.momentum, config.weight_decay) == (True, 0.9, 1e-4)
    assert (config.schedule, config.epochs) == ("constant", 200)
    model = build_model(config.model, num_classes=10)
    groups = build_optimizer(config, model).param_groups
    convs = [g for g in groups if g["structure"] == conv and g["params"][0].dim() == 4]
    linears = [g for g in groups if g["structure"] == "element" and g["params"][0].dim() == 2]
    assert len(convs) == len(linears) == 1
    assert (convs[0]["lam"], convs[0]["group_scaling"]) == (conv_lam, scaling)
    assert (linears[0]["lam"], linears[0]["group_scaling"]) == (linear_lam, "none")
    coupled = sum(p.numel() for g in convs + linears for p in g["params"])
    weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() > 1)
    assert coupled == weights  # every conv and linear weight


def test_vgg_selective_config_couples_each_channels_scale_and_shift_only() -> None:
    from torch import nn

    from dessilbi.models import build_model
    from dessilbi.path import coupled_tensors
    from dessilbi.train import build_optimizer

    config = load_config("cifar10_vgg16_bn_selective")
    model = build_model(config.model, num_classes=10)
    optimizer = build_optimizer(config, model)
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    coupled = {t.name: t.structure for t in coupled_tensors(model, optimizer)}
    assert len(norms) == 13
    assert coupled == {f"{n}.{p}": "tied" for n in norms for p in ("weight", "bias")}
    nus = {g["nu"] for g in optimizer.param_groups if g.get("structure")}
    assert nus == {20.0}
    assert (config.selection_start, config.selection_calibration) == (4, 2)
    assert (config.selection_extrapolation, config.batch_size, config.lr) == ("schedule", 32, 0.05)


def test_mnist_config_scales_pixels_to_unit_range_only_as_the_paper() -> None:
    from dessilbi.batches import input_normalization, training_augment
    from dessilbi.data import dataset_info

    config, info = load_config("mnist_lenet5"), dataset_info("mnist")
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    for transform in (training_augment(config, info, lazy=False),
                      input_normalization(config, info)):
        assert transform(pixels).flatten().tolist() == pytest.approx([0.0, 0.2, 1.0])
    normalised = input_normalization(load_config("mnist_lenet5", {"normalize": True}), info)
    assert normalised(pixels).flatten()[0] < 0


def test_sparse_mnist_config_couples_only_conv3() -> None:
    from dessilbi.models import build_model
    from dessilbi.path import coupled_tensors
    from dessilbi.train import build_optimizer

    config = load_config("mnist_lenet5_sparse")
    model = build_model(config.model, num_classes=10, in_channels=1, image_size=28)
    optimizer = build_optimizer(config, model)
    coupled = coupled_tensors(model, optimizer)
    assert [(t.name, t.structure) for t in coupled] == [("conv3.weight", "filter")]
    assert (config.nu, config.lam, config.lr, config.momentum) == (0.5, 8.0, 0.01, 0.9)
    assert (config.epochs, config.lr_step) == (60, 20)


def test_overrides_beat_the_file_which_beats_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("nu: 30\nepochs: 4\nexclude: [fc*]\nlinear_structure: none\n")
    config = load_config(path, {"nu": "7", "milestones": "3,5", "nesterov": "true"})
    assert config.nu == 7.0 and config.epochs == 4
    assert config.milestones == [3, 5] and config.nesterov is True
    assert config.exclude == ["fc*"] and config.linear_structure is None
    assert config.lr == TrainConfig().lr


def test_bad_config_values_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown config key 'nuu'.*did you mean 'nu'"):
        load_config(None, {"nuu": 3})
    with pytest.raises(ConfigError, match="invalid value for epochs: 'x'"):
        load_config(None, {"epochs": "x"})
    with pytest.raises(ConfigError, match="invalid optimizer: 'rmsprop'"):
        load_config(None, {"optimizer": "rmsprop"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("nu: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="neither a file nor a shipped config"):
        load_config("no_such_config")


def test_cli_reports_bad_input_without_a_traceback(tmp_path: Path) -> None:
    result = _cli("train", "--nu", "abc", "--out", str(tmp_path))
    assert result.returncode == 1
    assert "invalid value for nu: 'abc'" in result.stderr and "Traceback" not in result.stderr

    missing = _cli("train", "--config", "mnist_lenet5", "--data-dir", str(tmp_path / "none"),
                   "--out", str(tmp_path))
    assert missing.returncode == 1
    assert "train-images-idx3-ubyte" in missing.stderr and "Traceback" not in missing.stderr
    assert not any((tmp_path).glob("mnist-*/checkpoint.pt"))

    invalid = _cli("train", "--lam", "-1", "--epochs", "1", "--out", str(tmp_path))
    assert invalid.returncode == 1
    assert "invalid lam: -1.0 (expected >= 0)" in invalid.stderr
    assert "Traceback" not in invalid.stderr


def test_augmentation_keys_override_the_data_set_defaults() -> None:
    from dessilbi.batches import training_augment
    from dessilbi.data import dataset_info

    def _training_augment(config: TrainConfig, info: object) -> object:
        return training_augment(config, info, lazy=False)  # type: ignore[arg-type]

    mnist, cifar = dataset_info("mnist"), dataset_info("cifar10")
    default = _training_augment(load_config(None, {"dataset": "mnist"}), mnist)
    assert (default.crop_padding, default.flip) == (0, False)
    shifted = _training_augment(load_config(None, {"crop_padding": "2"}), mnist)
    assert (shifted.crop_padding, shifted.flip) == (2, False)
    assert _training_augment(load_config(None, {}), cifar).crop_padding == 4
    no_flip = _training_augment(load_config(None, {"flip": "false"}), cifar)
    assert (no_flip.crop_padding, no_flip.flip) == (4, False)
    off = _training_augment(load_config(None, {"augment": False, "crop_padding": 2}), mnist)
    assert not off.augments
    with pytest.raises(ConfigError, match="invalid crop_padding: -1"):
        load_config(None, {"crop_padding": -1})
