"""Pruned filters zeroed with their biases and norm channels (torch-pruning's dependency graph)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dessilbi.config import load_config
from dessilbi.models import build_model
from dessilbi.path_record import load_path
from dessilbi.subnet import (
    MaskFileError,
    filter_norms,
    l1_mask,
    load_mask,
    ordered_mask,
    random_mask,
    support_mask,
    zero_pruned_filters,
)
from dessilbi.train import train


class Branches(nn.Module):
    """conv_a -> ReLU -> BN (a norm after an activation); conv_b -> cat with conv_a's branch (no
    norm of its own); conv_c -> BN without affine (nothing to zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(6)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_c = nn.Conv2d(10, 5, 1)
        self.bn_c = nn.BatchNorm2d(5, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn_a(torch.relu(self.conv_a(x)))
        return self.bn_c(self.conv_c(torch.cat([a, self.conv_b(x)], 1)))


def randomise_norms(model: nn.Module) -> None:
    """Non-trivial batch-norm statistics and affine parameters, as after training."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=gen))
                    m.bias.copy_(torch.randn(m.num_features, generator=gen))


def norm_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: outputs.__setitem__(n, out))
             for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    model(x)
    for hook in hooks:
        hook.remove()
    return outputs


def test_the_norm_of_each_layer_is_found_through_activations_not_through_joins() -> None:
    model = Branches()
    assert filter_norms(model, torch.zeros(1, 3, 8, 8)) == {"conv_a.weight": "bn_a"}
    resnet = build_model("resnet20", num_classes=10)
    norms = filter_norms(resnet, torch.zeros(1, 3, 32, 32))
    assert norms["conv1.weight"] == "bn1"
    assert norms["layer1.0.conv2.weight"] == "layer1.0.bn2"  # feeds a residual addition
    assert norms["layer2.0.shortcut.0.weight"] == "layer2.0.shortcut.1"
    assert len(norms) == 21 and "fc.weight" not in norms


def test_a_pruned_channel_is_exactly_zero_after_its_norm_in_resnet20() -> None:
    """Random 50 % masks on every conv of ResNet-20: the pruned filters, their norm's weight
    and bias are zero, so (in eval mode, whatever the running statistics) the norm's output is
    exactly zero on the pruned channels; kept channels and the BN statistics are untouched."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10).eval()
    randomise_norms(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    convs = {n: p for n, p in model.named_parameters() if p.dim() == 4}
    keep = {n: torch.rand(p.shape[0], generator=gen) < 0.5 for n, p in convs.items()}
    zero_pruned_filters(model, keep, torch.zeros(1, 3, 32, 32))
    norms = filter_norms(model, torch.zeros(1, 3, 32, 32))
    state = model.state_dict()
    for name, kept in keep.items():
        assert torch.equal(state[name][~kept], torch.zeros_like(state[name][~kept])), name
        assert torch.equal(state[name][kept], before[name][kept]), name
        bn = norms[name]
        for key in ("weight", "bias"):
            assert not bool(state[f"{bn}.{key}"][~kept].any()), (bn, key)
            assert torch.equal(state[f"{bn}.{key}"][kept], before[f"{bn}.{key}"][kept])
        assert torch.equal(state[f"{bn}.running_mean"], before[f"{bn}.running_mean"])
    outputs = norm_outputs(model, torch.randn(4, 3, 32, 32, generator=gen))
    for name, kept in keep.items():
        out = outputs[norms[name]]
        assert not bool(out[:, ~kept].any()), name
        assert bool(out[:, kept].abs().sum() > 0), name


def test_biases_without_a_norm_are_zeroed_and_bad_masks_change_nothing() -> None:
    model = Branches().eval()
    randomise_norms(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"conv_b.weight: mask of shape \(3,\), expected \[4\]"):
        zero_pruned_filters(model, {"conv_a.weight": torch.ones(6, dtype=torch.bool),
                                    "conv_b.weight": torch.ones(3, dtype=torch.bool)}, x)
    with pytest.raises(KeyError, match="conv_z.weight"):
        zero_pruned_filters(model, {"conv_z.weight": torch.ones(6, dtype=torch.bool)}, x)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    keep_b = torch.tensor([True, False, True, False])
    keep_c = torch.tensor([True, True, False, True, False])
    zero_pruned_filters(model, {"conv_b.weight": keep_b, "conv_c.weight": keep_c}, x)
    assert not bool(model.conv_b.bias[~keep_b].any()) and not bool(model.conv_c.bias[~keep_c].any())
    assert torch.equal(model.conv_b.bias[keep_b], before["conv_b.bias"][keep_b])
    assert torch.equal(model.bn_a.weight, before["bn_a.weight"])  # conv_a kept whole
    out = model.conv_c(torch.randn(2, 10, 8, 8))
    assert not bool(out[:, ~keep_c].any())


# ------------------------------------------------------------------------------------- masks


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return train(load_config("digits", {"epochs": 4, "nu": 5, "out": str(out)}),
                 quiet=True).run_dir


def test_support_and_path_order_masks(digits_run: Path) -> None:
    record = load_path(digits_run / "path.pt")
    support = support_mask(record, epoch=3)
    assert set(support.keep) == {"conv1.weight", "conv2.weight", "conv3.weight"}
    for name, kept in support.keep.items():
        assert torch.equal(kept, record.support(name, 3))
    assert support.source["epoch"] == 3 and 0 < support.kept < support.total

    ordered = ordered_mask(record, keep=0.5)
    step = record.steps[-1]
    norms = record.group_norms("conv3.weight")[-1]
    entry = record.entry_step("conv3.weight").double()
    entry[entry < 0] = float("inf")
    kept = ordered.keep["conv3.weight"]
    assert int(kept.sum()) == 32 and bool((entry[kept] <= step).any())
    # Every kept group comes before every dropped one: earlier entry, or as early and larger.
    for i in kept.nonzero().view(-1).tolist():
        for j in (~kept).nonzero().view(-1).tolist():
            assert (entry[i], -norms[i]) <= (entry[j], -norms[j]), (i, j)
    per_layer = ordered_mask(record, keep={"conv1.weight": 0.25})
    assert per_layer.counts()["conv1.weight"] == 4 and per_layer.counts()["conv2.weight"] == 32
    with pytest.raises(ValueError, match=r"keep ratio of conv1.weight: 1.5"):
        ordered_mask(record, keep={"conv1.weight": 1.5})
    # Rounded up to channel blocks: 0.3 of 16 / 32 / 64 is 5 / 10 / 20, in blocks of 8 it is
    # 8 / 16 / 24, the first groups of the same order.
    rounded = ordered_mask(record, keep=0.3, round_to=8)
    assert rounded.counts() == {"conv1.weight": 8, "conv2.weight": 16, "conv3.weight": 24}
    plain = ordered_mask(record, keep=0.3)
    assert plain.counts() == {"conv1.weight": 5, "conv2.weight": 10, "conv3.weight": 20}
    assert all(bool((rounded.keep[n] | ~plain.keep[n]).all()) for n in plain.keep)
    assert rounded.source["round_to"] == 8 and "round_to" not in plain.source
    with pytest.raises(ValueError, match="round_to: 0"):
        ordered_mask(record, keep=0.3, round_to=0)


def test_baseline_masks_and_the_mask_file(digits_run: Path, tmp_path: Path) -> None:
    weights = torch.load(digits_run / "model.pt", weights_only=True)
    counts = {"conv1.weight": 5, "conv3.weight": 20}
    l1 = l1_mask(weights, counts)
    assert l1.counts() == counts
    norms = weights["conv3.weight"].abs().flatten(1).sum(1)
    kept = l1.keep["conv3.weight"]
    assert float(norms[kept].min()) >= float(norms[~kept].max())
    sizes = {"conv1.weight": 16, "conv3.weight": 64}
    first, again, other = (random_mask(sizes, counts, seed) for seed in (0, 0, 1))
    assert first.counts() == counts
    assert all(torch.equal(first.keep[n], again.keep[n]) for n in counts)
    assert not torch.equal(first.keep["conv3.weight"], other.keep["conv3.weight"])

    file = l1.save(tmp_path / "mask.json")
    back = load_mask(file)
    assert back.source == l1.source and back.counts() == counts
    assert all(torch.equal(back.keep[n], l1.keep[n]) for n in counts)
    file.write_text("{not json")
    with pytest.raises(MaskFileError, match=r"mask.json: cannot be read as a mask"):
        load_mask(file)
    with pytest.raises(MaskFileError, match="no mask file there"):
        load_mask(tmp_path / "missing.json")


def test_a_flops_budget_picks_the_longest_fitting_prefix_of_the_path(digits_run: Path) -> None:
    from dessilbi.runs import load_run
    from dessilbi.subnet import compact
    from dessilbi.subnet.budget import budget_mask, global_order
    from dessilbi.subnet.report import layer_flops

    record = load_path(digits_run / "path.pt")
    model = load_run(digits_run).model
    example = torch.zeros(1, 1, 8, 8)
    dense = layer_flops(model, example)[""]
    mask = budget_mask(record, model, example, flops=0.4 * dense)
    small = compact(model, example, keep=mask.keep).model
    assert layer_flops(small, example)[""] <= 0.4 * dense
    order = global_order(record, record.epochs[-1])
    count = mask.source["filters_in_order"]
    assert 0 < count < len(order) and mask.kept >= count
    # The prefix is maximal: one more filter in the path's order no longer fits.
    bigger = {n: k.clone() for n, k in mask.keep.items()}
    layer, filt = order[count]
    bigger[layer][filt] = True
    assert layer_flops(compact(model, example, keep=bigger).model, example)[""] > 0.4 * dense
    # The first filters in the order are the earliest entered.
    entered = [(n, g) for n, g in order if int(record.entry_step(n)[g]) >= 0]
    assert order[: len(entered)] == entered
    with pytest.raises(ValueError, match="no subnetwork with one filter per layer fits"):
        budget_mask(record, model, example, params=10)


# ------------------------------------------------------------------------ norm-scale coupling


def test_norm_scales_coupled_one_group_per_channel() -> None:
    from dessilbi import structured_param_groups

    model = build_model("resnet20", num_classes=10)
    groups = structured_param_groups(model, conv=None, linear=None, norm="element")
    coupled = [g for g in groups if g["structure"] is not None]
    assert len(coupled) == 1 and coupled[0]["structure"] == "element"
    assert coupled[0]["weight_decay"] == 0.0
    names = coupled[0]["param_names"]
    assert len(names) == 21 and all(n.endswith(".weight") for n in names)
    assert "bn1.weight" in names and "bn1.bias" not in names
    every = [n for g in groups for n in g["param_names"]]
    assert sorted(every) == sorted(n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="invalid norm: 'filter'"):
        structured_param_groups(model, norm="filter")
    # Their L1 baseline is the largest |γ| (network slimming's criterion).
    gamma = torch.tensor([0.5, -2.0, 0.1, 1.0])
    assert l1_mask({"bn1.weight": gamma}, {"bn1.weight": 2}).keep["bn1.weight"].tolist() == \
        [False, True, False, True]


def test_a_mask_on_norm_scales_prunes_the_filters_those_norms_follow() -> None:
    """Masks keyed by batch-norm scales (``norm_structure: element``) zero what the same masks
    keyed by the convs that feed those norms zero; a conv masked both ways keeps the channels
    both keep; a norm after a join is refused, naming it."""
    from dessilbi.subnet.dependency import on_filters

    torch.manual_seed(0)
    by_norm, by_conv = (build_model("resnet20", num_classes=10).eval() for _ in range(2))
    by_conv.load_state_dict(by_norm.state_dict())
    x = torch.zeros(1, 3, 32, 32)
    norms = filter_norms(by_norm, x)
    gen = torch.Generator().manual_seed(2)
    keep = {conv: torch.rand(dict(by_norm.named_parameters())[conv].shape[0], generator=gen)
            < 0.5 for conv in norms}
    zero_pruned_filters(by_norm, {f"{norms[c]}.weight": k for c, k in keep.items()}, x)
    zero_pruned_filters(by_conv, keep, x)
    for key, value in by_norm.state_dict().items():
        assert torch.equal(value, by_conv.state_dict()[key]), key
    both = on_filters(by_norm, {"bn1.weight": torch.tensor([True] * 8 + [False] * 8),
                                "conv1.weight": torch.tensor([True, False] * 8)}, x)
    assert list(both) == ["conv1.weight"]
    assert both["conv1.weight"].nonzero().view(-1).tolist() == [0, 2, 4, 6]

    class NormAfterJoin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.a(x) + self.b(x))

    with pytest.raises(ValueError, match="bn.weight: no conv or linear layer feeds"):
        on_filters(NormAfterJoin(), {"bn.weight": torch.ones(4, dtype=torch.bool)}, x)
    with pytest.raises(ValueError, match=r"bn1.weight: mask of shape \(15,\), expected \[16\]"):
        on_filters(by_norm, {"bn1.weight": torch.ones(15, dtype=torch.bool)}, x)
    # A norm's shift (norm_structure: affine) stands for the same channels as its scale.
    shift = on_filters(by_norm, {"bn1.bias": torch.tensor([True, False] * 8)}, x)
    assert list(shift) == ["conv1.weight"] and shift["conv1.weight"].sum() == 8
    with pytest.raises(ValueError, match="bn1.running_mean: masks are kept per conv / linear"):
        on_filters(by_norm, {"bn1.running_mean": torch.ones(16, dtype=torch.bool)}, x)
