"""Tests for the model zoo (``dessilbi.models``).

Parameter counts are checked against closed-form formulas written out here from the
architecture descriptions, independently of the model code.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dessilbi.models import (
    VGG,
    BasicBlock,
    Bottleneck,
    CifarBottleneckResNet,
    CifarResNet,
    ImageNetResNet,
    LeNet5,
    available_models,
    build_model,
    natural_input_shape,
)

EXPECTED_NAMES = {
    "lenet5",
    "mlp",
    "small_cnn",
    "vgg16",
    "vgg16_bn",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet56_bottleneck",
    "resnet50_cifar",
    "resnet18",
    "resnet50",
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(k: int, c_in: int, c_out: int, bias: bool = False) -> int:
    """Parameters of a k x k convolution."""
    return k * k * c_in * c_out + (c_out if bias else 0)


def bn(c: int) -> int:
    """Parameters of a BatchNorm2d (weight and bias)."""
    return 2 * c


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def cifar_resnet_formula(depth: int, widths: tuple[int, int, int], num_classes: int) -> int:
    """Parameter count of a CIFAR ResNet-(6n+2) with option-B (1x1 conv + BN) projections."""
    n = (depth - 2) // 6
    total = conv(3, 3, widths[0]) + bn(widths[0])  # stem
    c_in = widths[0]
    for w in widths:
        for _ in range(n):
            total += conv(3, c_in, w) + bn(w) + conv(3, w, w) + bn(w)
            if c_in != w:  # projection shortcut where the channel count (and size) changes
                total += conv(1, c_in, w) + bn(w)
            c_in = w
    return total + linear(widths[-1], num_classes)


def cifar_bottleneck_resnet_formula(
    depth: int, widths: tuple[int, int, int], num_classes: int
) -> int:
    """Parameter count of a CIFAR ResNet-(9n+2) of bottleneck blocks (1x1, 3x3, 1x1 x4)."""
    n = (depth - 2) // 9
    total = conv(3, 3, widths[0]) + bn(widths[0])  # stem
    c_in = widths[0]
    for w in widths:
        for _ in range(n):
            total += conv(1, c_in, w) + bn(w) + conv(3, w, w) + bn(w) + conv(1, w, 4 * w)
            total += bn(4 * w)
            if c_in != 4 * w:  # projection in each stage's first block (stage 1: 16 -> 64)
                total += conv(1, c_in, 4 * w) + bn(4 * w)
            c_in = 4 * w
    return total + linear(4 * widths[-1], num_classes)


def conv_out_channels(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


# --- registry ---------------------------------------------------------------------------------


def test_available_models_lists_exactly_the_zoo() -> None:
    names = available_models()
    assert set(names) == EXPECTED_NAMES
    assert names == sorted(names)


@pytest.mark.parametrize("name", ["resnet", "lenet", "vgg19", ""])
def test_unknown_name_raises_value_error_listing_available(name: str) -> None:
    with pytest.raises(ValueError, match="unknown model") as info:
        build_model(name)
    for known in EXPECTED_NAMES:
        assert known in str(info.value)
    with pytest.raises(ValueError):
        natural_input_shape(name)


def test_name_lookup_is_case_insensitive() -> None:
    assert isinstance(build_model("LeNet5", in_channels=1, image_size=28), LeNet5)


def test_unsupported_kwarg_raises_type_error() -> None:
    with pytest.raises(TypeError):
        build_model("lenet5", in_channels=1, image_size=28, widths=[6, 16, 120])


@pytest.mark.parametrize("name", available_models())
def test_output_shape_at_natural_input(name: str) -> None:
    c, h, w = natural_input_shape(name)
    num_classes = 7  # not 10, so a hard-coded head size would be caught
    torch.manual_seed(0)
    model = build_model(name, num_classes=num_classes, in_channels=c, image_size=h)
    with torch.no_grad():
        out = model(torch.randn(2, c, h, w))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", available_models())
def test_only_standard_parameterised_modules(name: str) -> None:
    """Every parameter lives in a Conv2d, Linear or BatchNorm2d, and activations are modules."""
    c, h, _ = natural_input_shape(name)
    model = build_model(name, in_channels=c, image_size=h)
    owners = {
        type(m) for m in model.modules() if next(m.parameters(recurse=False), None) is not None
    }
    assert owners <= {nn.Conv2d, nn.Linear, nn.BatchNorm2d}
    assert any(isinstance(m, nn.ReLU) for m in model.modules())


def test_available_models_lists_the_dessilbi_cifar_resnets() -> None:
    names = available_models()
    for name in ("resnet56", "resnet56_bottleneck", "resnet50_cifar", "resnet50"):
        assert name in names
        assert natural_input_shape(name) == ((3, 224, 224) if name == "resnet50" else (3, 32, 32))


def test_resnet_descriptions_are_unambiguous() -> None:
    from dessilbi.models.registry import _REGISTRY

    assert "basic blocks" in _REGISTRY["resnet56"].description
    assert "pruning code" in _REGISTRY["resnet56"].description
    assert "bottleneck blocks" in _REGISTRY["resnet56_bottleneck"].description
    assert "ticket code" in _REGISTRY["resnet56_bottleneck"].description
    assert "basic blocks" in _REGISTRY["resnet50_cifar"].description
    assert "ImageNet" in _REGISTRY["resnet50"].description


def test_natural_input_shapes() -> None:
    assert natural_input_shape("lenet5") == (1, 28, 28)
    assert natural_input_shape("small_cnn") == (1, 8, 8)
    assert natural_input_shape("resnet56") == (3, 32, 32)
    assert natural_input_shape("resnet50") == (3, 224, 224)


# --- parameter counts -------------------------------------------------------------------------


def test_lenet5_exact_parameter_count() -> None:
    formula = (
        conv(5, 1, 6, bias=True)  # conv1: 156
        + conv(5, 6, 16, bias=True)  # conv2: 2,416
        + conv(5, 16, 120, bias=True)  # conv3: 48,120
        + linear(120, 84)  # fc1: 10,164
        + linear(84, 10)  # fc2: 850
    )
    assert formula == 61_706
    model = build_model("lenet5", num_classes=10, in_channels=1, image_size=28)
    assert n_params(model) == formula


def test_lenet5_layer_names_and_shapes() -> None:
    model = build_model("lenet5", in_channels=1, image_size=28)
    assert isinstance(model, LeNet5)
    assert (model.conv1.out_channels, model.conv1.padding) == (6, (2, 2))
    assert model.conv2.out_channels == 16
    assert model.conv3.out_channels == 120
    assert model.conv3.kernel_size == (5, 5)
    assert (model.fc1.in_features, model.fc1.out_features) == (120, 84)
    assert model.fc2.out_features == 10


def test_resnet20_exact_parameter_count() -> None:
    formula = cifar_resnet_formula(20, (16, 32, 64), 10)
    # Option A (parameter-free shortcuts) would give the paper's 269,722; the two option-B
    # projections add 16*32 + 2*32 + 32*64 + 2*64 = 2,752.
    assert formula == 269_722 + 2_752
    assert n_params(build_model("resnet20")) == formula


@pytest.mark.parametrize("depth", [32, 56])
def test_deeper_cifar_resnets_match_formula(depth: int) -> None:
    model = build_model(f"resnet{depth}", num_classes=100)
    assert n_params(model) == cifar_resnet_formula(depth, (16, 32, 64), 100)


def test_resnet56_bottleneck_exact_parameter_count() -> None:
    formula = cifar_bottleneck_resnet_formula(56, (16, 32, 64), 10)
    # Hand total: stem 464 + stages 27,648 / 113,152 / 447,488 + fc 2,570.
    assert formula == 591_322
    model = build_model("resnet56_bottleneck")
    assert isinstance(model, CifarBottleneckResNet)
    assert n_params(model) == formula
    model100 = build_model("resnet56_bottleneck", num_classes=100)
    assert n_params(model100) == cifar_bottleneck_resnet_formula(56, (16, 32, 64), 100)


def test_resnet50_cifar_exact_parameter_count() -> None:
    formula = cifar_resnet_formula(50, (16, 32, 64), 10)
    assert formula == 758_554
    model = build_model("resnet50_cifar")
    assert isinstance(model, CifarResNet)
    assert n_params(model) == formula


@pytest.mark.parametrize("name", ["resnet56_bottleneck", "resnet50_cifar"])
def test_dessilbi_cifar_resnets_output_shape(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "kwargs", "expected", "tolerance"),
    [
        ("vgg16", {}, 14.7e6, 0.2e6),
        ("vgg16_bn", {}, 14.7e6, 0.2e6),
        ("resnet56", {}, 0.85e6, 0.02e6),
        ("resnet18", {"num_classes": 1000, "image_size": 224}, 11.69e6, 0.05e6),
        ("resnet50", {"num_classes": 1000, "image_size": 224}, 25.56e6, 0.05e6),
    ],
)
def test_parameter_count_ranges(
    name: str, kwargs: dict[str, int], expected: float, tolerance: float
) -> None:
    assert abs(n_params(build_model(name, **kwargs)) - expected) <= tolerance


def test_vgg16_bn_has_batchnorm_and_no_conv_bias() -> None:
    plain, with_bn = build_model("vgg16"), build_model("vgg16_bn")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) == 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules()) == 13
    convs = [m for m in with_bn.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.bias is None for m in convs)
    # BN adds 2 parameters per channel and removes the conv bias (1 per channel).
    assert n_params(with_bn) - n_params(plain) == sum(m.out_channels for m in convs)


def test_mlp_hidden_sizes_and_count() -> None:
    model = build_model("mlp", num_classes=5, in_channels=1, image_size=8, hidden=(32, 16, 8))
    widths = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    assert widths == [32, 16, 8, 5]
    assert n_params(model) == linear(64, 32) + linear(32, 16) + linear(16, 8) + linear(8, 5)
    assert build_model("mlp", hidden=()).layers.fc1.in_features == 3 * 32 * 32


# --- widths (network growing) -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn"])
def test_vgg_widths_override(name: str) -> None:
    widths = [4, 4, 8, 8, 12, 12, 12, 16, 16, 16, 20, 20, 20]
    model = build_model(name, num_classes=3, widths=widths)
    assert isinstance(model, VGG)
    assert conv_out_channels(model) == widths
    assert model.classifier.in_features == 20
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError):
        build_model(name, widths=widths[:-1])


def test_cifar_resnet_widths_override() -> None:
    model = build_model("resnet20", widths=(8, 12, 20))
    assert isinstance(model, CifarResNet)
    assert model.conv1.out_channels == 8
    for stage, width in zip((model.layer1, model.layer2, model.layer3), (8, 12, 20), strict=True):
        for block in stage:
            assert isinstance(block, BasicBlock)
            assert block.conv1.out_channels == width
            assert block.conv2.out_channels == width
    assert model.fc.in_features == 20
    assert n_params(model) == cifar_resnet_formula(20, (8, 12, 20), 10)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError):
        build_model("resnet56", widths=(16, 32))
    with pytest.raises(ValueError):
        build_model("resnet56", widths=(16, 0, 64))


def test_cifar_bottleneck_resnet_widths_override() -> None:
    model = build_model("resnet56_bottleneck", num_classes=3, widths=(8, 12, 20))
    assert isinstance(model, CifarBottleneckResNet)
    assert model.widths == [8, 12, 20]
    assert model.conv1.out_channels == 8
    for stage, width in zip((model.layer1, model.layer2, model.layer3), (8, 12, 20), strict=True):
        for block in stage:
            assert isinstance(block, Bottleneck)
            assert block.conv2.out_channels == width
            assert block.conv3.out_channels == 4 * width
    assert model.fc.in_features == 80
    assert n_params(model) == cifar_bottleneck_resnet_formula(56, (8, 12, 20), 3)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError):
        build_model("resnet56_bottleneck", widths=(16, 32))


def test_imagenet_resnet_widths_override() -> None:
    model = build_model("resnet50", widths=(8, 16, 24, 32))
    assert isinstance(model, ImageNetResNet)
    assert model.layer4[0].conv2.out_channels == 32
    assert model.fc.in_features == 4 * 32


# --- residual structure -----------------------------------------------------------------------


def test_resnet_blocks_have_pruning_friendly_attributes() -> None:
    model = build_model("resnet20")
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    for block in blocks:
        for attr in ("conv1", "bn1", "conv2", "bn2", "shortcut"):
            assert hasattr(block, attr)
    # Option B: exactly the first blocks of stages 2 and 3 project, with 1x1 stride-2 convs.
    projections = [b.shortcut for b in blocks if len(b.shortcut) > 0]
    assert len(projections) == 2
    for proj in projections:
        assert isinstance(proj[0], nn.Conv2d) and isinstance(proj[1], nn.BatchNorm2d)
        assert proj[0].kernel_size == (1, 1) and proj[0].stride == (2, 2)


def test_resnet56_bottleneck_structure() -> None:
    model = build_model("resnet56_bottleneck")
    assert isinstance(model, CifarBottleneckResNet)
    assert (model.depth, model.blocks_per_stage, model.widths) == (56, 6, [16, 32, 64])
    assert model.conv1.kernel_size == (3, 3) and model.conv1.out_channels == 16
    stages = (model.layer1, model.layer2, model.layer3)
    for stage, planes, stride in zip(stages, (16, 32, 64), (1, 2, 2), strict=True):
        assert len(stage) == 6
        assert all(isinstance(block, Bottleneck) for block in stage)
        first = stage[0]
        # The stride sits on the 3x3 conv; the first block of every stage projects.
        assert first.conv1.stride == (1, 1) and first.conv2.stride == (stride, stride)
        assert first.conv3.out_channels == 4 * planes
        proj = first.shortcut
        assert isinstance(proj[0], nn.Conv2d) and isinstance(proj[1], nn.BatchNorm2d)
        assert proj[0].kernel_size == (1, 1) and proj[0].stride == (stride, stride)
        assert all(len(block.shortcut) == 0 for block in stage[1:])
    assert sum(isinstance(m, Bottleneck) for m in model.modules()) == 18
    # Depth counts the stem, 3 convs per block and the classifier, not the 3 projections.
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert n_convs - 3 + 1 == 56
    assert model.fc.in_features == 256


def test_resnet50_cifar_structure() -> None:
    model = build_model("resnet50_cifar")
    assert isinstance(model, CifarResNet) and not isinstance(model, ImageNetResNet)
    assert (model.depth, model.blocks_per_stage) == (50, 8)
    for stage in (model.layer1, model.layer2, model.layer3):
        assert len(stage) == 8
        assert all(isinstance(block, BasicBlock) for block in stage)
    assert model.fc.in_features == 64
    assert build_model("resnet56").blocks_per_stage == 9


@pytest.mark.parametrize("depth", [0, 2, 10, 12, 50, 55, 57, 164.0, True])
def test_bottleneck_depth_must_be_9n_plus_2(depth: int) -> None:
    with pytest.raises(ValueError, match="9n\\+2|integer"):
        CifarBottleneckResNet(depth)


@pytest.mark.parametrize("depth", [0, 2, 11, 29, 55, 56.0])
def test_basic_depth_must_be_6n_plus_2(depth: int) -> None:
    with pytest.raises(ValueError, match="6n\\+2|integer"):
        CifarResNet(depth)


def test_smallest_bottleneck_depth_builds() -> None:
    model = CifarBottleneckResNet(11, num_classes=4, image_size=8)
    assert model.blocks_per_stage == 1
    with torch.no_grad():
        assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_identity_shortcut_adds_input() -> None:
    """With conv2's output zeroed, a basic block with identity shortcut computes relu(x)."""
    block = BasicBlock(4, 4).eval()
    nn.init.zeros_(block.bn2.weight)  # bn2 output == bn2 bias == 0 in eval mode
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert torch.equal(block(x), torch.relu(x))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_small_input_stem_default(name: str) -> None:
    small = build_model(name, image_size=32)
    big = build_model(name, image_size=224)
    assert isinstance(small, ImageNetResNet) and isinstance(big, ImageNetResNet)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2)
    assert isinstance(big.maxpool, nn.MaxPool2d)
    forced = build_model(name, image_size=64, small_input=False)
    assert forced.conv1.kernel_size == (7, 7)
    # Only the stem differs: 7x7 vs 3x3 kernels over 3 input channels and 64 filters.
    assert n_params(big) - n_params(small) == conv(7, 3, 64) - conv(3, 3, 64)
    with torch.no_grad():
        assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("size", [8, 28, 32])
