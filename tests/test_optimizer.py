"""The DessiLBI optimizer against the literal oracle of DESIGN.md section 1, and its contract as a
``torch.optim.Optimizer``: state_dict resume, closures, schedulers, validation, non-finite
gradients.

The parity tests run a small conv net (a realistic trajectory: groups of Γ enter the support
during the run) twice from identical weights: once with :class:`dessilbi.DessiLBI`, once with the
slow :class:`naive_dessilbi.NaiveDessiLBI`, each on its own copy of the model, so that each
gradient is computed at its own trajectory's weights. Any difference in the update rule shows
up in W, V, Γ or the momentum buffer.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from torch import nn

import dessilbi
from dessilbi import DessiLBI, NonFiniteGradientError
from dessilbi.optim.proximal import group_norms
from naive_dessilbi import NaiveDessiLBI
from nets import Net

F64 = torch.float64
RTOL = 1e-10
ATOL = 1e-12


pytestmark = pytest.mark.usefixtures("one_thread")




def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().to(F64)


def make_data(seed: int = 0, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 6, 6, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, y


def loss_fn(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = data
    return nn.functional.cross_entropy(model(x), y)


SHARED = ("momentum", "dampening", "nesterov", "weight_decay", "kappa", "group_scaling")


def group_spec(model: Net, structure: str | None, **hyper: Any) -> list[dict[str, Any]]:
    """Three groups: the main one (conv + fc1 weights, ``structure``, all of ``hyper``), fc2's
    weight under the element structure with its own λ and ν, and the biases uncoupled with their
    own lr: coupled and uncoupled groups mixed in one optimizer. The momentum settings, weight
    decay and κ of ``hyper`` apply to all three groups."""
    shared = {k: v for k, v in hyper.items() if k in SHARED}
    return [
        {"params": [model.conv.weight, model.fc1.weight], "structure": structure, **hyper},
        {"params": [model.fc2.weight], **shared, "structure": "element", "lam": 0.05, "nu": 3.0},
        {
            "params": [model.conv.bias, model.fc1.bias, model.fc2.bias],
            **shared,
            "structure": None,
            "lr": 0.05,
        },
    ]


def drop_some_grads(model: Net, step: int) -> None:
    """Parameters without a gradient must be skipped: drop fc2.bias's gradient on every third
    step and fc1.weight's (a coupled tensor) on every seventh."""
    if step % 3 == 1:
        model.fc2.bias.grad = None
    if step % 7 == 4:
        model.fc1.weight.grad = None


