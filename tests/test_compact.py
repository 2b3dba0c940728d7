"""dessilbi.compact: pruned filters removed physically (torch-pruning), outputs and optimizer
state carried over."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dessilbi import DessiLBI, structured_param_groups
from dessilbi.masks import apply_masks
from dessilbi.models import build_model
from dessilbi.subnet import compact, zero_pruned_filters


class InvertedResidual(nn.Module):
    """A MobileNetV2-style block: 1x1 expand -> BN -> ReLU6 -> 3x3 depthwise -> BN -> ReLU6 ->
    1x1 project -> BN, plus the identity; then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.expand = nn.Sequential(nn.Conv2d(8, 24, 1, bias=False), nn.BatchNorm2d(24),
                                    nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False),
                                       nn.BatchNorm2d(24), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.depthwise(self.expand(x)))
        return self.head(x.mean((2, 3)))


def randomise(model: nn.Module, seed: int = 0) -> None:
    """Trained-looking batch norms (statistics and affine parameters)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.copy_(torch.randn(m.num_features, generator=gen))


def random_keep(model: nn.Module, ratio: float, seed: int,
                skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        if p.dim() == 4 and name not in skip:
            keep = torch.rand(p.shape[0], generator=gen) < ratio
            keep[0] = True  # no layer loses every filter
            out[name] = keep
    return out


MODELS = {
    "lenet5": (lambda: build_model("lenet5", num_classes=10, in_channels=1, image_size=28),
               (1, 28, 28)),
    "vgg16_bn": (lambda: build_model("vgg16_bn", num_classes=10), (3, 32, 32)),
    "resnet20": (lambda: build_model("resnet20", num_classes=10), (3, 32, 32)),
    "resnet56": (lambda: build_model("resnet56", num_classes=10), (3, 32, 32)),
    "resnet18": (lambda: build_model("resnet18", num_classes=10), (3, 64, 64)),
    "inverted_residual": (InvertedResidual, (3, 16, 16)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_the_compact_model_computes_what_the_masked_model_computes(name: str) -> None:
    """Random 50 % filter masks on every conv (the depthwise one excepted: its channels follow
    the expansion's): eval outputs equal the masked model's to 1e-5, the parameters that
    remain are the entries the result says it kept, and every filter pruned in an untied layer
    is gone."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    randomise(model)
    keep = random_keep(model, 0.5, seed=1, skip=("depthwise.0.weight",))
    example = torch.zeros(1, *shape)
    before = copy.deepcopy(model.state_dict())
    result = compact(model, example, keep=keep)
    masked = copy.deepcopy(model)
    zero_pruned_filters(masked, keep, example)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (result.model(x) - masked(x)).abs().max() <= 1e-5
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    compact_params = sum(p.numel() for p in result.model.parameters())
    assert compact_params == sum(int(m.sum()) for m in result.kept_entries.values())
    assert compact_params < sum(p.numel() for p in model.parameters())
    untied = {"lenet5": list(keep), "vgg16_bn": list(keep), "inverted_residual": [
        "expand.0.weight"], "resnet20": ["layer1.0.conv1.weight", "layer3.2.conv1.weight"]}
    for layer in untied.get(name, []):
        assert result.removed[layer] == (~keep[layer]).nonzero().view(-1).tolist(), layer
    if name == "inverted_residual":  # tied by the identity: only the common pruned channels
        both = ~keep["stem.0.weight"] & ~keep["project.0.weight"]
        assert result.removed["stem.0.weight"] == both.nonzero().view(-1).tolist()
        assert result.model.depthwise[0].out_channels == int(keep["expand.0.weight"].sum())


@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn", "inverted_residual"])
def test_folding_batch_norms_keeps_the_outputs_and_removes_the_norms(name: str) -> None:
    """The latency report times the dense and the compact network with their batch norms
    folded into the convolutions: the folded copies compute what the networks compute (to
    1e-4, trained running statistics), hold no batch norm, and leave the originals as they were."""
    from dessilbi.subnet.report import fold_batch_norms

    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    randomise(model)
    example = torch.zeros(1, *shape)
    small = compact(model, example, keep=random_keep(
        model, 0.5, seed=1, skip=("depthwise.0.weight",))).model.eval()
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(2))
    for net in (model, small):
        norms = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        folded = fold_batch_norms(net)
        assert norms > 0 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == norms
        with torch.no_grad():
            assert (folded(x) - net(x)).abs().max() <= 1e-4