def test_small_cnn_handles_several_input_sizes(size: int) -> None:
    model = build_model("small_cnn", num_classes=10, in_channels=1, image_size=size)
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)


def test_lenet5_rejects_too_small_input() -> None:
    with pytest.raises(ValueError):
        build_model("lenet5", in_channels=1, image_size=20)


# --- initialisation and determinism -----------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["lenet5", "vgg16_bn", "resnet20", "resnet56_bottleneck", "small_cnn", "mlp"]
)
def test_same_seed_gives_identical_weights(name: str) -> None:
    c, h, _ = natural_input_shape(name)
    torch.manual_seed(123)
    a = build_model(name, in_channels=c, image_size=h).state_dict()
    torch.manual_seed(123)
    b = build_model(name, in_channels=c, image_size=h).state_dict()
    torch.manual_seed(124)
    other = build_model(name, in_channels=c, image_size=h).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], other[k]) for k in a if a[k].is_floating_point())


def test_conv_init_is_kaiming_normal_and_bn_is_identity() -> None:
    torch.manual_seed(0)
    model = build_model("vgg16_bn")
    last_conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    fan_in = 512 * 3 * 3
    # ~2.4M samples: the empirical std is within a fraction of a percent of the target.
    assert last_conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.01)
    assert abs(last_conv.weight.mean().item()) < 1e-3
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_lenet5_keeps_pytorch_default_init_as_the_paper_script() -> None:
    """LeNet-5 conv weights are U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default), not Kaiming
    normal: DessiLBI's filter entry times depend on the initial weight norms."""
    torch.manual_seed(0)
    model = build_model("lenet5", in_channels=1, image_size=28)
    weight = model.conv3.weight
    bound = 1 / math.sqrt(16 * 5 * 5)
    assert weight.abs().max().item() <= bound
    # A uniform on [-b, b] has std b / sqrt(3); Kaiming normal would have sqrt(2 / 400) ≈ 2.4x it.
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