def assert_states_match(
    model: nn.Module,
    opt: DessiLBI,
    ref_model: nn.Module,
    oracle: NaiveDessiLBI,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> None:
    """W, and V, Γ and the momentum buffer of every parameter, equal the oracle's."""
    for (name, p), (_, q) in zip(
        model.named_parameters(), ref_model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=f"W of {name}")
        state = {k: v for k, v in opt.state.get(p, {}).items()}
        ref_state = oracle.state.get(q, {})
        assert set(state) == set(ref_state), f"state keys of {name}"
        for key, value in ref_state.items():
            torch.testing.assert_close(
                state[key], value, rtol=rtol, atol=atol, msg=f"{key} of {name}"
            )
        if "gamma" in ref_state:  # the support itself must agree exactly, not just to atol
            assert torch.equal(state["gamma"] != 0, ref_state["gamma"] != 0), f"support of {name}"


STRUCTURE_LAM = {
    # λ per (structure, group_scaling), chosen so that within 30 steps some but not all groups
    # of the conv + fc1 weights enter the support under every momentum config (asserted).
    ("element", "none"): 0.15,
    ("element", "sqrt_size"): 0.15,
    ("filter", "none"): 0.6,
    ("filter", "sqrt_size"): 0.1,
    ("channel", "none"): 0.2,
    ("channel", "sqrt_size"): 0.05,
    (None, "none"): 1.0,
    (None, "sqrt_size"): 1.0,
}

# ν = 20·lr in every config, so that V grows at the same rate lr/ν = 0.05 per step; the
# weights grow at different speeds, which "lam_factor" (λ = factor · STRUCTURE_LAM) evens out.
MOMENTUM_CONFIGS = {
    "plain": {"momentum": 0.0, "lr": 0.3, "nu": 6.0, "kappa": 1.0, "weight_decay": 0.0},
    "heavy_ball_wd": {"momentum": 0.9, "lr": 0.1, "nu": 2.0, "weight_decay": 1e-3},
    "dampening_kappa2": {
        "momentum": 0.9,
        "dampening": 0.25,
        "lr": 0.05,
        "nu": 1.0,
        "kappa": 2.0,
        "lam_factor": 0.7,
    },
    "nesterov_wd_kappa_half": {
        "momentum": 0.9,
        "nesterov": True,
        "lr": 0.2,
        "nu": 4.0,
        "kappa": 0.5,
        "weight_decay": 5e-4,
        "lam_factor": 1.2,
    },
}


def run_parity(
    structure: str | None,
    scaling: str,
    config: dict[str, Any],
    foreach_values: tuple[bool | None, ...] = (True, False),
    steps: int = 30,
) -> list[tuple[Net, DessiLBI]]:
    """Run the oracle and one DessiLBI per ``foreach`` value in lockstep from the same weights;
    assert every run matches the oracle at the end; return the (model, optimizer) pairs."""
    config = dict(config)
    lam = config.pop("lam_factor", 1.0) * STRUCTURE_LAM[(structure, scaling)]
    hyper = {"lam": lam, "group_scaling": scaling, **config}
    ref_model = make_net()
    oracle = NaiveDessiLBI(group_spec(ref_model, structure, **hyper))
    runs = []
    for foreach in foreach_values:
        model = copy.deepcopy(ref_model)
        runs.append((model, DessiLBI(group_spec(model, structure, **hyper), foreach=foreach)))
    data = make_data()
    for step in range(steps):
        for m in (ref_model, *(model for model, _ in runs)):
            m.zero_grad(set_to_none=True)
            loss_fn(m, data).backward()
            drop_some_grads(m, step)
        oracle.step()
        for _, opt in runs:
            opt.step()
    for model, opt in runs:
        assert_states_match(model, opt, ref_model, oracle)
    return runs


PARITY_CASES = [
    (structure, scaling)
    for structure in (None, "element", "filter", "channel")
    for scaling in ("none", "sqrt_size")
    if structure is not None or scaling == "none"
]


@pytest.mark.parametrize("config", list(MOMENTUM_CONFIGS), ids=list(MOMENTUM_CONFIGS))
@pytest.mark.parametrize(("structure", "scaling"), PARITY_CASES)
def test_parity_with_oracle(structure: str | None, scaling: str, config: str) -> None:
    """30 float64 steps of DessiLBI, foreach and per-tensor paths, equal the literal oracle: W,
    V, Γ (values and exact support) and momentum buffers.

    Covers every structure and group scaling, momentum/dampening/Nesterov, weight decay, κ ≠ 1,
    coupled and uncoupled groups in one optimizer and gradients that are None on some steps.
    The run must be non-trivial: some but not all groups of the main group get selected.
    """
    for model, opt in run_parity(structure, scaling, MOMENTUM_CONFIGS[config]):
        if structure is None:
            assert "v" not in opt.state[model.conv.weight]
            assert "v" not in opt.state[model.fc1.weight]
            continue
        selected = total = 0
        for p in (model.conv.weight, model.fc1.weight):
            norms = group_norms(opt.state[p]["gamma"], structure)
            selected += int((norms > 0).sum())
            total += norms.numel()
        assert 0 < selected < total, f"{selected}/{total} groups selected: uninformative test"


def test_foreach_default_is_bitwise_the_foreach_path() -> None:
    """``foreach=None`` (the default) takes the multi-tensor path: bitwise equal to foreach=True,
    and both paths agree with each other to rounding."""
    runs = run_parity("filter", "none", MOMENTUM_CONFIGS["heavy_ball_wd"], (None, True, False), 12)
    (default, opt_default), (multi, opt_multi), (single, _) = runs
    for a, b, c in zip(default.parameters(), multi.parameters(), single.parameters(), strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=RTOL, atol=ATOL)
        for key, value in opt_default.state[a].items():
            assert torch.equal(value, opt_multi.state[b][key])


@pytest.mark.parametrize("foreach", [True, False])
def test_mixed_dtypes_in_one_group(foreach: bool) -> None:
    """A group holding float32 and float64 tensors (the foreach path buckets by dtype) follows the
    oracle, each tensor in its own precision."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(6, 4, generator=gen, dtype=F64)
    b = torch.randn(5, 3, generator=gen).float()
    params = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    ref = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    hyper = {"lr": 0.2, "nu": 0.5, "lam": 0.5, "momentum": 0.5, "structure": "filter"}
    opt = DessiLBI([{"params": params, **hyper}], foreach=foreach)
    oracle = NaiveDessiLBI([{"params": ref, **hyper}])
    for step in range(20):
        for ps in (params, ref):
            for i, p in enumerate(ps):
                p.grad = torch.sin(p.detach() * (i + 1) + step)  # a smooth synthetic gradient
        opt.step()
        oracle.step()
    torch.testing.assert_close(params[0], ref[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(params[1], ref[1], rtol=1e-5, atol=1e-6)
    assert params[1].dtype == torch.float32
    assert opt.state[params[1]]["gamma"].dtype == torch.float32
    for p, q in zip(params, ref, strict=True):
        tol = {"rtol": RTOL, "atol": ATOL} if p.dtype == F64 else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(opt.state[p]["gamma"], oracle.state[q]["gamma"], **tol)
        torch.testing.assert_close(opt.state[p]["v"], oracle.state[q]["v"], **tol)
    assert (group_norms(opt.state[params[0]]["gamma"], "filter") > 0).any()


def test_functional_api_matches_optimizer() -> None:
    """``dessilbi.optim.dessilbi(...)`` (the functional step) equals one optimizer step."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(4, 3, generator=gen, dtype=F64)
    g = torch.randn(4, 3, generator=gen, dtype=F64)
    p = w.clone().requires_grad_()
    p.grad = g.clone()
    opt = DessiLBI([p], lr=0.1, nu=0.3, lam=0.0, momentum=0.9, structure="channel")
    opt.step()
    w2, v, gamma = w.clone(), torch.zeros_like(w), torch.zeros_like(w)
    bufs: list[torch.Tensor | None] = [None]
    dessilbi.optim.dessilbi(
        [w2],
        [g.clone()],
        bufs,
        [v],
        [gamma],
        lr=0.1,
        kappa=1.0,
        nu=0.3,
        lam=0.0,
        momentum=0.9,
        dampening=0.0,
        nesterov=False,
        weight_decay=0.0,
        structure="channel",
        group_scaling="none",
    )
    assert torch.equal(p.detach(), w2)
    assert torch.equal(opt.state[p]["v"], v)
    assert torch.equal(opt.state[p]["gamma"], gamma)
    assert bufs[0] is not None and torch.equal(opt.state[p]["momentum_buffer"], bufs[0])
    # with λ = 0, Γ₁ = κ·V₁ = (lr/ν)·W₀ exactly as DESIGN.md's V update says
    torch.testing.assert_close(gamma, (0.1 / 0.3) * w, rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------
# the group invariant


@pytest.mark.parametrize("structure", ["filter", "channel"])
@pytest.mark.parametrize("kappa", [1.0, 3.0])
def test_group_invariant(structure: str, kappa: float) -> None:
    """Under a group structure every group of Γ is all-zero or Γ_g = κ·c_g·V_g with c_g > 0: no
    entry of a selected group is forced to zero (where V is nonzero), unlike the element
    structure."""
    model = make_net(1)
    opt = DessiLBI(
        group_spec(model, structure, lam=(1.0 if structure == "filter" else 0.3) / kappa),
        lr=0.1 / kappa,
        kappa=kappa,
        nu=2.0,
        momentum=0.9,
    )
    data = make_data(1)
    for _ in range(40):
        opt.zero_grad()
        loss_fn(model, data).backward()
        opt.step()
    axis = 0 if structure == "filter" else 1
    n_zero = n_selected = 0
    for p in (model.conv.weight, model.fc1.weight):
        gamma, v = opt.state[p]["gamma"], opt.state[p]["v"]
        for i in range(p.shape[axis]):
            gamma_g, v_g = gamma.select(axis, i), v.select(axis, i)
            if float(gamma_g.norm()) == 0.0:
                n_zero += 1
                continue
            n_selected += 1
            assert torch.equal(gamma_g != 0, v_g != 0)
            ratio = gamma_g[v_g != 0] / v_g[v_g != 0]
            assert float(ratio.min()) > 0
            torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))
            assert float(ratio[0]) < kappa  # a shrinkage factor κ(1 − λ_g/‖V_g‖) in (0, κ)
    assert n_zero > 0 and n_selected > 0


