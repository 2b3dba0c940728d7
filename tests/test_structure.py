"""``structured_param_groups``: which parameters are coupled, with which structure and decay.

The expected role of each parameter is derived here from the module type that owns it (written
out independently of the implementation), then compared with the groups returned.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from dessilbi import DessiLBI, structured_param_groups
from dessilbi.models import build_model

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
STRUCTS = ("filter", "element", "channel", None)


pytestmark = pytest.mark.usefixtures("one_thread")


class Zoo(nn.Module):
    """Every layer kind at once: Conv1d, depthwise Conv3d, Linear (with and without bias),
    BatchNorm1d, LayerNorm, GroupNorm, an Embedding, and a Linear head whose weight is tied to
    the embedding (a shared parameter reachable under two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.conv1d = nn.Conv1d(6, 4, 3, padding=1)
        self.bn = nn.BatchNorm1d(4)
        self.conv3d = nn.Conv3d(4, 4, 2, groups=4, bias=False)
        self.gn = nn.GroupNorm(2, 4)
        self.proj = nn.Linear(4, 6, bias=False)
        self.ln = nn.LayerNorm(6)
        self.fc_mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).transpose(1, 2)  # (B, 6, T)
        h = self.bn(torch.relu(self.conv1d(h)))  # (B, 4, T)
        h = h.reshape(h.shape[0], 4, 2, 2, -1)  # (B, 4, 2, 2, T/4)
        h = self.gn(self.conv3d(h)).mean(dim=(2, 3, 4))  # (B, 4)
        h = self.fc_mid(self.ln(self.proj(h)))
        return self.head(h)


def zoo_input() -> torch.Tensor:
    return torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(0))


MODELS = {
    "small_cnn": (lambda: build_model("small_cnn", in_channels=1, image_size=8), (2, 1, 8, 8)),
    "lenet5": (lambda: build_model("lenet5", in_channels=1, image_size=28), (2, 1, 28, 28)),
    "resnet20": (lambda: build_model("resnet20", in_channels=3, image_size=32), (2, 3, 32, 32)),
    "zoo": (Zoo, None),
}


def expected_roles(
    model: nn.Module, conv: str | None = "filter", linear: str | None = "element"
) -> dict[int, tuple[str | None, str]]:
    """Per parameter id: (structure, kind) with kind "weight" or "no_decay", from module types.
    A shared parameter takes the role of the first module that owns it."""
    roles: dict[int, tuple[str | None, str]] = {}
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in roles:
                continue
            if isinstance(module, NORM) or param.dim() <= 1:
                roles[id(param)] = (None, "no_decay")
            elif pname == "weight" and isinstance(module, CONV):
                roles[id(param)] = (conv, "weight")
            elif pname == "weight" and isinstance(module, nn.Linear):
                roles[id(param)] = (linear, "weight")
            else:
                roles[id(param)] = (None, "weight")  # e.g. the embedding table
    return roles


