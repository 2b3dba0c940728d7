"""The scientific claims of DESIGN.md section 1 ("Facts that follow"), checked on problems where
they are known to hold.

(a), (b): on sparse linear regression with full-batch gradients the Γ path is the linearised
Bregman (inverse scale space) path: Γ starts at exactly zero, the support grows from empty, the
planted coefficients enter first (larger ones earlier) and the estimate on the support is not
shrunk the way a lasso estimate is.
(c): on a small CNN the loss decreases while only some filters get selected.
(d): at a fixed point with a group selected, W_g = Γ_g and ‖V_g‖ = λ_g + ‖W_g‖/κ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import lars_path

from dessilbi import DessiLBI, selected_groups, structured_param_groups
from dessilbi.models import build_model
from dessilbi.optim.proximal import group_norms

F64 = torch.float64


@dataclass
class Regression:
    x: torch.Tensor
    y: torch.Tensor
    w_star: torch.Tensor
    support: list[int]

    @property
    def lipschitz(self) -> float:
        """Largest eigenvalue of XᵀX/n: the Lipschitz constant of ∇L."""
        n = self.x.shape[0]
        return float(torch.linalg.eigvalsh(self.x.T @ self.x / n).max())

    def gradient(self, w: torch.Tensor) -> torch.Tensor:
        """∇L(w) for L(w) = ‖y − Xw‖²/(2n), full batch."""
        n = self.x.shape[0]
        return self.x.T @ (self.x @ w - self.y) / n

    def refit(self) -> torch.Tensor:
        """Least squares on the true support only (the unbiased "oracle" estimate)."""
        return torch.linalg.lstsq(self.x[:, self.support], self.y).solution


def planted_regression(
    seed: int, support: list[int], values: list[float], n: int = 200, p: int = 50
) -> Regression:
    """n = 200 samples, p = 50 features with i.i.d. N(0, 1) entries and columns scaled to
    ‖x_j‖² = n: with n ≫ log p the columns are nearly orthogonal (incoherent; XᵀX/n ≈ I, its
    largest eigenvalue ≈ (1 + sqrt(p/n))² ≈ 2.1). Five planted coefficients of clearly different
    sizes and noise σ = 0.5, so the noise's correlation with any column (≈ σ/sqrt(n) ≈ 0.04) is
    two orders of magnitude below the signal: the regime where the true variables enter first.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=gen, dtype=F64)
    x = x / x.norm(dim=0, keepdim=True) * math.sqrt(n)
    w_star = torch.zeros(p, dtype=F64)
    w_star[support] = torch.tensor(values, dtype=F64)
    y = x @ w_star + 0.5 * torch.randn(n, generator=gen, dtype=F64)
    return Regression(x, y, w_star, list(support))


@dataclass
class LbiPath:
    w: torch.Tensor
    gamma: torch.Tensor
    v: torch.Tensor
    entry: list[int | None]  # first step (0-based) at which each coordinate's Γ was nonzero
    sizes: list[int]  # support size of Γ after each step
    first_entry_v: torch.Tensor  # V just before the first coordinate entered


def run_lbi(
    problem: Regression, lr: float, nu: float, lam: float, steps: int, kappa: float = 1.0
) -> LbiPath:
    """Full-batch DessiLBI (element structure, no momentum) from W = 0, recording the path."""
    p = problem.x.shape[1]
    w = torch.zeros(p, dtype=F64, requires_grad=True)
    opt = DessiLBI([w], lr=lr, nu=nu, lam=lam, kappa=kappa, structure="element")
    entry: list[int | None] = [None] * p
    sizes = []
    first_entry_v = torch.zeros(p, dtype=F64)
    for step in range(steps):
        w.grad = problem.gradient(w.detach())
        opt.step()
        gamma = opt.state[w]["gamma"]
        nonzero = (gamma != 0).tolist()
        if not any(nonzero):
            first_entry_v = opt.state[w]["v"].clone()
        for j, on in enumerate(nonzero):
            if on and entry[j] is None:
                entry[j] = step
        sizes.append(sum(nonzero))
    state = opt.state[w]
    return LbiPath(w.detach().clone(), state["gamma"], state["v"], entry, sizes, first_entry_v)


def entry_order(path: LbiPath) -> list[int]:
    entered = [(step, j) for j, step in enumerate(path.entry) if step is not None]
    return [j for _, j in sorted(entered)]


