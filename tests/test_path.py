"""Read-outs along the path (``dessilbi.path``) against quantities computed here from the
optimizer state by hand: supports, selected groups, group norms, and the sparse-weights swap."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dessilbi import (
    DessiLBI,
    coupled_tensors,
    group_support,
    selected_groups,
    sparse_weights,
    support_masks,
    weight_group_norms,
)
from nets import Net

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")




STRUCTURE_OF = {"conv.weight": "filter", "fc1.weight": "channel", "fc2.weight": "element"}


def setup(steps: int) -> tuple[Net, DessiLBI]:
    """conv filters, fc1 input channels and fc2 elements coupled; biases uncoupled. λ values
    chosen so that after 25 steps each coupled tensor has some but not all groups selected."""
    torch.manual_seed(0)
    model = Net().to(F64)
    opt = DessiLBI(
        [
            {"params": [model.conv.weight], "structure": "filter", "lam": 0.6},
            {"params": [model.fc1.weight], "structure": "channel", "lam": 0.2},
            {"params": [model.fc2.weight], "structure": "element", "lam": 0.1},
            {"params": [model.conv.bias, model.fc1.bias, model.fc2.bias], "structure": None},
        ],
        lr=0.1,
        nu=2.0,
        momentum=0.9,
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 2, 6, 6, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (24,), generator=gen)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def literal_group_norms(t: torch.Tensor, structure: str) -> torch.Tensor:
    """‖t_g‖₂ per group by explicit slicing (|t| per entry for elements)."""
    t = t.detach()
    if structure == "element":
        return t.abs().flatten()
    if structure == "filter":
        return torch.stack([t[i].pow(2).sum().sqrt() for i in range(t.shape[0])])
    return torch.stack([t[:, j].pow(2).sum().sqrt() for j in range(t.shape[1])])


def test_before_any_step_nothing_is_selected() -> None:
    """Γ₀ = 0: before the first step every read-out reports zero selected groups."""
    model, opt = setup(0)
    assert selected_groups(model, opt) == {
        "conv.weight": (0, 8),
        "fc1.weight": (0, 128),
        "fc2.weight": (0, 36),
    }
    for name, mask in support_masks(model, opt).items():
        assert mask.dtype == torch.bool and mask.shape == model.get_parameter(name).shape
        assert not mask.any()
    assert all(not s.any() for s in group_support(model, opt).values())
    with sparse_weights(model, opt):
        for name in STRUCTURE_OF:
            assert not model.get_parameter(name).any()  # W̃ = W ⊙ 0
        assert model.fc1.bias.any()


def test_read_outs_match_optimizer_state() -> None:
    """support_masks is Γ ≠ 0 from optimizer.state; selected_groups counts groups with
    ‖Γ_g‖ > 0 (computed here by slicing); group_support and weight_group_norms match literal
    computations; only coupled tensors are reported, in named_parameters order."""
    model, opt = setup(25)
    masks = support_masks(model, opt)
    assert list(masks) == ["conv.weight", "fc1.weight", "fc2.weight"]
    selected = selected_groups(model, opt)
    supports = group_support(model, opt)
    norms = weight_group_norms(model, opt)
    for name, structure in STRUCTURE_OF.items():
        p = model.get_parameter(name)
        gamma = opt.state[p]["gamma"]
        assert torch.equal(masks[name], gamma != 0)
        gamma_norms = literal_group_norms(gamma, structure)
        n_selected = int((gamma_norms > 0).sum())
        assert selected[name] == (n_selected, gamma_norms.numel())
        assert 0 < n_selected < gamma_norms.numel(), name  # an informative state
        assert torch.equal(supports[name], gamma_norms > 0)
        torch.testing.assert_close(
            norms[name], literal_group_norms(p, structure), rtol=1e-14, atol=0
        )
    found = coupled_tensors(model, opt)
    assert [t.name for t in found] == list(STRUCTURE_OF)
    assert [t.structure for t in found] == list(STRUCTURE_OF.values())
    assert all(t.weight is model.get_parameter(t.name) for t in found)


def test_sparse_weights_swaps_and_restores() -> None:
    """Inside ``sparse_weights`` each coupled W equals W ⊙ 1[Γ ≠ 0] and uncoupled parameters are
    unchanged; the model's output changes; after the block W is bitwise the dense W again."""
    model, opt = setup(25)
    x = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    dense_out = model(x).detach()
    with sparse_weights(model, opt) as inner:
        assert inner is model
        for name, p in model.named_parameters():
            if name in STRUCTURE_OF:
                gamma = opt.state[p]["gamma"]
                assert torch.equal(p, dense[name] * (gamma != 0))
                assert bool((p == 0).any()) and bool((p != 0).any())
            else:
                assert torch.equal(p, dense[name])
        assert not torch.allclose(model(x), dense_out)
    for name, p in model.named_parameters():
        assert torch.equal(p, dense[name])
    assert torch.equal(model(x).detach(), dense_out)


def test_sparse_weights_restores_after_exception() -> None:
    """An exception inside the block propagates and the dense weights are still restored."""
    model, opt = setup(10)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"), sparse_weights(model, opt):
        assert not torch.equal(model.conv.weight, dense["conv.weight"])
        raise RuntimeError("boom")
    for name, p in model.named_parameters():
        assert torch.equal(p, dense[name])


def test_sparse_weights_keeps_training_identical() -> None:
    """Evaluating the sparse model between steps does not perturb the run: the trajectory with
    a ``sparse_weights`` evaluation after every step is bitwise the plain one."""
    model_a, opt_a = setup(0)
    model_b, opt_b = setup(0)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 2, 6, 6, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (16,), generator=gen)
    for _ in range(8):
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        with torch.no_grad(), sparse_weights(model_b, opt_b):
            model_b(x)
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_wrapped_model_names() -> None:
    """Read-outs on a DDP-style wrapped model use the wrapper's names ("module." prefix) and the
    same values."""
    model, opt = setup(25)

    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    wrapped = Wrapper(model)
    plain = selected_groups(model, opt)
    assert selected_groups(wrapped, opt) == {f"module.{k}": v for k, v in plain.items()}