# ---------------------------------------------------------------------------------------------
# state_dict resume


def train_steps(
    model: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int, data: Any
) -> None:
    for step in range(start, stop):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, data).backward()
        if isinstance(model, Net):
            drop_some_grads(model, step)
        opt.step()


def resume_groups(model: Net) -> list[dict[str, Any]]:
    return group_spec(model, "filter", lam=0.6)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_state_dict_resume_is_bitwise(foreach: bool, momentum: float) -> None:
    """k steps, save model and optimizer (through torch.save / torch.load(weights_only=True)),
    load into a fresh model and optimizer, n more steps: bitwise equal to an uninterrupted run.
    The per-parameter state holds exactly the keys "v", "gamma" (coupled) and
    "momentum_buffer" (with momentum)."""
    data = make_data(2)
    kw = {"lr": 0.1, "nu": 2.0, "momentum": momentum, "weight_decay": 1e-3, "foreach": foreach}

    straight = make_net(3)
    opt_straight = DessiLBI(resume_groups(straight), **kw)
    train_steps(straight, opt_straight, 0, 20, data)

    first = make_net(3)
    opt_first = DessiLBI(resume_groups(first), **kw)
    train_steps(first, opt_first, 0, 9, data)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    second = make_net(99)  # different initial weights, overwritten by the checkpoint
    opt_second = DessiLBI(resume_groups(second), **kw)
    second.load_state_dict(saved["model"])
    opt_second.load_state_dict(saved["optim"])
    train_steps(second, opt_second, 9, 20, data)

    for (name, p), q in zip(straight.named_parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q), name
        for key, value in opt_straight.state[p].items():
            assert torch.equal(value, opt_second.state[q][key]), f"{key} of {name}"
    # the saved state: keys per parameter, in the order of the groups
    expected_keys = []
    coupled = [True, True, True, False, False, False]  # conv.w, fc1.w, fc2.w, then biases
    for is_coupled in coupled:
        keys = {"v", "gamma"} if is_coupled else set()
        if momentum:
            keys.add("momentum_buffer")
        expected_keys.append(keys)
    state = saved["optim"]["state"]
    assert [set(state.get(i, {})) for i in range(6)] == expected_keys
    assert any(bool((v["gamma"] != 0).any()) for v in state.values() if "gamma" in v)