class DataDependent(nn.Module):
    """A conv and batch norm behind data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)) if x.sum() > 0 else x


def test_the_latency_report_says_what_it_folded() -> None:
    """Folded rows only where batch norms were folded; an untraceable model is named, and the
    report says its batch norms were not folded."""
    from dessilbi.subnet.report import _latency_pairs, compact_report, fold_batch_norms

    build, shape = MODELS["resnet20"]
    model = build().eval()
    example = torch.zeros(1, *shape)
    small = compact(model, example, keep=random_keep(model, 0.5, seed=1)).model
    assert list(_latency_pairs(model, small)[0]) == ["as trained", "folded"]
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert _latency_pairs(plain, plain) == ({"as trained": (plain, plain)}, "")
    odd = DataDependent().eval()
    with pytest.raises(ValueError, match="cannot fold the batch norms of DataDependent"):
        fold_batch_norms(odd)
    pairs, note = _latency_pairs(odd, odd)
    assert list(pairs) == ["as trained"] and note.startswith(
        "Batch norms not folded: cannot fold the batch norms of DataDependent")
    report = compact_report(odd, odd, torch.ones(1, 3, 8, 8), batches=(1,))
    assert report.rstrip().endswith(note) and "| 1 | 1 | as trained |" in report


def test_vgg_parameters_and_flops_are_those_of_the_narrow_network() -> None:
    """VGG-16-BN has no ties: its compact model is the VGG of the kept widths, with that
    network's parameter count and FLOPs (torch's FlopCounterMode)."""
    torch.manual_seed(0)
    model = build_model("vgg16_bn", num_classes=10).eval()
    keep = random_keep(model, 0.4, seed=3)
    result = compact(model, torch.zeros(1, 3, 32, 32), keep=keep)
    widths = [int(k.sum()) for k in keep.values()]
    narrow = build_model("vgg16_bn", num_classes=10, widths=widths).eval()
    assert sum(p.numel() for p in result.model.parameters()) == \
        sum(p.numel() for p in narrow.parameters())

    def flops(net: nn.Module) -> int:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net(torch.zeros(1, 3, 32, 32))
        return counter.get_total_flops()

    assert flops(result.model) == flops(narrow) < flops(model)


def test_dessilbi_continues_on_the_compact_model_from_the_same_state() -> None:
    """DessiLBI (Nesterov momentum, weight decay) on ResNet-20 for 3 steps, then compaction
    by Γ's support: 3 more steps on the compact model equal 3 steps of the masked model (held
    by the kept entries, its optimizer state zero elsewhere) on the kept entries, bitwise
    close (float64); V, Γ and the momentum buffers were sliced, not reset."""
    torch.manual_seed(0)
    # float64: a group at the threshold must not flip on the rounding of narrower sums.
    model = build_model("resnet20", num_classes=10).double()
    groups = structured_param_groups(model, conv="filter", linear=None, weight_decay=1e-4)
    optimizer = DessiLBI(groups, lr=0.1, nu=2.0, lam=0.18, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 16, 16, generator=gen, dtype=torch.float64),
                torch.randint(0, 10, (8,), generator=gen)) for _ in range(6)]

    def step(net: nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...],
             masks: dict[str, torch.Tensor] | None = None) -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(net(batch[0]), batch[1]).backward()
        opt.step()
        if masks is not None:
            apply_masks(net, masks, opt)

    for batch in batches[:3]:
        step(model, optimizer, batch)
    support = {n: int(s.sum()) for n, s in compact_support(model, optimizer).items()}
    assert 0 < sum(support.values()) < sum(p.shape[0] for n, p in model.named_parameters()
                                           if p.dim() == 4)
    example = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    result = compact(model.eval(), example, optimizer)
    assert result.optimizer is not None and sum(map(len, result.removed.values())) > 0
    model.train()
    result.model.train()
    masks = result.kept_entries
    zero_pruned_filters(model, compact_support(model, optimizer), example)
    apply_masks(model, masks, optimizer)
    for batch in batches[3:]:
        step(model, optimizer, batch, masks)
        step(result.model, result.optimizer, batch)
    compact_params = dict(result.model.named_parameters())
    for name, p in model.named_parameters():
        kept = p.detach()[masks[name]].view(compact_params[name].shape)
        torch.testing.assert_close(compact_params[name].detach(), kept, rtol=1e-9, atol=1e-12,
                                   msg=name)
        state, compact_state = optimizer.state[p], result.optimizer.state[compact_params[name]]
        for key in ("v", "gamma", "momentum_buffer"):
            if key in state:
                expected = state[key][masks[name]].view(compact_params[name].shape)
                torch.testing.assert_close(compact_state[key], expected, rtol=1e-9,
                                           atol=1e-12, msg=f"{name} {key}")


def compact_support(model: nn.Module, optimizer: DessiLBI) -> dict[str, torch.Tensor]:
    from dessilbi import group_support

    return group_support(model, optimizer)


class PreActivation(nn.Module):
    """x = stem(x); x = x + conv(relu(bn(x))): bn shifts the stream's channels before conv
    reads them, so a channel pruned in stem and conv is not zero where conv reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.conv(torch.relu(self.bn(x)))
        return self.head(x.mean((2, 3)))


