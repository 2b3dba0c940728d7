"""Model zoo: the architectures used in the DessiLBI experiments.

Use :func:`build_model` with a name from :func:`available_models`::

    from dessilbi.models import build_model

    net = build_model("lenet5", num_classes=10, in_channels=1, image_size=28)
    net = build_model("resnet56", num_classes=100)  # basic blocks (DessiLBI pruning code)
    net = build_model("resnet56_bottleneck")  # bottleneck blocks (DessiLBI ticket code)
    seed = build_model("vgg16_bn", widths=[16] * 13)  # narrow seed for network growing

All models are built from standard ``nn.Conv2d``/``nn.Linear``/``nn.BatchNorm2d`` modules with
``nn.ReLU`` modules as activations, so their weights can be found by module type (e.g. to put
them into DessiLBI parameter groups) and their structure can be pruned.
"""

from __future__ import annotations

from ._common import equalize_filter_norms, scale_filter_norms
from .blocks import BasicBlock, Bottleneck
from .lenet import LeNet5
from .mlp import MLP
from .registry import ModelSpec, available_models, build_model, natural_input_shape
from .resnet_cifar import CifarBottleneckResNet, CifarResNet
from .resnet_imagenet import ImageNetResNet
from .small_cnn import SmallCNN
from .vgg import VGG

__all__ = [
    "MLP",
    "VGG",
    "BasicBlock",
    "Bottleneck",
    "CifarBottleneckResNet",
    "CifarResNet",
    "ImageNetResNet",
    "LeNet5",
    "ModelSpec",
    "SmallCNN",
    "available_models",
    "build_model",
    "equalize_filter_norms",
    "scale_filter_norms",
    "natural_input_shape",
]