def test_state_dict_resume_with_structured_groups() -> None:
    """Resume also works with the groups of :func:`dessilbi.structured_param_groups` (which carry
    "param_names"), bitwise."""
    data = make_data(4)

    def make(seed: int) -> tuple[Net, DessiLBI]:
        model = make_net(seed)
        groups = dessilbi.structured_param_groups(model, weight_decay=1e-3)
        return model, DessiLBI(groups, lr=0.1, nu=2.0, lam=0.3, momentum=0.9)

    straight, opt_straight = make(5)
    train_steps(straight, opt_straight, 0, 12, data)
    first, opt_first = make(5)
    train_steps(first, opt_first, 0, 5, data)
    buffer = io.BytesIO()
    torch.save([first.state_dict(), opt_first.state_dict()], buffer)
    buffer.seek(0)
    model_sd, optim_sd = torch.load(buffer, weights_only=True)
    second, opt_second = make(6)
    second.load_state_dict(model_sd)
    opt_second.load_state_dict(optim_sd)
    train_steps(second, opt_second, 5, 12, data)
    for p, q in zip(straight.parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q)
        assert set(opt_straight.state[p]) == set(opt_second.state[q])
        for key in opt_straight.state[p]:
            assert torch.equal(opt_straight.state[p][key], opt_second.state[q][key])


class TwoConv(nn.Module):
    """Two conv layers of one shape, (4, 4, 3, 3): a swap of their state would go unnoticed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3)
        self.b = nn.Conv2d(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))).flatten(1)


def two_conv_groups(
    model: TwoConv, layout: list[list[str]], structures: list[str], names: bool = True
) -> list[dict[str, Any]]:
    """One param group per entry of ``layout`` (weight names in order), optionally named."""
    groups = []
    for members, structure in zip(layout, structures, strict=True):
        group: dict[str, Any] = {
            "params": [model.get_parameter(n) for n in members],
            "structure": structure,
        }
        if names:
            group["param_names"] = list(members)
        groups.append(group)
    return groups


def trained_two_conv(
    layout: list[list[str]], structures: list[str], names: bool = True, steps: int = 4
) -> tuple[TwoConv, DessiLBI]:
    """A TwoConv (float64) after a few momentum steps, with V, Γ and buffers that differ per
    tensor."""
    torch.manual_seed(11)
    model = TwoConv().to(F64)
    opt = DessiLBI(
        two_conv_groups(model, layout, structures, names), lr=0.1, nu=0.5, lam=0.05, momentum=0.9
    )
    x = torch.randn(6, 4, 7, 7, generator=torch.Generator().manual_seed(12), dtype=F64)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model, opt


def saved_state(opt: DessiLBI) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return cast(dict[str, Any], torch.load(buffer, weights_only=True))


def assert_load_refused(
    opt: DessiLBI, state_dict: dict[str, Any], *fragments: str
) -> None:
    """``load_state_dict`` raises a ValueError whose message holds ``fragments`` and leaves the
    optimizer's groups and state exactly as they were."""
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="cannot load the optimizer state") as info:
        opt.load_state_dict(state_dict)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for i, state in before["state"].items():
        assert state.keys() == after["state"][i].keys()
        for key, value in state.items():
            assert torch.equal(value, after["state"][i][key])


@pytest.mark.parametrize("names", [True, False])
def test_load_state_dict_into_swapped_groups_is_refused(names: bool) -> None:
    """Two groups of equal-shaped tensors, loaded in swapped order: with param names the names
    differ; without them the groups' structures do. Either way a ValueError, nothing changed
    (torch's own load maps state by position and would swap V and Γ silently)."""
    _, opt_saved = trained_two_conv([["a.weight"], ["b.weight"]], ["filter", "channel"], names)
    # The target has state of its own (and another lr), which must survive the refused load.
    _, opt = trained_two_conv([["b.weight"], ["a.weight"]], ["channel", "filter"], names, 2)
    for group in opt.param_groups:
        group["lr"] = 0.05
    if names:
        fragments = ["'b.weight' (group 0, index 0)", "saved for 'a.weight'"]
    else:
        fragments = ["param group 0 has structure 'channel'", "the saved group 'filter'"]
    assert_load_refused(opt, saved_state(opt_saved), *fragments)


def test_load_state_dict_with_reordered_names_is_refused() -> None:
    """Within one group, the same parameters in another order: ValueError naming both."""
    _, opt_saved = trained_two_conv([["a.weight", "b.weight"]], ["filter"])
    _, opt = trained_two_conv([["b.weight", "a.weight"]], ["filter"])
    assert_load_refused(
        opt, saved_state(opt_saved), "'b.weight' (group 0, index 0)", "saved for 'a.weight'"
    )


@pytest.mark.parametrize("names", [True, False])
def test_load_state_dict_with_other_shapes_is_refused(names: bool) -> None:
    """A checkpoint of a network with other layer widths: the same names (or none), the state
    tensors of other shapes than the parameters they would be assigned to."""

    def make(widths: tuple[int, int]) -> DessiLBI:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, widths[0], 3), nn.Conv2d(widths[0], widths[1], 3))
        net.to(F64)
        groups = dessilbi.structured_param_groups(net)
        if not names:
            for group in groups:
                del group["param_names"]
        opt = DessiLBI(groups, lr=0.1, nu=0.5, momentum=0.9)
        net(torch.randn(2, 3, 6, 6, dtype=F64)).sum().backward()
        opt.step()
        return opt

    saved = saved_state(make((8, 16)))
    label = "parameter '0.weight' (group 0, index 0)" if names else "parameter (group 0, index 0)"
    assert_load_refused(
        make((16, 8)), saved, f"'v' of {label} has shape (8, 3, 3, 3)", "shape (16, 3, 3, 3)"
    )