def test_channels_that_are_read_nonzero_or_reach_the_output_stay() -> None:
    """A pre-activation shift (bn's β = 1) keeps a channel pruned in both tied layers alive
    where the next layer reads it: compaction keeps it (zeroed), and the outputs still agree.
    A filter-coupled classifier never loses its output units."""
    torch.manual_seed(0)
    model = PreActivation().eval()
    with torch.no_grad():
        model.bn.bias.fill_(1.0)
    keep = {"stem.weight": torch.tensor([True, False, True, True]),
            "conv.weight": torch.tensor([True, False, True, True]),
            "head.weight": torch.tensor([True, False, True])}
    example = torch.zeros(1, 3, 8, 8)
    result = compact(model, example, keep=keep)
    masked = copy.deepcopy(model)
    zero_pruned_filters(masked, keep, example)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (result.model(x) - masked(x)).abs().max() <= 1e-6
    assert result.removed["stem.weight"] == [] and result.model.stem.out_channels == 4
    assert result.model.head.out_features == 3  # the classes stay
    with torch.no_grad():
        model.bn.bias.zero_()  # β = 0: relu(bn(0)) is 0 where the channel is read (γ·0 = 0)
        model.bn.running_mean.zero_()
    assert compact(model, example, keep=keep).removed["stem.weight"] == [1]


def test_tied_filters_are_removed_exactly_where_gamma_drops_them() -> None:
    """conv_structure "tied" on ResNet-20: the dependency graph gives each stage's residual
    stream (the stem or shortcut and every block's second conv) as one tied set; after DessiLBI
    steps with λ near the median joint ‖V_g‖ of every group, the tied layers share their
    support, and compaction removes every filter Γ dropped — in tied layers too — with the
    outputs unchanged."""
    from dessilbi.selection import CALIBRATING_LAM
    from dessilbi.subnet.tied import tie_filter_groups, tied_sets

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10).double()
    example = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    convs = [n for n, p in model.named_parameters() if p.dim() == 4]
    sets = [s for s in tied_sets(model, example, convs) if len(s) > 1]
    assert sets == [
        ["conv1.weight", "layer1.0.conv2.weight", "layer1.1.conv2.weight",
         "layer1.2.conv2.weight"],
        ["layer2.0.conv2.weight", "layer2.0.shortcut.0.weight", "layer2.1.conv2.weight",
         "layer2.2.conv2.weight"],
        ["layer3.0.conv2.weight", "layer3.0.shortcut.0.weight", "layer3.1.conv2.weight",
         "layer3.2.conv2.weight"]]
    groups = tie_filter_groups(structured_param_groups(model, conv="filter", linear=None),
                               model, example)
    assert sum(g["structure"] == "tied" for g in groups) == 3
    optimizer = DessiLBI(groups, lr=0.1, nu=2.0, lam=CALIBRATING_LAM, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=gen)

    def step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    for _ in range(4):
        step()
    for group in optimizer.param_groups:
        if group["structure"] is not None:
            joint = sum(optimizer.state[p]["v"].flatten(1).norm(dim=1) ** 2
                        for p in group["params"]) ** 0.5
            group["lam"] = 1.25 * float(joint.median())  # V grows by about 1/4 in step 5
    step()
    support = compact_support(model, optimizer)
    for tied in sets:
        assert all(torch.equal(support[tied[0]], support[n]) for n in tied)
        assert 0 < int(support[tied[0]].sum()) < support[tied[0]].numel()
    result = compact(model.eval(), example, optimizer)
    for name, kept in support.items():
        assert result.removed[name] == (~kept).nonzero().view(-1).tolist(), name
    masked = copy.deepcopy(model)
    zero_pruned_filters(masked, support, example)
    with torch.no_grad():
        assert (result.model(x) - masked(x)).abs().max() <= 1e-9


def test_compaction_by_the_support_of_gamma_on_batch_norm_scales() -> None:
    """DessiLBI with Γ on the batch-norm scales (convs uncoupled): ``compact`` reads the
    selected channels off Γ, removes the others' filters, and the compact model computes what
    the masked model computes."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10)
    groups = structured_param_groups(model, conv=None, linear=None, norm="element")
    optimizer = DessiLBI(groups, lr=0.5, nu=1.0, lam=0.9)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        optimizer.zero_grad()
        x, y = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    support = compact_support(model, optimizer)
    norm_support = {n: s for n, s in support.items() if "bn" in n or "shortcut.1" in n}
    kept = sum(int(s.sum()) for s in norm_support.values())
    assert len(norm_support) == len(support) == 21 and 0 < kept < 784
    example = torch.zeros(1, 3, 16, 16)
    model.eval()
    result = compact(model, example, optimizer)
    masked = copy.deepcopy(model)
    zero_pruned_filters(masked, norm_support, example)
    x = torch.randn(4, 3, 16, 16, generator=gen)
    torch.testing.assert_close(result.model(x), masked(x), rtol=0, atol=1e-5)
    assert sum(map(len, result.removed.values())) > 0
    assert result.optimizer is not None
