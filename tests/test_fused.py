"""Tests for the compiled, fused DessiLBI step (``dessilbi.optim.fused``).

The fused step must give the numbers of the eager paths (per-tensor and foreach) over a run of
steps, with a learning rate that changes mid-run without recompiling, and fall back to the
foreach path with a single warning when compiling fails. Compilation is the slow part (a few
seconds per graph), so there are few configurations and the tensors are those of a small
2-conv + linear network.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from dessilbi import DessiLBI
from dessilbi.optim.functional import multi_tensor_dessilbi, single_tensor_dessilbi
from dessilbi.optim.fused import (
    clear_fused_cache,
    fused_cache_size,
    fused_compile_failed,
    fused_dessilbi,
)
from dessilbi.optim.proximal import group_norms
from naive_dessilbi import NaiveDessiLBI

# Tiny tensors: one intra-op thread (conftest's fixture) is faster and immune to a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")

# conv1 (3 -> 8, 3x3), conv2 (8 -> 16, 3x3) and a linear layer 64 -> 10.
CONV_SHAPES: list[tuple[int, ...]] = [(8, 3, 3, 3), (16, 8, 3, 3)]
LINEAR_SHAPES: list[tuple[int, ...]] = [(10, 64)]
STEPS = 30
HALVE_AT = 15  # the learning rate is halved here, as a step scheduler would
LR = 0.1

BASE: dict[str, Any] = {
    "kappa": 1.0,
    "nu": 1.0,
    "lam": 1.0,
    "momentum": 0.0,
    "dampening": 0.0,
    "nesterov": False,
    "weight_decay": 0.0,
    "group_scaling": "none",
}

Group = tuple[list[tuple[int, ...]], dict[str, Any]]

# Each configuration is a list of param groups: (tensor shapes, hyperparameters).
CONFIGS: dict[str, list[Group]] = {
    # The usual setting: conv filters and linear lasso in two groups, Nesterov, weight decay.
    "filter+element-nesterov-wd": [
        (
            CONV_SHAPES,
            {
                **BASE,
                "structure": "filter",
                "momentum": 0.9,
                "nesterov": True,
                "weight_decay": 1e-4,
            },
        ),
        (
            LINEAR_SHAPES,
            {
                **BASE,
                "structure": "element",
                "momentum": 0.9,
                "nesterov": True,
                "weight_decay": 1e-4,
            },
        ),
    ],
    "element-nomomentum-kappa2": [
        (CONV_SHAPES + LINEAR_SHAPES, {**BASE, "structure": "element", "kappa": 2.0}),
    ],
    "channel-sqrt_size-dampening": [
        (
            CONV_SHAPES + LINEAR_SHAPES,
            {
                **BASE,
                "structure": "channel",
                "group_scaling": "sqrt_size",
                "lam": 0.5,
                "momentum": 0.9,
                "dampening": 0.1,
            },
        ),
    ],
}


def _axis(hyper: dict[str, Any]) -> int:
    """The group axis of a structure (0 for filters and single elements, 1 for channels)."""
    return 1 if hyper["structure"] == "channel" else 0


class Run:
    """One param group's tensors and state, stepped by one implementation."""

    def __init__(
        self, shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int, axis: int = 0
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.params = []
        for shape in shapes:
            w = torch.randn(shape, generator=gen, dtype=dtype).movedim(axis, 0)
            # Groups of very different sizes along ``axis`` (the group axis), so that some enter
            # the support and others don't; group 0 stays exactly zero throughout (its
            # gradients are zero too).
            n = w.shape[0]
            w = w * torch.logspace(-3, 0, n, dtype=dtype).reshape(n, *[1] * (w.dim() - 1))
            w[0] = 0
            self.params.append(nn.Parameter(w.movedim(0, axis).contiguous()))
        self.vs = [torch.zeros_like(p) for p in self.params]
        self.gammas = [torch.zeros_like(p) for p in self.params]
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def step(self, impl: Callable[..., None], grads: list[torch.Tensor], **hyper: Any) -> None:
        with torch.no_grad():
            impl(self.params, grads, self.buffers, self.vs, self.gammas, **hyper)

    def tensors(self) -> list[torch.Tensor]:
        bufs = [b for b in self.buffers if b is not None]
        return [*(p.detach() for p in self.params), *self.vs, *self.gammas, *bufs]


def _gradients(
    shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int, axis: int = 0
) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(STEPS):
        grads = [0.1 * torch.randn(shape, generator=gen, dtype=dtype) for shape in shapes]
        for g in grads:
            g.select(axis, 0).zero_()
        steps.append(grads)
    return steps


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_fused_cache()
    yield
    clear_fused_cache()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_matches_eager_paths_without_recompiling(name: str) -> None:
    groups = CONFIGS[name]
    dtype = torch.float64
    runs = {
        key: [Run(shapes, dtype, gi, _axis(hyper)) for gi, (shapes, hyper) in enumerate(groups)]
        for key in ("fused", "single", "foreach")
    }
    impls = {
        "fused": fused_dessilbi,
        "single": single_tensor_dessilbi,
        "foreach": multi_tensor_dessilbi,
    }
    grads = [
        _gradients(shapes, dtype, 100 + gi, _axis(hyper))
        for gi, (shapes, hyper) in enumerate(groups)
    ]

    graphs_before = counters["stats"]["unique_graphs"]
    compiled: tuple[int, int] | None = None
    # A recompile limit of 1 proves that every signature (param group) owns its Dynamo cache
    # and that a new lr is no new variant: a recompilation would fail and fall back, loudly.
    with (
        torch._dynamo.config.patch(recompile_limit=1),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        for k in range(STEPS):
            lr = LR if k < HALVE_AT else LR / 2
            for gi, (_, hyper) in enumerate(groups):
                for key, impl in impls.items():
                    runs[key][gi].step(impl, grads[gi][k], lr=lr, **hyper)
            if k == 1:  # every group has compiled by now (momentum groups on their 2nd step)
                compiled = (counters["stats"]["unique_graphs"], fused_cache_size())

    assert not [w for w in caught if "fused DessiLBI" in str(w.message)]
    assert not fused_compile_failed("cpu")
    assert compiled is not None
    assert compiled[0] > graphs_before, "nothing was compiled"
    assert compiled[1] == len(groups)  # one compiled step per param group
    # Halving lr at HALVE_AT neither compiled a new graph nor a new step function.
    assert (counters["stats"]["unique_graphs"], fused_cache_size()) == compiled

    for gi, (_, hyper) in enumerate(groups):
        fused = runs["fused"][gi].tensors()
        for ref in ("single", "foreach"):
            expected = runs[ref][gi].tensors()
            assert len(fused) == len(expected)
            for got, want in zip(fused, expected, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        # Γ: finite, groups exactly zero or (group structures) without forced zeros, and the
        # run is long enough that the support is neither empty nor full.
        structure = hyper["structure"]
        for gamma in runs["fused"][gi].gammas:
            assert torch.isfinite(gamma).all()
            norms = group_norms(gamma, structure)
            assert norms[0] == 0  # the all-zero group (zero norm: no NaN)
            if structure != "element":
                selected = gamma.movedim(_axis(hyper), 0).flatten(1)[norms > 0]
                assert (selected != 0).all()
        all_norms = torch.cat([group_norms(g, structure) for g in runs["fused"][gi].gammas])
        assert 0 < int((all_norms > 0).sum()) < all_norms.numel()


def test_fused_float32_matches_foreach() -> None:
    shapes = CONV_SHAPES + LINEAR_SHAPES
    hyper = {**BASE, "structure": "filter", "momentum": 0.9}
    fused, foreach = Run(shapes, torch.float32, seed=0), Run(shapes, torch.float32, seed=0)
    # Also under "-W error": warnings from inside torch's compiler must not fail the compile.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k, grads in enumerate(_gradients(shapes, torch.float32, seed=1)[:10]):
            lr = LR if k < 5 else LR / 2
            fused.step(fused_dessilbi, grads, lr=lr, **hyper)
            foreach.step(multi_tensor_dessilbi, grads, lr=lr, **hyper)
    assert not fused_compile_failed("cpu")
    assert fused_cache_size() == 1
    for got, want in zip(fused.tensors(), foreach.tensors(), strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_uncoupled_group_matches_foreach_without_compiling() -> None:
    shapes = [(8,), (16,), (10, 4)]
    hyper = {**BASE, "structure": None, "momentum": 0.9, "weight_decay": 1e-3}
    fused, foreach = Run(shapes, torch.float64, seed=0), Run(shapes, torch.float64, seed=0)
    for grads in _gradients(shapes, torch.float64, seed=1)[:3]:
        fused.step(fused_dessilbi, grads, lr=LR, **hyper)
        foreach.step(multi_tensor_dessilbi, grads, lr=LR, **hyper)
    assert fused_cache_size() == 0
    for got, want in zip(fused.tensors(), foreach.tensors(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compile_failure_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def broken_compile(fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
        def run(*args: Any) -> None:
            calls.append(fn)
            raise RuntimeError("no C++ compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    groups = CONFIGS["filter+element-nesterov-wd"]
    dtype = torch.float64
    fused = [Run(shapes, dtype, seed=gi) for gi, (shapes, _) in enumerate(groups)]
    single = [Run(shapes, dtype, seed=gi) for gi, (shapes, _) in enumerate(groups)]
    grads = [_gradients(shapes, dtype, seed=100 + gi) for gi, (shapes, _) in enumerate(groups)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(6):
            for gi, (_, hyper) in enumerate(groups):
                fused[gi].step(fused_dessilbi, grads[gi][k], lr=LR, **hyper)
                single[gi].step(single_tensor_dessilbi, grads[gi][k], lr=LR, **hyper)

    messages = [str(w.message) for w in caught if "fused DessiLBI" in str(w.message)]
    assert len(messages) == 1
    assert "no C++ compiler here" in messages[0]
    assert issubclass(
        next(w.category for w in caught if "fused DessiLBI" in str(w.message)), RuntimeWarning
    )
    assert len(calls) == 1  # the failure is remembered, not retried every step
    assert fused_compile_failed("cpu")
    assert fused_cache_size() == 0
    for gi in range(len(groups)):
        for got, want in zip(fused[gi].tensors(), single[gi].tensors(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_optimizer_option_fused_selects_the_compiled_path() -> None:
    """``DessiLBI(..., fused=True)`` runs the compiled step and tracks the per-tensor path."""
    from dessilbi import DessiLBI, structured_param_groups

    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Conv2d(2, 6, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 16, 3))
            for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    for net in nets:
        net.double()
    fused = DessiLBI(structured_param_groups(nets[0]), lr=0.1, nu=2, momentum=0.9, fused=True)
    plain = DessiLBI(structured_param_groups(nets[1]), lr=0.1, nu=2, momentum=0.9, foreach=False)
    x = torch.randn(8, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    before = fused_cache_size()
    for _ in range(12):
        for net, opt in ((nets[0], fused), (nets[1], plain)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    assert fused_cache_size() > before, "the compiled path was not used"
    for (name, p), q in zip(nets[0].named_parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
        if "gamma" in fused.state[p]:
            torch.testing.assert_close(fused.state[p]["gamma"], plain.state[q]["gamma"],
                                       rtol=1e-10, atol=1e-12)
            assert torch.equal(fused.state[p]["gamma"] != 0, plain.state[q]["gamma"] != 0)


# ---------------------------------------------------------------------------------------------
# the fused path through the optimizer, against the literal oracle of DESIGN.md section 1


class BranchNet(nn.Module):
    """conv1 3→8 → tanh → conv2a 8→8 (+ conv2b 8→8 when ``use_b``) → tanh → fc 32→3.

    conv2b is left out of the forward on some steps: its gradients are None there.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2a = nn.Conv2d(8, 8, 3)
        self.conv2b = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8 * 2 * 2, 3)

    def forward(self, x: torch.Tensor, use_b: bool = True) -> torch.Tensor:
        h = torch.tanh(self.conv1(x))
        z = self.conv2a(h)
        if use_b:
            z = z + self.conv2b(h)
        return self.fc(torch.tanh(z).flatten(1))


ORACLE_STEPS = 16
# Every coupled group gets momentum, Nesterov and weight decay.
ORACLE_SHARED: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}


def branch_groups(net: BranchNet) -> list[dict[str, Any]]:
    """Filter groups over conv1 and conv2b, channel groups over conv2a (with ``sqrt_size``),
    the fc weight under the element structure, the biases uncoupled."""
    return [
        {"params": [net.conv1.weight, net.conv2b.weight], "structure": "filter", "lam": 0.8,
         "nu": 0.5, **ORACLE_SHARED},
        {"params": [net.conv2a.weight], "structure": "channel", "group_scaling": "sqrt_size",
         "lam": 0.2, "nu": 0.5, **ORACLE_SHARED},
        {"params": [net.fc.weight], "structure": "element", "lam": 0.3, "nu": 1.0,
         **ORACLE_SHARED},
        {"params": [m.bias for m in (net.conv1, net.conv2a, net.conv2b, net.fc)],
         "structure": None, **ORACLE_SHARED},
    ]


def make_branch_net(memory_format: torch.memory_format) -> BranchNet:
    """A float64 BranchNet whose coupled groups differ in size by orders of magnitude (so some
    enter the support within the run and others don't), conv weights in ``memory_format``."""
    torch.manual_seed(0)
    net = BranchNet().double()
    with torch.no_grad():
        for weight, axis in ((net.conv1.weight, 0), (net.conv2b.weight, 0), (net.conv2a.weight, 1)):
            n = weight.shape[axis]
            scale = torch.logspace(-2, 0.7, n, dtype=torch.float64)
            weight.mul_(scale.reshape([n if d == axis else 1 for d in range(weight.dim())]))
        net.fc.weight.mul_(torch.linspace(0.1, 6.0, 32, dtype=torch.float64))
    for conv in (net.conv1, net.conv2a, net.conv2b):
        conv.weight.data = conv.weight.data.to(memory_format=memory_format)
    return net


def branch_grads(net: BranchNet, x: torch.Tensor, y: torch.Tensor, k: int) -> None:
    """Gradients of step ``k``: conv2b unused on every third step (from step 0, so its first
    gradient comes late), fc.weight's gradient dropped by hand on steps 2, 7, 12."""
    net.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(net(x, use_b=k % 3 != 0), y).backward()
    if k % 5 == 2:
        net.fc.weight.grad = None


def assert_matches_oracle(
    net: BranchNet, opt: DessiLBI, ref: BranchNet, oracle: NaiveDessiLBI, step: int
) -> None:
    for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=f"W of {name}, step {step}")
        state, ref_state = opt.state.get(p, {}), oracle.state.get(q, {})
        assert set(state) == set(ref_state), f"state keys of {name}, step {step}"
        for key, value in ref_state.items():
            torch.testing.assert_close(
                state[key], value, rtol=1e-10, atol=1e-12, msg=f"{key} of {name}, step {step}"
            )
        if "gamma" in ref_state:
            assert torch.equal(state["gamma"] != 0, ref_state["gamma"] != 0), name


@pytest.mark.parametrize(
    "memory_format", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "nhwc"]
)
def test_fused_optimizer_matches_oracle(memory_format: torch.memory_format) -> None:
    """``DessiLBI(..., fused=True)`` follows the oracle step by step (W, V, Γ, momentum buffers;
    rtol 1e-10) under the filter, channel and element structures with Nesterov momentum and
    weight decay, with gradients that are None on some steps, and with channels-last conv
    weights. A parameter without a gradient is skipped entirely, also while the rest of its
    group runs the compiled step: its W, V, Γ and momentum buffer stay bitwise as they were."""
    net = make_branch_net(memory_format)
    ref = copy.deepcopy(net)
    opt = DessiLBI(branch_groups(net), fused=True)
    oracle = NaiveDessiLBI(branch_groups(ref))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=gen)
    convs = [net.conv1.weight, net.conv2a.weight, net.conv2b.weight]
    skipped_with_state = 0  # steps on which conv2b, with V, Γ and a buffer, had no gradient
    for k in range(ORACLE_STEPS):
        branch_grads(net, x, y, k)
        branch_grads(ref, x, y, k)
        for w in convs:
            assert w.is_contiguous(memory_format=memory_format)
            assert w.grad is None or w.grad.is_contiguous(memory_format=memory_format)
        idle = [p for p in net.parameters() if p.grad is None]
        before = {id(p): [p.clone(), *(t.clone() for t in opt.state[p].values())] for p in idle}
        skipped_with_state += any(p is net.conv2b.weight for p in idle) and bool(
            opt.state[net.conv2b.weight]
        )
        opt.step()
        oracle.step()
        for p in idle:
            after = [p, *opt.state[p].values()]
            assert all(torch.equal(a, b) for a, b in zip(after, before[id(p)], strict=True))
        assert_matches_oracle(net, opt, ref, oracle, k)

    assert not fused_compile_failed("cpu")
    # filter (conv1 + conv2b), filter (conv1 alone: the steps without conv2b's gradient ran
    # compiled), channel and element: four signatures.
    assert fused_cache_size() == 4
    assert skipped_with_state == 5  # steps 3, 6, 9, 12 and 15
    for w in convs:  # V, Γ and the buffer keep the weights' layout
        assert all(t.is_contiguous(memory_format=memory_format) for t in opt.state[w].values())
    # The run is informative: in every coupled group some groups of Γ are selected, some not.
    for group in opt.param_groups[:3]:
        norms = torch.cat([group_norms(opt.state[p]["gamma"], group["structure"])
                           for p in group["params"]])
        assert 0 < int((norms > 0).sum()) < norms.numel(), group["structure"]


def test_optim_imports_go_one_way() -> None:
    """proximal <- functional <- fused <- optimizer: no module imports one after it (the fused
    module used to import the optimizer's foreach step while the optimizer imported it back)."""
    import ast
    from pathlib import Path

    import dessilbi.optim

    order = ["proximal", "functional", "fused", "optimizer"]
    root = Path(dessilbi.optim.__file__).parent
    for i, name in enumerate(order):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {
            node.module.rsplit(".", 1)[-1]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and node.module is not None
            and node.module.startswith("dessilbi")
        }
        assert imported <= set(order[:i]), f"{name} imports {imported - set(order[:i])}"