def test_load_state_dict_checks_after_pre_hooks_which_run_once() -> None:
    """A load-state-dict pre-hook (torch's way to remap a checkpoint) runs once, before the
    check: here it reorders a checkpoint saved with the groups swapped, and the load then
    continues bitwise like an uninterrupted run."""
    layout, structures = [["a.weight"], ["b.weight"]], ["filter", "channel"]
    straight, opt_straight = trained_two_conv(layout, structures, steps=8)
    swapped, opt_swapped = trained_two_conv(layout[::-1], structures[::-1], steps=4)
    saved = saved_state(opt_swapped)
    model, opt = trained_two_conv(layout, structures, steps=0)
    model.load_state_dict(swapped.state_dict())
    calls = []

    def swap_back(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        calls.append(1)
        state_dict["param_groups"] = state_dict["param_groups"][::-1]

    opt.register_load_state_dict_pre_hook(swap_back)
    opt.load_state_dict(saved)
    assert len(calls) == 1
    x = torch.randn(6, 4, 7, 7, generator=torch.Generator().manual_seed(12), dtype=F64)
    for _ in range(4):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for p, q in zip(model.parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q)
        for key, value in opt_straight.state[q].items():
            assert torch.equal(value, opt.state[p][key]), key


# ---------------------------------------------------------------------------------------------
# closures, schedulers, zero_grad


def test_step_with_closure_returns_loss_and_uses_its_gradient() -> None:
    """step(closure) calls the closure once per step, returns its loss, and steps with the
    gradient the closure computed (compared with the oracle)."""
    model = make_net(7)
    ref_model = copy.deepcopy(model)
    hyper = {"lam": 0.2, "nu": 2.0, "momentum": 0.9}
    opt = DessiLBI(group_spec(model, "channel", **hyper))
    oracle = NaiveDessiLBI(group_spec(ref_model, "channel", **hyper))
    data = make_data(7)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        opt.zero_grad()
        loss = loss_fn(model, data)
        loss.backward()
        return loss

    for step in range(10):
        expected = float(loss_fn(model, data).detach())
        returned = opt.step(closure)
        assert len(calls) == step + 1
        assert returned is not None and float(returned.detach()) == expected
        ref_model.zero_grad()
        loss_fn(ref_model, data).backward()
        oracle.step()
    assert_states_match(model, opt, ref_model, oracle)
    assert opt.step() is None  # no closure: None


def test_lr_scheduler_changes_the_step() -> None:
    """StepLR halves every group's lr every 4 steps; the steps use the new lr (the oracle is
    given the same lr schedule by hand)."""
    model = make_net(8)
    ref_model = copy.deepcopy(model)
    hyper = {"lam": 0.6, "nu": 2.0, "momentum": 0.9, "lr": 0.2}
    opt = DessiLBI(group_spec(model, "filter", **hyper))
    oracle = NaiveDessiLBI(group_spec(ref_model, "filter", **hyper))
    base_lrs = [g["lr"] for g in oracle.param_groups]
    assert base_lrs == [0.2, 0.1, 0.05]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    data = make_data(8)
    for step in range(14):
        factor = 0.5 ** (step // 4)
        for group, ref_group, base in zip(
            opt.param_groups, oracle.param_groups, base_lrs, strict=True
        ):
            assert group["lr"] == pytest.approx(base * factor, rel=1e-15)
            ref_group["lr"] = base * factor
        for m in (model, ref_model):
            m.zero_grad()
            loss_fn(m, data).backward()
        opt.step()
        oracle.step()
        scheduler.step()
    assert_states_match(model, opt, ref_model, oracle)
    # The schedule mattered: a constant-lr oracle run ends elsewhere.
    const_model = copy.deepcopy(make_net(8))
    const = NaiveDessiLBI(group_spec(const_model, "filter", **hyper))
    for _ in range(14):
        const_model.zero_grad()
        loss_fn(const_model, data).backward()
        const.step()
    assert not torch.allclose(const_model.conv.weight, model.conv.weight, rtol=1e-3, atol=1e-6)


def test_zero_grad_set_to_none_and_zero() -> None:
    """After zero_grad(set_to_none=True) a step changes nothing (all params skipped). With
    zero gradients (set_to_none=False) coupled weights still move by the coupling term
    −κ·lr·(W − Γ)/ν and V by (lr/ν)(W − Γ), while uncoupled weights (no momentum) stay put."""
    model = make_net(9)
    opt = DessiLBI(group_spec(model, "filter", lam=0.6), lr=0.1, nu=2.0, kappa=1.5)
    data = make_data(9)
    train_steps(model, opt, 0, 15, data)

    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    before = {p: p.detach().clone() for p in model.parameters()}
    state_before = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    opt.step()
    for p in model.parameters():
        assert torch.equal(p, before[p])
        for k, v in state_before.get(p, {}).items():
            assert torch.equal(opt.state[p][k], v)

    loss_fn(model, data).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.step()
    for group in opt.param_groups:
        lr, kappa, nu = group["lr"], group["kappa"], group["nu"]
        for p in group["params"]:
            if group["structure"] is None:
                assert torch.equal(p, before[p])
                continue
            w0, gamma0 = before[p], state_before[p]["gamma"]
            expected_w = w0 - kappa * lr * (w0 - gamma0) / nu
            torch.testing.assert_close(p.detach(), expected_w, rtol=1e-12, atol=1e-14)
            expected_v = state_before[p]["v"] + (lr / nu) * (w0 - gamma0)
            torch.testing.assert_close(opt.state[p]["v"], expected_v, rtol=1e-12, atol=1e-14)
            assert not torch.equal(p, before[p])


# ---------------------------------------------------------------------------------------------
# validation


def a_param(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, requires_grad=True)


BAD_HYPERPARAMETERS = [
    ({"lr": 0.0}, "lr", "0.0"),
    ({"lr": -0.1}, "lr", "-0.1"),
    ({"lr": math.nan}, "lr", "nan"),
    ({"kappa": 0.0}, "kappa", "0.0"),
    ({"kappa": -2.0}, "kappa", "-2.0"),
    ({"nu": 0.0}, "nu", "0.0"),
    ({"nu": -100.0}, "nu", "-100.0"),
    ({"lam": -0.5}, "lam", "-0.5"),
    ({"momentum": 1.0}, "momentum", "1.0"),
    ({"momentum": -0.1}, "momentum", "-0.1"),
    ({"dampening": -0.25}, "dampening", "-0.25"),
    ({"dampening": 1.5}, "dampening", "1.5"),
    ({"weight_decay": -1e-4}, "weight_decay", "-0.0001"),
    ({"nesterov": True}, "nesterov", "True"),
    ({"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "nesterov", "True"),
    ({"structure": "rows"}, "structure", "'rows'"),
    ({"group_scaling": "sqrt"}, "group_scaling", "'sqrt'"),
    ({"nonfinite": "ignore"}, "nonfinite", "'ignore'"),
]


@pytest.mark.parametrize(("kwargs", "name", "value"), BAD_HYPERPARAMETERS)
def test_bad_hyperparameters_raise(kwargs: dict[str, Any], name: str, value: str) -> None:
    """Every bad hyperparameter raises ValueError naming the argument and its value, both as a
    constructor default and as a per-group setting."""
    with pytest.raises(ValueError) as info:
        DessiLBI([a_param(3, 4)], **kwargs)
    assert name in str(info.value) and value in str(info.value)
    if name == "nonfinite":
        return  # an optimizer-wide option, not a group setting
    with pytest.raises(ValueError) as info:
        DessiLBI([{"params": [a_param(3, 4)]}, {"params": [a_param(2)], **kwargs}])
    assert name in str(info.value) and value in str(info.value)


@pytest.mark.parametrize("structure", ["filter", "channel"])
def test_group_structure_on_1d_tensor_raises(structure: str) -> None:
    """A group structure needs a tensor with >= 2 dims; a 1-D one is rejected at construction."""
    with pytest.raises(ValueError) as info:
        DessiLBI([a_param(5)], structure=structure)
    assert "structure" in str(info.value) and repr(structure) in str(info.value)
    with pytest.raises(ValueError):
        DessiLBI([{"params": [a_param(3, 3)]}, {"params": [a_param(5)], "structure": structure}])
    # element and None are fine on 1-D tensors
    DessiLBI([a_param(5)], structure="element")
    DessiLBI([a_param(5)], structure=None)


def test_unknown_structure_rejected_even_for_an_empty_group() -> None:
    """An unknown structure is a bad hyperparameter whether or not the group holds parameters
    yet (params can be appended to a group later, and the structure is used at every step)."""
    opt = DessiLBI([a_param(3, 4)])
    with pytest.raises(ValueError, match="'rows'"):
        opt.add_param_group({"params": [], "structure": "rows"})
    assert len(opt.param_groups) == 1


def test_good_hyperparameters_accepted() -> None:
    """Boundary values that are allowed: lam = 0, momentum = 0, dampening = 1, weight decay 0."""
    opt = DessiLBI([a_param(2, 2)], lam=0.0, momentum=0.5, dampening=1.0, weight_decay=0.0)
    assert opt.param_groups[0]["dampening"] == 1.0
    assert opt.defaults["structure"] == "element"


@pytest.mark.parametrize(
    "bad", [{"nu": 0.0}, {"lr": -1.0}, {"structure": "filter"}, {"momentum": 2.0}]
)
def test_add_param_group_with_bad_group_leaves_groups_unchanged(bad: dict[str, Any]) -> None:
    """add_param_group with a bad group raises ValueError and leaves param_groups as they were;
    the rejected parameter can then be added with good settings."""
    p = a_param(3, 4)
    opt = DessiLBI([p], lr=0.1)
    groups_before = [dict(g) for g in opt.param_groups]
    new = a_param(6) if bad.get("structure") else a_param(2, 3)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [new], **bad})
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["params"] == [p]
    assert [dict(g) for g in opt.param_groups] == groups_before
    opt.add_param_group({"params": [new], "lr": 0.2, "structure": "element"})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["params"][0] is new


# ---------------------------------------------------------------------------------------------
# non-finite gradients


def snapshot(model: nn.Module, opt: DessiLBI) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.detach().clone()
        for key, value in opt.state.get(p, {}).items():
            out[f"{name}/{key}"] = value.clone()
    return out


def assert_snapshot_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def poison(value: float) -> Callable[[Net], None]:
    def apply(model: Net) -> None:
        assert model.fc1.weight.grad is not None
        model.fc1.weight.grad[3, 5] = value

    return apply


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_gradient_raises_and_changes_nothing(foreach: bool, bad: float) -> None:
    """A NaN or ±Inf gradient (default policy) raises NonFiniteGradientError before anything is
    touched: W, V, Γ and momentum buffers stay bitwise equal; training can continue."""
    model = make_net(10)
    opt = DessiLBI(group_spec(model, "filter", lam=0.6), nu=2.0, momentum=0.9, foreach=foreach)
    data = make_data(10)
    train_steps(model, opt, 0, 6, data)
    before = snapshot(model, opt)
    assert any(key.endswith("/gamma") for key in before)
    opt.zero_grad()
    loss_fn(model, data).backward()
    poison(bad)(model)
    with pytest.raises(NonFiniteGradientError) as info:
        opt.step()
    assert isinstance(info.value, FloatingPointError)
    assert "(12, 128)" in str(info.value)  # names the culprit's shape
    assert_snapshot_equal(before, snapshot(model, opt))


def test_nonfinite_in_uncoupled_param_also_refused() -> None:
    """A NaN in a bias (uncoupled group) refuses the whole step, coupled tensors included."""
    model = make_net(11)
    opt = DessiLBI(group_spec(model, "element", lam=0.1), nu=2.0, momentum=0.9)
    data = make_data(11)
    train_steps(model, opt, 0, 3, data)
    before = snapshot(model, opt)
    opt.zero_grad()
    loss_fn(model, data).backward()
    assert model.conv.bias.grad is not None
    model.conv.bias.grad[0] = math.nan
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert_snapshot_equal(before, snapshot(model, opt))


@pytest.mark.parametrize("foreach", [True, False])
def test_nonfinite_skip_policy(foreach: bool) -> None:
    """With nonfinite="skip" a non-finite step warns (RuntimeWarning), changes nothing, and the
    following finite steps are exactly those of the oracle that never saw the bad step."""
    model = make_net(12)
    ref_model = copy.deepcopy(model)
    hyper = {"lam": 0.6, "nu": 2.0, "momentum": 0.9, "weight_decay": 1e-3}
    opt = DessiLBI(group_spec(model, "filter", **hyper), nonfinite="skip", foreach=foreach)
    oracle = NaiveDessiLBI(group_spec(ref_model, "filter", **hyper))
    data = make_data(12)
    for step in range(16):
        for m in (model, ref_model):
            m.zero_grad()
            loss_fn(m, data).backward()
        if step in (4, 9):
            before = snapshot(model, opt)
            bad = math.nan if step == 4 else math.inf

            def closure(bad: float = bad) -> torch.Tensor:
                opt.zero_grad()
                loss = loss_fn(model, data)
                loss.backward()
                poison(bad)(model)
                return loss

            with pytest.warns(RuntimeWarning, match="skipped"):
                returned = opt.step(closure)
            # the closure's loss is still returned, as for any step with a closure
            assert returned is not None
            assert float(returned.detach()) == float(loss_fn(model, data).detach())
            assert_snapshot_equal(before, snapshot(model, opt))
            continue
        opt.step()
        oracle.step()
    assert_states_match(model, opt, ref_model, oracle)


def test_large_finite_gradient_is_not_mistaken_for_overflow() -> None:
    """float32 gradients whose *sum* overflows (3e38 + 3e38) but whose entries are all finite
    must not be refused: the step is taken and matches the oracle."""
    p = torch.tensor([[1.0, -2.0], [0.5, 0.25]], requires_grad=True)
    q = p.detach().clone().requires_grad_()
    grad = torch.tensor([[3e38, 3e38], [0.0, 1.0]])
    assert not torch.isfinite(grad.sum())
    opt = DessiLBI([p], lr=1e-40, nu=1.0, lam=0.0)
    oracle = NaiveDessiLBI([{"params": [q], "lr": 1e-40, "nu": 1.0, "lam": 0.0}])
    p.grad, q.grad = grad.clone(), grad.clone()
    opt.step()
    oracle.step()
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p, q)
    assert not torch.equal(p.detach(), torch.tensor([[1.0, -2.0], [0.5, 0.25]]))


# ------------------------------------------------------------------------------ tied filters


class TiedNet(nn.Module):
    """A residual pair: ``a = relu(conv_a(x))``, ``y = a + conv_b(a)``: the 8 output channels
    of conv_a and conv_b are added, so their filters are tied."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(2, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv_a(x))
        return self.fc((a + self.conv_b(a)).mean((2, 3)))


def tied_spec(model: TiedNet, **hyper: Any) -> list[dict[str, Any]]:
    shared = {k: v for k, v in hyper.items() if k in SHARED}
    return [
        {"params": [model.conv_a.weight, model.conv_b.weight], "structure": "tied", **hyper},
        {"params": [model.fc.weight], **shared, "structure": "element", "lam": 0.05},
        {"params": [model.conv_a.bias, model.conv_b.bias, model.fc.bias], **shared,
         "structure": None},
    ]


def _three_paths_beside_oracle(
    ref: nn.Module, oracle: NaiveDessiLBI, spec: Callable[[Any], list[dict[str, Any]]]
) -> list[tuple[nn.Module, DessiLBI]]:
    """Copies of ``ref`` under the foreach, per-tensor and fused paths, each stepped 30 times
    on one float64 batch (16 inputs of 2×6×6, 3 classes) with ``ref`` and its ``oracle``.
    ``spec`` takes the concrete test net, hence ``Any``."""
    runs = []
    for options in ({"foreach": True}, {"foreach": False}, {"fused": True}):
        model = copy.deepcopy(ref)
        runs.append((model, DessiLBI(spec(model), **options)))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 2, 6, 6, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (16,), generator=gen)
    for _ in range(30):
        for m in (ref, *(model for model, _ in runs)):
            m.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(x), y).backward()
        oracle.step()
        for _, opt in runs:
            opt.step()
    return runs


@pytest.mark.parametrize("scaling", ["none", "sqrt_size"])
@pytest.mark.parametrize("config", list(MOMENTUM_CONFIGS), ids=list(MOMENTUM_CONFIGS))
def test_tied_filters_match_the_oracle_and_share_their_support(config: str, scaling: str
                                                               ) -> None:
    """30 float64 steps with conv_a's and conv_b's filters tied (one norm per filter across
    both tensors): the foreach, per-tensor and fused paths equal the literal oracle, the two
    tensors' supports are identical, and some but not all filters are selected."""
    hyper = dict(MOMENTUM_CONFIGS[config])
    factor = hyper.pop("lam_factor", 1.0)
    base = 0.8 if config == "nesterov_wd_kappa_half" else 0.66  # about the median joint ‖V_g‖
    hyper.update(lam=factor * (base if scaling == "none" else base / 9.5),  # √90 entries
                 group_scaling=scaling)
    torch.manual_seed(0)
    ref = TiedNet().to(F64)
    oracle = NaiveDessiLBI(tied_spec(ref, **hyper))
    runs = _three_paths_beside_oracle(ref, oracle, lambda model: tied_spec(model, **hyper))
    for model, opt in runs:
        assert_states_match(model, opt, ref, oracle)
        a, b = (group_norms(opt.state[p]["gamma"], "tied") > 0
                for p in (model.conv_a.weight, model.conv_b.weight))
        assert torch.equal(a, b)
        assert 0 < int(a.sum()) < 8, f"{int(a.sum())}/8 filters selected: uninformative test"


def test_tied_groups_refuse_other_filter_counts_and_missing_gradients() -> None:
    model = TiedNet().to(F64)
    with pytest.raises(ValueError, match="'tied' needs the same number of filters"):
        DessiLBI([{"params": [model.conv_a.weight, model.fc.weight], "structure": "tied"}])
    opt = DessiLBI([{"params": [model.conv_a.weight, model.conv_b.weight],
                     "structure": "tied"}], lr=0.1)
    model.conv_a.weight.grad = torch.ones_like(model.conv_a.weight)
    with pytest.raises(ValueError, match="one of them has no gradient"):
        opt.step()


class AffineNet(nn.Module):
    """A conv and its batch norm, whose scale and shift form one tied group per channel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_affine_norm_groups_match_the_oracle_and_share_their_support() -> None:
    """``structured_param_groups(norm="affine")``: one tied group per batch norm holding its
    scale and shift (the conv and fc uncoupled); 30 float64 Nesterov steps of the foreach,
    per-tensor and fused paths equal the literal oracle, γ_c and β_c enter together, and some
    but not all channels are selected."""
    from dessilbi import structured_param_groups

    hyper = {"lr": 0.1, "nu": 2.0, "momentum": 0.9, "nesterov": True, "lam": 0.9}
    torch.manual_seed(0)
    ref = AffineNet().to(F64)
    ref.bn.bias.data.uniform_(-0.5, 0.5)

    def spec(model: AffineNet) -> list[dict[str, Any]]:
        groups = structured_param_groups(model, conv=None, linear=None, norm="affine")
        return [{**g, **hyper} if g["structure"] else {**g, "lr": hyper["lr"]} for g in groups]

    groups = spec(ref)
    assert [(g["structure"], g["param_names"]) for g in groups if g["structure"]] == \
        [("tied", ["bn.weight", "bn.bias"])]
    oracle = NaiveDessiLBI(spec(ref))
    runs = _three_paths_beside_oracle(ref, oracle, spec)
    for model, opt in runs:
        assert_states_match(model, opt, ref, oracle)
        scale, shift = (opt.state[p]["gamma"] != 0 for p in (model.bn.weight, model.bn.bias))
        assert torch.equal(scale, shift)
        assert 0 < int(scale.sum()) < 8, f"{int(scale.sum())}/8 channels: uninformative test"