PLANTED = [4.0, -3.5, 3.0, -2.5, 2.0]
LR, NU, LAM, STEPS = 0.1, 1.0, 10.0, 1000


@pytest.fixture(scope="module")
def problem() -> Regression:
    return planted_regression(0, [0, 1, 2, 3, 4], PLANTED)


@pytest.fixture(scope="module")
def path(problem: Regression) -> LbiPath:
    # α·κ·(Lip + 1/ν) = 0.1·(2.06 + 1) ≈ 0.31 < 2: inside the convergence condition.
    # An unselected coordinate's V grows by ≈ (α/ν)·W_j per step and W_j ≈ w*_j/2 (ridge with
    # penalty 1/ν = 1 on a near-identity Gram matrix), so it enters after about
    # λν/(α·|w*_j|/2) = 200/|w*_j| steps: 50 to 100 steps for the planted ones, thousands for
    # the noise-level ones (|W_j| ≈ 0.04). 1000 steps sit in between.
    return run_lbi(problem, LR, NU, LAM, STEPS)


def test_step_size_inside_convergence_condition(problem: Regression) -> None:
    """The instance uses a step 0 < α < 2/(κ(Lip + 1/ν)), the paper's convergence condition."""
    assert LR * 1.0 * (problem.lipschitz + 1 / NU) < 2
    assert 1.5 < problem.lipschitz < 3.0  # near-orthogonal design, (1 + sqrt(50/200))² = 2.25


def test_gamma_starts_at_zero_and_support_grows(path: LbiPath) -> None:
    """Γ is exactly 0 at the start (support empty at the first recorded step, and for many steps
    although V is already nonzero: only crossing λ selects); the support then grows
    monotonically to exactly the 5 planted coefficients."""
    assert path.sizes[0] == 0
    first = next(i for i, size in enumerate(path.sizes) if size > 0)
    assert first > 20
    assert bool((path.first_entry_v != 0).all())  # V moved, Γ stayed exactly 0
    assert float(path.first_entry_v.abs().max()) <= LAM
    assert all(a <= b for a, b in zip(path.sizes, path.sizes[1:], strict=False))
    assert path.sizes[-1] == 5


def test_planted_coefficients_enter_first(path: LbiPath, problem: Regression) -> None:
    """The first five coordinates to enter the support are exactly the planted ones, and no other
    coordinate has entered by the end of the run."""
    order = entry_order(path)
    assert sorted(order[:5]) == problem.support
    assert len(order) == 5


def test_estimate_on_support_is_accurate_and_unbiased(path: LbiPath, problem: Regression) -> None:
    """At the end Γ on the support is within 10% of the truth and W = Γ there (the fixed point);
    Γ_S matches the least-squares refit on the true support, whereas the lasso at the largest
    penalty that selects exactly this support is shrunk toward zero by ≈ its penalty."""
    s = problem.support
    gamma_s = path.gamma[s]
    rel = (gamma_s - problem.w_star[s]).abs() / problem.w_star[s].abs()
    assert float(rel.max()) < 0.1
    torch.testing.assert_close(path.w[s], gamma_s, rtol=0, atol=1e-6)
    refit = problem.refit()
    lbi_bias = (gamma_s - refit).abs()
    assert float(lbi_bias.max()) < 0.03

    # Lasso: sklearn's LARS path for ‖y − Xw‖²/(2n) + α‖w‖₁; at the knot where a 6th variable
    # is about to enter, the active set is the planted support.
    alphas, _, coefs = lars_path(problem.x.numpy(), problem.y.numpy(), method="lasso")
    knot = next(i for i in range(coefs.shape[1]) if np.count_nonzero(coefs[:, i]) == 5)
    lasso = torch.from_numpy(coefs[:, knot].copy())
    assert sorted(np.flatnonzero(coefs[:, knot]).tolist()) == s
    lasso_shrink = refit.abs() - lasso[s].abs()
    assert float(lasso_shrink.min()) > 0.5 * float(alphas[knot])  # lasso: shrunk by ~α
    assert float(lbi_bias.max()) < 0.3 * float(lasso_shrink.min())  # LBI: much less


