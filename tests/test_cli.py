"""The command line and the config files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dessilbi.config import ConfigError, TrainConfig, builtin_configs, load_config
from dessilbi.data import DATASET_NAMES
from dessilbi.models import available_models

EXPECTED_CONFIGS = {
    "digits", "mnist_lenet5", "mnist_lenet5_sparse", "cifar10_vgg16_bn", "cifar10_resnet20",
    "cifar10_resnet56", "imagenet_resnet18",
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
    assert "Invalid lam: -1.0" in invalid.stderr and "Traceback" not in invalid.stderr


def test_augmentation_keys_override_the_data_set_defaults() -> None:
    from dessilbi.data import dataset_info
    from dessilbi.train import _training_augment

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
