"""The training configuration: one typed dataclass that is the command line and the file format.

Values come, in increasing priority, from the defaults below, a YAML config file, and command-line
overrides. The resolved configuration is written into every run directory as ``config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "TrainConfig", "add_config_arguments", "builtin_configs", "load_config"]


#: Values of ``precision``: full float32, or torch.autocast to bfloat16 / float16.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
#: Values of the group threshold scalings (as in ``dessilbi.optim.GROUP_SCALINGS``).
GROUP_SCALING_NAMES: tuple[str, ...] = ("none", "sqrt_size")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the problem."""


def _opt(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


def _list_opt(default: list[Any], help: str) -> Any:
    return field(default_factory=lambda: list(default), metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything that defines a training run (see ``dessilbi train --help``)."""

    # data
    dataset: str = _opt("digits", "data set: digits, mnist, fashion_mnist, cifar10, cifar100, "
                        "cifar10_jpeg, imagefolder")
    data_dir: str | None = _opt(None, "data directory (null: $DESSILBI_DATA, else ./data)")
    download: bool = _opt(False, "download the official archives if missing (needs internet)")
    augment: bool = _opt(True, "use the data set's default training augmentation")
    normalize: bool = _opt(
        True, "normalise inputs with the data set's per-channel mean and std (false: pixels "
        "scaled to [0, 1] only, as the reference MNIST script did)"
    )
    crop_padding: int | None = _opt(
        None, "zero padding of the random training crop of in-memory data sets (default: the "
        "data set's: 4 for CIFAR, 0 for MNIST and digits; 0 turns cropping off)"
    )
    flip: bool | None = _opt(
        None, "random horizontal flips in training of in-memory data sets (default: the data "
        "set's: on for CIFAR, off for digits and MNIST)"
    )
    train_subset: int | None = _opt(
        None, "train on this many training images only, drawn at random with the run's seed "
        "(in-memory data sets; the test set stays whole): a smaller budget, stated in the config"
    )
    # model
    model: str = _opt("small_cnn", "model name (the registered models are listed in --help)")
    model_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "extra model arguments as JSON, e.g. '{\"widths\": [16, 32, 64]}'"},
    )
    init_from: str | None = _opt(
        None, "start from these weights instead of a fresh initialisation (another run's "
        "init.pt or model.pt, or a checkpoint)"
    )
    # optimizer
    optimizer: str = _opt("dessilbi", "dessilbi, sgd or adam")
    lr: float = _opt(0.1, "learning rate α")
    kappa: float = _opt(1.0, "DessiLBI damping κ")
    nu: float = _opt(100.0, "DessiLBI coupling ν (larger: sparser)")
    lam: float = _opt(1.0, "DessiLBI sparsity threshold λ")
    conv_lam: float | None = _opt(
        None, "λ of conv weights (default: lam); the reference CIFAR code uses another λ for "
        "convolutions than for linear layers"
    )
    linear_lam: float | None = _opt(None, "λ of linear weights (default: lam)")
    norm_lam: float | None = _opt(
        None, "λ of the coupled batch-norm groups, scales or scale-and-shift pairs (default: lam)"
    )
    norm_nu: float | None = _opt(
        None, "ν of the coupled batch-norm groups (default: nu); a smaller ν holds an unselected "
        "channel's scale (and shift) nearer Γ = 0, so that removing it changes less "
        "(docs/selection.md)"
    )
    selection_start: int | None = _opt(
        None, "instead of λ: the epoch during which every coupled layer's first groups enter; "
        "λ is then set per layer after the calibration epochs (dessilbi.selection)"
    )
    selection_calibration: int = _opt(
        1, "epochs measured, with nothing selectable, before selection_start sets λ"
    )
    selection_extrapolation: str = _opt(
        "schedule", "how selection_start extrapolates V from the calibration: schedule (the "
        "initial weights' part saturating, the data's part at the schedule's lr) or linear (a "
        "straight line through the norms); dessilbi.selection"
    )
    equal_filter_norms: bool = _opt(
        False, "start every conv filter at its layer's RMS filter norm (behind a batch norm the "
        "network computes the same; refused where it would not): V then holds the same initial "
        "offset for every filter of a layer, and the order of entry is the data's"
    )
    filter_norm_scale: float = _opt(
        1.0, "start every conv filter at this times its drawn norm (after equal_filter_norms; "
        "refused unless every conv feeds a batch norm, behind which the network computes the "
        "same; not applied to init_from weights): the pull leaves W(0)/kappa in V, so a smaller "
        "W(0) lets the data's part of V decide the entries sooner; dessilbi.selection"
    )
    momentum: float = _opt(0.9, "momentum")
    dampening: float = _opt(0.0, "momentum dampening")
    nesterov: bool = _opt(False, "Nesterov momentum")
    weight_decay: float = _opt(0.0, "weight decay of weights")
    norm_weight_decay: float = _opt(0.0, "weight decay of biases and normalisation parameters")
    conv_structure: str | None = _opt(
        "filter", "structure of conv weights: filter, tied (filters of layers joined by residual "
        "additions form one group, so whatever Gamma drops can be removed), channel, element "
        "or none")
    linear_structure: str | None = _opt("element", "structure of linear weights")
    norm_structure: str | None = _opt(
        None, "structure of the scales of normalisation layers (batch-norm gamma): element "
        "couples each channel's scale (its channel is then selected by it, as network slimming "
        "ranks channels), affine its scale and shift as one group (an unselected channel is "
        "pulled to zero output), or none")
    group_scaling: str = _opt("none", "group threshold scaling: none or sqrt_size")
    conv_group_scaling: str | None = _opt(
        None, "group threshold scaling of conv weights (default: group_scaling)"
    )
    linear_group_scaling: str | None = _opt(
        None, "group threshold scaling of linear weights (default: group_scaling)"
    )
    exclude: list[str] = _list_opt(
        [], "glob patterns of module or parameter names left uncoupled, comma-separated "
        "(conv1,conv2 or 'layer*.conv1')"
    )
    # schedule
    schedule: str = _opt("constant", "learning-rate schedule: constant, step, multistep, cosine")
    lr_step: int = _opt(30, "epochs between decays of the step schedule")
    milestones: list[int] = _list_opt(
        [], "epochs of the decays of the multistep schedule, comma-separated (80,120)"
    )
    lr_decay: float = _opt(0.1, "decay factor of the step and multistep schedules")
    schedule_epochs: int | None = _opt(
        None, "length of the cosine schedule in epochs (default: epochs); recorded in the "
        "run's config, so --resume --epochs N cannot silently change the lr curve"
    )
    # numerics
    precision: str = _opt(
        "fp32", "fp32, bf16 or fp16 (torch.autocast; fp16 with a gradient scaler whose "
        "skipped steps leave W, V and Gamma unchanged); optimizer state stays fp32"
    )
    channels_last: bool = _opt(False, "channels-last memory format for model and inputs")
    flush_denormal: bool = _opt(
        True, "flush subnormal floats to zero while training on CPU (the coupling drives "
        "unselected weights into the subnormal range, where CPU arithmetic is slow)"
    )
    # run
    epochs: int = _opt(30, "training epochs")
    batch_size: int = _opt(64, "global batch size (split across processes under torchrun)")
    eval_batch_size: int = _opt(1000, "batch size for evaluation")
    seed: int = _opt(0, "random seed (model init, data order, augmentation)")
    device: str = _opt("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...")
    threads: int | None = _opt(
        None, "torch intra-op threads while training (null: torch's default); a fixed count "
        "makes a CPU run's figures the same on machines with other core counts"
    )
    workers: int = _opt(4, "data-loading worker processes for on-disk data sets")
    out: str = _opt("runs", "parent directory of run directories")
    run_name: str | None = _opt(None, "run directory name (default: built from the config)")

    def __post_init__(self) -> None:
        for name in ("conv_structure", "linear_structure", "norm_structure"):
            if isinstance(getattr(self, name), str) and getattr(self, name).lower() == "none":
                setattr(self, name, None)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values that cannot work, naming the key."""
        checks = [
            ("optimizer", self.optimizer in ("dessilbi", "sgd", "adam"), "dessilbi, sgd or adam"),
            ("schedule", self.schedule in ("constant", "step", "multistep", "cosine"),
             "constant, step, multistep or cosine"),
            ("epochs", self.epochs >= 1, "at least 1"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("eval_batch_size", self.eval_batch_size >= 1, "at least 1"),
            ("lr", self.lr > 0, "> 0"),
            ("lr_step", self.lr_step >= 1, "at least 1"),
            ("workers", self.workers >= 0, ">= 0"),
            ("crop_padding", self.crop_padding is None or self.crop_padding >= 0,
             ">= 0, or null for the data set's default"),
            ("precision", self.precision in PRECISIONS, " or ".join(PRECISIONS)),
            ("conv_group_scaling", self.conv_group_scaling in (None, *GROUP_SCALING_NAMES),
             "none, sqrt_size, or null for group_scaling"),
            ("linear_group_scaling", self.linear_group_scaling in (None, *GROUP_SCALING_NAMES),
             "none, sqrt_size, or null for group_scaling"),
            ("schedule_epochs", self.schedule_epochs is None or self.schedule_epochs >= 1,
             "at least 1"),
            ("filter_norm_scale", math.isfinite(self.filter_norm_scale)
             and self.filter_norm_scale > 0, "a finite number > 0"),
            ("train_subset", self.train_subset is None or self.train_subset >= 1,
             "at least 1, or null for the whole training set"),
            *self._optimizer_checks(),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise ConfigError(f"invalid {key}: {getattr(self, key)!r} (expected {expected})")
        self._check_schedule_length()
        self._check_norm_options()

    def _optimizer_checks(self) -> list[tuple[str, bool, str]]:
        """The optimizer's hyperparameters, checked here so errors name the config key."""
        structures = ("filter", "channel", "element", None)
        return [
            ("conv_structure", self.conv_structure in (*structures, "tied"),
             "filter, tied, channel, element or none"),
            ("linear_structure", self.linear_structure in structures,
             "filter, channel, element or none"),
            ("norm_structure", self.norm_structure in ("element", "affine", None),
             "element, affine or none"),
            ("group_scaling", self.group_scaling in GROUP_SCALING_NAMES, "none or sqrt_size"),
            ("nu", self.nu > 0, "> 0"),
            ("kappa", self.kappa > 0, "> 0"),
            ("lam", self.lam >= 0, ">= 0"),
            ("conv_lam", self.conv_lam is None or self.conv_lam >= 0, ">= 0, or null for lam"),
            ("linear_lam", self.linear_lam is None or self.linear_lam >= 0,
             ">= 0, or null for lam"),
            ("norm_lam", self.norm_lam is None or self.norm_lam >= 0, ">= 0, or null for lam"),
            ("norm_nu", self.norm_nu is None or self.norm_nu > 0, "> 0, or null for nu"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("dampening", 0 <= self.dampening <= 1, "in [0, 1]"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("norm_weight_decay", self.norm_weight_decay >= 0, ">= 0"),
            ("nesterov", not self.nesterov or (self.momentum > 0 and self.dampening == 0),
             "Nesterov momentum needs momentum > 0 and dampening 0"),
            ("selection_calibration", self.selection_calibration >= 1, "at least 1"),
            ("selection_extrapolation", self.selection_extrapolation in ("schedule", "linear"),
             "schedule or linear"),
            ("selection_start", self.selection_start is None
             or self.selection_start > self.selection_calibration,
             f"an epoch after the {self.selection_calibration} calibration epoch(s), or null"),
            ("threads", self.threads is None or self.threads >= 1,
             "at least 1, or null for torch's default"),
        ]

    def _check_norm_options(self) -> None:
        """``norm_lam`` / ``norm_nu`` set the coupled norms' λ / ν: refused with none coupled
        (they would change the run's name and nothing else)."""
        if self.norm_structure is not None:
            return
        for key in ("norm_lam", "norm_nu"):
            if getattr(self, key) is not None:
                raise ConfigError(
                    f"invalid {key}: {getattr(self, key)!r} (it sets the coupled batch norms' "
                    f"{key.removeprefix('norm_')}; norm_structure is none: leave it unset, or "
                    "set norm_structure)")

    def _check_schedule_length(self) -> None:
        """The cosine schedule's length is fixed in the config: longer training is refused."""
        if self.schedule != "cosine":
            if self.schedule_epochs is not None:
                raise ConfigError(
                    f"invalid schedule_epochs: {self.schedule_epochs!r} (it sets the length of "
                    f"the cosine schedule; the {self.schedule} schedule has none: leave it unset)"
                )
            return
        if self.schedule_epochs is None:
            # Resolved here so that the saved config records the curve the run follows.
            self.schedule_epochs = self.epochs
        if self.epochs > self.schedule_epochs:
            raise ConfigError(
                f"invalid epochs: {self.epochs} exceed the cosine schedule's "
                f"schedule_epochs {self.schedule_epochs}, after which the lr would stay at 0. "
                "To train longer, start a new run with a longer schedule, or pass "
                f"--schedule-epochs {self.epochs} to stretch the rest of this run's cosine curve"
            )

    @property
    def default_run_name(self) -> str:
        """``<dataset>-<model>-<optimizer>[-nu<ν>]-seed<seed>-<hash>``: readable and unique.

        The hash (6 hex digits) covers every key that changes the run's numbers (``epochs``
        included), so runs that differ in anything that matters never share a directory;
        keys that only say where or how fast the run goes (``out``, ``device``, ``workers``,
        ``data_dir``, ...) leave it unchanged. A run is extended with ``--resume RUN --epochs N``.
        """
        parts = [self.dataset, self.model, self.optimizer]
        if self.optimizer == "dessilbi":
            parts.append(f"nu{self.nu:g}")
        parts.append(f"seed{self.seed}")
        parts.append(self.config_hash())
        return "-".join(parts)

    def run_directory_name(self, world_size: int = 1) -> str:
        """``run_name``, or the default name with ``-np<N>`` for a run of N > 1 processes."""
        if self.run_name:
            return self.run_name
        return self.default_run_name + (f"-np{world_size}" if world_size > 1 else "")

    def config_hash(self) -> str:
        """6 hex digits of a hash of every key that defines the run's numbers."""
        values = {k: v for k, v in self.to_dict().items() if k not in RUN_LOCATION_KEYS
                  and not (k in _LATER_KEYS and v == _LATER_KEYS[k])}
        blob = json.dumps(values, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:6]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

#: Keys that say where or how fast a run goes, not what it computes (left out of the hash).
RUN_LOCATION_KEYS = frozenset(
    {"data_dir", "download", "device", "workers", "out", "run_name", "eval_batch_size"}
)


#: Keys added after the first release, left out of the hash at their defaults, so that the run
#: directories of earlier configs keep their names (and the same command resumes them).
_LATER_KEYS: dict[str, Any] = {
    "selection_start": None, "selection_calibration": 1, "norm_structure": None, "norm_lam": None,
    "train_subset": None, "selection_extrapolation": "schedule", "equal_filter_norms": False,
    "filter_norm_scale": 1.0, "norm_nu": None,
}


def _coerce(key: str, value: Any) -> Any:
    """Convert a value from YAML or the command line to the type of field ``key``."""
    kind = str(_FIELDS[key].type)
    try:
        nullish = isinstance(value, str) and value.lower() in ("none", "null")
        if (value is None or nullish) and "None" in kind:
            return None
        if value is None:
            raise ValueError("null is not allowed here")
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("expected an integer")
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("list"):
            items = value if isinstance(value, list) else [
                v for v in str(value).split(",") if v.strip()
            ]
            cast = int if "int" in kind else str
            return [cast(v.strip() if isinstance(v, str) else v) for v in items]
        if kind.startswith("dict"):
            parsed = json.loads(value) if isinstance(value, str) else value
            if not isinstance(parsed, dict):
                raise ValueError("expected a mapping")
            return parsed
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid value for {key}: {value!r} ({exc})") from exc


def _check_keys(values: dict[str, Any], source: str) -> None:
    for key in values:
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, list(_FIELDS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}")


def builtin_configs() -> dict[str, Path]:
    """The experiment configs shipped with the package, by name (file stem)."""
    folder = resources.files("dessilbi") / "configs"
    return {
        Path(entry.name).stem: Path(str(entry))
        for entry in folder.iterdir()
        if entry.name.endswith((".yaml", ".yml"))
    }


def _resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = builtin_configs()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise ConfigError(
        f"config {name_or_path!r} is neither a file nor a shipped config "
        f"({', '.join(sorted(shipped))})"
    )


def load_config(
    config: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults, then the YAML file (a path or a shipped config's name), then ``overrides``."""
    values: dict[str, Any] = {}
    if config is not None:
        path = _resolve_config_path(str(config))
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(loaded)}")
        _check_keys(loaded, str(path))
        values.update({k: _coerce(k, v) for k, v in loaded.items()})
    if overrides:
        _check_keys(overrides, "the command line")
        values.update({k: _coerce(k, v) for k, v in overrides.items()})
    return TrainConfig(**values)


def _shown(value: Any) -> str:
    """A default as a user would type it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return json.dumps(value) if value else "none"
    return str(value)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--key`` option per config field, defaulting to "not given" (``SUPPRESS``)."""
    group = parser.add_argument_group(
        "config overrides (any config key)",
        "The defaults shown are the built-in ones; the --config file (digits when none is "
        "given) sets its own on top of them.",
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        help_text = f.metadata.get("help", "")
        if f.name == "model":
            from dessilbi.models import available_models

            help_text = "model name: " + ", ".join(available_models())
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if "default" not in help_text:  # some say already what an unset value means
            help_text += f" (default: {_shown(default)})"
        if kind.startswith("bool"):
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            metavar = f.name.upper().split("_")[-1]
            group.add_argument(
                flag, default=argparse.SUPPRESS, metavar=metavar, dest=f.name, help=help_text
            )