def test_larger_nu_or_lam_gives_sparser_support(problem: Regression) -> None:
    """Entry needs V_j to cross λ while V grows at rate α/ν: doubling ν or λ delays every entry,
    so at any fixed step the support is no larger, and strictly smaller mid-path."""
    base = run_lbi(problem, LR, NU, LAM, 200)
    for slower in (run_lbi(problem, LR, 2 * NU, LAM, 200), run_lbi(problem, LR, NU, 2 * LAM, 200)):
        assert all(a >= b for a, b in zip(base.sizes, slower.sizes, strict=True))
        assert slower.sizes[99] < base.sizes[99]
        for j in problem.support:
            assert (slower.entry[j] or 10**9) > (base.entry[j] or 0)


def test_entry_order_follows_coefficient_size() -> None:
    """(b) Larger planted coefficients enter earlier. Another seed, planted at scattered indices
    with the sizes in shuffled order, so the order cannot come from the indices."""
    support = [7, 19, 3, 42, 30]
    values = [2.0, 4.0, -2.5, 3.0, -3.5]
    problem = planted_regression(1, support, values)
    path = run_lbi(problem, LR, NU, LAM, 400)
    by_size = [j for _, j in sorted(zip([-abs(v) for v in values], support, strict=True))]
    assert entry_order(path)[:5] == by_size == [19, 30, 42, 3, 7]
    steps = [path.entry[j] for j in by_size]
    assert all(isinstance(step, int) for step in steps)
    assert steps == sorted(steps) and len(set(steps)) == 5  # strictly increasing


pytestmark = pytest.mark.usefixtures("one_thread")


def test_small_cnn_loss_decreases_with_sparse_filters() -> None:
    """(c) small_cnn on 128 real 8x8 digits, full batch, 100 DessiLBI steps with the structured
    groups (conv filters, linear elements): the loss falls far below its initial value while only
    some filters of every conv layer are selected."""
    digits = load_digits()
    x = torch.tensor(digits.images[:128], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target[:128])
    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1, image_size=8)
    opt = DessiLBI(structured_param_groups(model), lr=0.1, momentum=0.9, nu=10.0, lam=1.0)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0]
    counts = selected_groups(model, opt)
    for name in ("conv1.weight", "conv2.weight", "conv3.weight"):
        selected, total = counts[name]
        assert 0 < selected < total, (name, selected, total)
        gamma = opt.state[model.get_parameter(name)]["gamma"]
        assert int((group_norms(gamma, "filter") > 0).sum()) == selected


def test_group_fixed_point() -> None:
    """(d) Noiseless regression with W of shape (3, 2) under filter (row) groups, κ = 2: the run
    converges to W = w* = [[3, −2], [1.5, 1], [0, 0]]; for the two selected groups W_g = Γ_g and
    ‖V_g‖ = λ + ‖W_g‖/κ (the prox inverted), while the zero group stays unselected with
    ‖V_g‖ < λ."""
    gen = torch.Generator().manual_seed(1)
    n = 100
    x = torch.randn(n, 6, generator=gen, dtype=F64)
    x = x / x.norm(dim=0, keepdim=True) * math.sqrt(n)
    w_star = torch.tensor([[3.0, -2.0], [1.5, 1.0], [0.0, 0.0]], dtype=F64)
    y = x @ w_star.flatten()
    lr, kappa, nu, lam = 0.2, 2.0, 1.0, 1.0
    lip = float(torch.linalg.eigvalsh(x.T @ x / n).max())
    assert lr * kappa * (lip + 1 / nu) < 2

    w = torch.zeros(3, 2, dtype=F64, requires_grad=True)
    opt = DessiLBI([w], lr=lr, kappa=kappa, nu=nu, lam=lam, structure="filter")
    for _ in range(600):
        w.grad = (x.T @ (x @ w.detach().flatten() - y) / n).reshape(3, 2)
        opt.step()
    gamma, v = opt.state[w]["gamma"], opt.state[w]["v"]
    torch.testing.assert_close(w.detach(), w_star, rtol=0, atol=1e-8)
    torch.testing.assert_close(gamma[:2], w.detach()[:2], rtol=0, atol=1e-8)
    v_norms = v.norm(dim=1)
    w_norms = w.detach().norm(dim=1)
    torch.testing.assert_close(v_norms[:2], lam + w_norms[:2] / kappa, rtol=1e-8, atol=1e-8)
    assert torch.equal(gamma[2], torch.zeros(2, dtype=F64))
    assert 0 < float(v_norms[2]) < lam
