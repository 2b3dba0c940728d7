"""Name -> constructor registry behind :func:`build_model`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .lenet import lenet5
from .mlp import mlp
from .resnet_cifar import resnet20, resnet32, resnet50_cifar, resnet56, resnet56_bottleneck
from .resnet_imagenet import resnet18, resnet50
from .small_cnn import small_cnn
from .vgg import vgg16, vgg16_bn


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its constructor and the input it was designed for.

    ``builder`` is called as ``builder(num_classes=..., in_channels=..., image_size=...,
    **kwargs)``. ``in_channels``/``image_size`` describe the *natural* input (the data set the
    architecture comes from); :func:`build_model` does not apply them implicitly.
    """

    builder: Callable[..., nn.Module]
    in_channels: int
    image_size: int
    description: str


_REGISTRY: dict[str, ModelSpec] = {
    "lenet5": ModelSpec(lenet5, 1, 28, "LeNet-5 from the DessiLBI MNIST script"),
    "mlp": ModelSpec(mlp, 1, 28, "fully connected net, hidden=(256, 128)"),
    "small_cnn": ModelSpec(small_cnn, 1, 8, "3-conv CNN for 8x8 scikit-learn digits"),
    "vgg16": ModelSpec(vgg16, 3, 32, "VGG-16 for CIFAR, single linear classifier"),
    "vgg16_bn": ModelSpec(vgg16_bn, 3, 32, "VGG-16 with BatchNorm for CIFAR"),
    "resnet20": ModelSpec(
        resnet20, 3, 32, "CIFAR ResNet-20: basic blocks, 3 per stage, option-B shortcuts"
    ),
    "resnet32": ModelSpec(
        resnet32, 3, 32, "CIFAR ResNet-32: basic blocks, 5 per stage, option-B shortcuts"
    ),
    "resnet56": ModelSpec(
        resnet56,
        3,
        32,
        "CIFAR ResNet-56: basic blocks, 9 per stage, option-B shortcuts, "
        "as in the DessiLBI pruning code",
    ),
    "resnet56_bottleneck": ModelSpec(
        resnet56_bottleneck,
        3,
        32,
        "CIFAR ResNet-56: bottleneck blocks, 6 per stage, stage outputs 64/128/256, "
        "as in the DessiLBI ticket code",
    ),
    "resnet50_cifar": ModelSpec(
        resnet50_cifar,
        3,
        32,
        "CIFAR ResNet-50: basic blocks, 8 per stage, option-B shortcuts, "
        "as in the DessiLBI lasso-ticket experiments (not the ImageNet resnet50)",
    ),
    "resnet18": ModelSpec(resnet18, 3, 224, "ImageNet ResNet-18 (basic blocks)"),
    "resnet50": ModelSpec(
        resnet50,
        3,
        224,
        "ImageNet ResNet-50: bottleneck blocks 3/4/6/3 (CIFAR basic-block one: resnet50_cifar)",
    ),
}


def available_models() -> list[str]:
    """Return the names accepted by :func:`build_model`, sorted alphabetically."""
    return sorted(_REGISTRY)


def _lookup(name: str) -> ModelSpec:
    """Return the spec for ``name`` (case-insensitive) or raise ``ValueError``."""
    key = name.strip().lower() if isinstance(name, str) else name
    spec = _REGISTRY.get(key)
    if spec is None:
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(available_models())}"
        )
    return spec


def natural_input_shape(name: str) -> tuple[int, int, int]:
    """Return the ``(channels, height, width)`` input the architecture ``name`` was designed for.

    E.g. ``(1, 28, 28)`` for ``"lenet5"`` (MNIST), ``(3, 32, 32)`` for the CIFAR models and
    ``(3, 224, 224)`` for ``"resnet18"``/``"resnet50"``. Pass ``in_channels`` and
    ``image_size`` accordingly to :func:`build_model` to get the textbook network.

    Raises:
        ValueError: if ``name`` is not a registered model.
    """
    spec = _lookup(name)
    return (spec.in_channels, spec.image_size, spec.image_size)


def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    **kwargs: Any,
) -> nn.Module:
    """Construct a freshly initialised model by name.

    Args:
        name: one of :func:`available_models` (case-insensitive).
        num_classes: size of the output layer.
        in_channels: channels of the input images.
        image_size: side length of the (square) input images. It sizes input-dependent
            layers (LeNet-5's ``fc1``, the MLP's first layer) and picks the stem of
            ``resnet18``/``resnet50`` (small-input stem when ``<= 64``).
        **kwargs: model-specific options, passed through to the constructor:
            ``widths`` (``vgg16``/``vgg16_bn``: 13 conv widths; ``resnet20/32/56`` and
            ``resnet50_cifar``: 3 stage widths; ``resnet56_bottleneck``: 3 stage planes, outputs
            4x; ``resnet18``/``resnet50``: 4 stage widths), ``small_input``
            (``resnet18``/``resnet50``), ``hidden`` (``mlp``). An option the model does not
            accept raises ``TypeError``.

    Note that the defaults (3 channels, 32x32) are CIFAR's: for the paper's LeNet-5 on MNIST
    call ``build_model("lenet5", in_channels=1, image_size=28)``; see
    :func:`natural_input_shape`.

    Weights are drawn from torch's global RNG, so ``torch.manual_seed(s)`` before the call
    makes the result reproducible.

    Raises:
        ValueError: for an unknown ``name`` (the message lists the available names) or
            invalid sizes/widths.
    """
    spec = _lookup(name)
    return spec.builder(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs
    )