def group_of(groups: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {id(p): g for g in groups for p in g["params"]}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_parameter_exactly_once(name: str) -> None:
    """Every parameter of the model appears in exactly one group, exactly once (the tied
    embedding/head weight included), and param_names are the model's own names."""
    model = MODELS[name][0]()
    groups = structured_param_groups(model)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    names = dict(model.named_parameters())
    for g in groups:
        assert len(g["param_names"]) == len(g["params"])
        for pname, p in zip(g["param_names"], g["params"], strict=True):
            assert names[pname] is p
    if name == "zoo":
        assert isinstance(model, Zoo) and model.head.weight is model.embed.weight
        assert sum(p is model.embed.weight for g in groups for p in g["params"]) == 1


@pytest.mark.parametrize("name", list(MODELS))
def test_structure_and_decay_by_layer_type(name: str) -> None:
    """Conv weights get the conv structure, linear weights the linear structure; biases and
    norm parameters are uncoupled with weight_decay 0.0; weight groups carry weight_decay when
    it is given; the expected counts of coupled tensors hold."""
    model = MODELS[name][0]()
    groups = structured_param_groups(model, weight_decay=5e-4)
    where = group_of(groups)
    roles = expected_roles(model)
    for pid, (structure, kind) in roles.items():
        g = where[pid]
        assert g["structure"] == structure
        assert g["weight_decay"] == (0.0 if kind == "no_decay" else 5e-4)
    counts = {s: sum(len(g["params"]) for g in groups if g["structure"] == s) for s in STRUCTS}
    expected = {
        "small_cnn": {"filter": 3, "element": 1},
        "lenet5": {"filter": 3, "element": 2},
        "resnet20": {"filter": 21, "element": 1},  # 19 convs + 2 projection shortcuts; fc
        "zoo": {"filter": 2, "element": 2},  # conv1d, conv3d; proj, fc_mid (head is tied)
    }[name]
    assert counts["filter"] == expected["filter"]
    assert counts["element"] == expected["element"]
    assert all(g["params"] for g in groups)  # no empty groups


def test_zoo_roles_in_detail() -> None:
    """The hand-made model, parameter by parameter."""
    model = Zoo()
    # conv3d is depthwise: the channel structure is refused on it, so it is excluded here.
    where = group_of(
        structured_param_groups(model, conv="channel", linear="filter", exclude=("conv3d",))
    )
    assert where[id(model.conv1d.weight)]["structure"] == "channel"
    assert where[id(model.conv3d.weight)]["structure"] is None
    assert where[id(model.proj.weight)]["structure"] == "filter"
    assert where[id(model.fc_mid.weight)]["structure"] == "filter"
    for p in (
        model.conv1d.bias,
        model.bn.weight,
        model.bn.bias,
        model.gn.weight,
        model.gn.bias,
        model.ln.weight,
        model.ln.bias,
        model.fc_mid.bias,
    ):
        assert where[id(p)]["structure"] is None
        assert where[id(p)]["weight_decay"] == 0.0
    # the embedding table (registered first, under "embed.weight") is an uncoupled weight
    embed_group = where[id(model.embed.weight)]
    assert embed_group["structure"] is None
    assert "embed.weight" in embed_group["param_names"]
    assert "weight_decay" not in embed_group  # no weight_decay given: optimizer default


def test_exclude_patterns() -> None:
    """``exclude=("fc*",)`` (fnmatch on module names) leaves lenet5's fc1/fc2 weights uncoupled,
    convs untouched; a full parameter name also works."""
    model = build_model("lenet5", in_channels=1, image_size=28)
    where = group_of(structured_param_groups(model, exclude=("fc*",), weight_decay=1e-4))
    for layer in (model.fc1, model.fc2):
        assert where[id(layer.weight)]["structure"] is None
        assert where[id(layer.weight)]["weight_decay"] == 1e-4  # still a decayed weight
    for layer in (model.conv1, model.conv2, model.conv3):
        assert where[id(layer.weight)]["structure"] == "filter"
    where = group_of(structured_param_groups(model, exclude=("conv3.weight",)))
    assert where[id(model.conv3.weight)]["structure"] is None
    assert where[id(model.conv2.weight)]["structure"] == "filter"
    assert where[id(model.fc1.weight)]["structure"] == "element"


def test_conv_none_and_linear_none() -> None:
    """conv=None leaves conv weights uncoupled (decayed weights), linear=None likewise."""
    model = build_model("small_cnn", in_channels=1, image_size=8)
    groups = structured_param_groups(model, conv=None, weight_decay=5e-4)
    where = group_of(groups)
    for layer in (model.conv1, model.conv2, model.conv3):
        assert where[id(layer.weight)]["structure"] is None
        assert where[id(layer.weight)]["weight_decay"] == 5e-4
    assert where[id(model.fc.weight)]["structure"] == "element"
    where = group_of(structured_param_groups(model, linear=None))
    assert where[id(model.fc.weight)]["structure"] is None
    assert where[id(model.conv1.weight)]["structure"] == "filter"


def test_weight_decay_keys() -> None:
    """weight_decay=None (default) omits the key on weight groups; norm_weight_decay=None omits
    it on the bias/norm group; given values are set."""
    model = build_model("resnet20", in_channels=3, image_size=32)
    groups = structured_param_groups(model)
    where = group_of(groups)
    assert "weight_decay" not in where[id(model.conv1.weight)]
    assert where[id(model.bn1.weight)]["weight_decay"] == 0.0
    groups = structured_param_groups(model, weight_decay=5e-4, norm_weight_decay=None)
    where = group_of(groups)
    assert where[id(model.conv1.weight)]["weight_decay"] == 5e-4
    assert where[id(model.fc.weight)]["weight_decay"] == 5e-4
    assert "weight_decay" not in where[id(model.bn1.weight)]
    assert "weight_decay" not in where[id(model.fc.bias)]
    opt = DessiLBI(groups, weight_decay=1e-3)  # the missing key falls back to the default
    assert group_of(opt.param_groups)[id(model.bn1.weight)]["weight_decay"] == 1e-3


def test_bad_structure_argument_raises() -> None:
    """An unknown conv/linear structure is rejected with ValueError naming it."""
    model = build_model("small_cnn", in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="'rows'"):
        structured_param_groups(model, conv="rows")
    with pytest.raises(ValueError, match="'cols'"):
        structured_param_groups(model, linear="cols")


@pytest.mark.parametrize("name", list(MODELS))
def test_groups_accepted_and_step_changes_parameters(name: str) -> None:
    """DessiLBI accepts the groups (with their "param_names"); one step changes every parameter
    that has a gradient, and coupled ones get V and Γ state."""
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    model = factory()
    opt = DessiLBI(structured_param_groups(model, weight_decay=5e-4), lr=0.1, momentum=0.9, nu=10.0)
    inp = zoo_input() if shape is None else torch.randn(*shape)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(inp).square().mean().backward()
    opt.step()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert not torch.equal(p, before[n]), n
    for g in opt.param_groups:
        for p in g["params"]:
            assert ("v" in opt.state[p]) == (g["structure"] is not None)


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel / DataParallel: the model sits under ``.module``,
    so every name gets a "module." prefix."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_wrapped_model_gives_the_same_groups() -> None:
    """A wrapped model (DDP-style "module." prefixes) gets the same groups as the bare model:
    same parameters, same structures and decay, names carrying the prefix."""
    model = build_model("lenet5", in_channels=1, image_size=28)
    bare = structured_param_groups(model, weight_decay=5e-4)
    wrapped = structured_param_groups(Wrapper(model), weight_decay=5e-4)
    assert len(bare) == len(wrapped)
    for a, b in zip(bare, wrapped, strict=True):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
        assert a["structure"] == b["structure"]
        assert a.get("weight_decay") == b.get("weight_decay")
        assert [n.removeprefix("module.") for n in b["param_names"]] == a["param_names"]


def test_exclude_patterns_work_on_a_wrapped_model() -> None:
    """``exclude=("fc*",)`` must exclude lenet5's fc layers whether or not the model is wrapped
    for DDP: the documented patterns name the model's modules ("fc*"), and a user wrapping the
    model in DistributedDataParallel should not have to rewrite them as "module.fc*"."""
    model = build_model("lenet5", in_channels=1, image_size=28)
    where = group_of(structured_param_groups(Wrapper(model), exclude=("fc*",)))
    assert where[id(model.fc1.weight)]["structure"] is None
    assert where[id(model.fc2.weight)]["structure"] is None
    assert where[id(model.conv1.weight)]["structure"] == "filter"


def grouped_net() -> nn.Sequential:
    """A dense conv, a grouped conv (groups=2) and a depthwise conv (groups=8)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2),
        nn.Conv2d(8, 8, 3, groups=8),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def test_channel_structure_is_refused_on_grouped_convolutions() -> None:
    """conv="channel" on a grouped or depthwise conv raises ValueError naming the layer (the
    depthwise weight [8, 1, 3, 3] would be ONE "channel" group; a grouped conv's W[:, j] mixes
    input channel j of every group), also through DataParallel (names without "module.");
    excluded, the grouped convs are fine, and "filter" / "element" stay allowed on them."""
    model = grouped_net()
    assert model[3].weight.shape == (8, 1, 3, 3)
    with pytest.raises(ValueError, match=r"^2 \(Conv2d groups=2\): channel structure needs "
                                         r"groups=1; use conv='filter' or exclude it$"):
        structured_param_groups(model, conv="channel")
    with pytest.raises(ValueError, match=r"^3 \(Conv2d groups=8\)"):
        structured_param_groups(model, conv="channel", exclude=("2",))
    features = nn.Sequential()
    features.add_module("features", model)
    with pytest.raises(ValueError, match=r"^features\.2 \(Conv2d groups=2\)"):
        structured_param_groups(nn.DataParallel(features), conv="channel")
    where = group_of(structured_param_groups(model, conv="channel", exclude=("2", "3")))
    assert where[id(model[0].weight)]["structure"] == "channel"
    assert where[id(model[2].weight)]["structure"] is None
    for structure in ("filter", "element"):
        where = group_of(structured_param_groups(model, conv=structure))
        assert [where[id(model[i].weight)]["structure"] for i in (0, 2, 3)] == [structure] * 3
