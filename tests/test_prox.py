"""The proximal maps of ``dessilbi.optim.proximal`` against closed forms (DESIGN.md section 1).

Γ = κ·prox(V) decides which groups are selected, so exact zeros matter as much as the values:
a group at or under its threshold must come out as exact 0.0 (never a tiny number, never NaN).
"""

from __future__ import annotations

import math

import pytest
import torch

from dessilbi.optim.proximal import (
    check_structure,
    group_axis,
    group_norms,
    group_size,
    group_threshold,
    prox,
)
from naive_dessilbi import naive_prox

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def literal_group_prox(v: torch.Tensor, axis: int, lam: float, kappa: float) -> torch.Tensor:
    """max(0, 1 − λ/‖v_g‖)·v_g per group, written with an explicit norm over the other dims."""
    other = tuple(d for d in range(v.dim()) if d != axis)
    norms = (v**2).sum(dim=other, keepdim=True).sqrt()
    factor = torch.where(norms > lam, 1.0 - lam / torch.where(norms > 0, norms, 1.0), 0.0)
    return kappa * factor * v


# ---------------------------------------------------------------------------------------------
# element structure: soft thresholding


def test_soft_thresholding_on_hand_picked_numbers() -> None:
    """sign(v)·max(|v| − λ, 0) with λ = 1, checked entry by entry against numbers done by hand.

    Entries exactly at ±λ and inside (−λ, λ) must become exact zeros.
    """
    v = torch.tensor([3.0, -2.5, 0.5, -0.5, 1.0, -1.0, 0.0, 1.25, -7.0], dtype=F64)
    expected = torch.tensor([2.0, -1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25, -6.0], dtype=F64)
    out = prox(v, "element", 1.0)
    assert torch.equal(out, expected)
    assert int((out == 0).sum()) == 5


def test_soft_thresholding_kappa_and_out() -> None:
    """κ scales the result (Γ = κ·prox(V)) and ``out=`` receives the result in place."""
    v = torch.tensor([[3.0, -2.5], [0.5, -4.0]], dtype=F64)
    out = torch.full_like(v, 123.0)
    ret = prox(v, "element", 2.0, kappa=4.0, out=out)
    assert ret.data_ptr() == out.data_ptr()
    assert torch.equal(out, torch.tensor([[4.0, -2.0], [0.0, -8.0]], dtype=F64))
    # v itself is not modified
    assert torch.equal(v, torch.tensor([[3.0, -2.5], [0.5, -4.0]], dtype=F64))


def test_soft_thresholding_random_against_formula() -> None:
    """Random entries: the result equals the literal formula, entries under λ are exact zeros."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(7, 5, 3, generator=gen, dtype=F64)
    lam = 0.7
    expected = torch.sign(v) * torch.clamp(v.abs() - lam, min=0.0)
    out = prox(v, "element", lam)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    assert torch.equal(out == 0, v.abs() <= lam)
    assert 0 < int((out == 0).sum()) < v.numel()


def test_lam_zero_is_identity_times_kappa() -> None:
    """λ = 0 leaves V unshrunk (Γ = κ·V) for every structure, zero groups included, no NaN."""
    v = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    v[1] = 0.0
    v[:, 2] = 0.0
    for structure in ("element", "filter", "channel"):
        out = prox(v, structure, 0.0, kappa=1.5)
        assert not out.isnan().any()
        torch.testing.assert_close(out, 1.5 * v, rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------
# group structures


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 4), (6, 5, 3, 3)])
@pytest.mark.parametrize("structure", ["filter", "channel"])
@pytest.mark.parametrize("kappa", [1.0, 2.5])
def test_group_prox_against_literal_formula(
    shape: tuple[int, ...], structure: str, kappa: float
) -> None:
    """Filter (dim 0) and channel (dim 1) groups on 2-D, 3-D and 4-D tensors.

    The groups are given very different scales so that the threshold splits them: some groups
    are zeroed, some shrunk. Checked against an explicit-norm formula and the loop oracle.
    """
    gen = torch.Generator().manual_seed(len(shape) * 10 + (structure == "channel"))
    axis = 0 if structure == "filter" else 1
    v = torch.randn(*shape, generator=gen, dtype=F64)
    scale_shape = [1] * len(shape)
    scale_shape[axis] = shape[axis]
    scales = torch.linspace(0.05, 2.0, shape[axis], dtype=F64).reshape(scale_shape)
    v = v * scales
    size = math.prod(shape) // shape[axis]
    lam = 0.5 * math.sqrt(size)  # between the smallest and the largest group norm
    out = prox(v, structure, lam, kappa=kappa)
    torch.testing.assert_close(out, literal_group_prox(v, axis, lam, kappa), rtol=1e-13, atol=0)
    torch.testing.assert_close(out, naive_prox(v, structure, lam, kappa), rtol=1e-13, atol=0)

    other = tuple(d for d in range(len(shape)) if d != axis)
    out_norms = out.abs().sum(dim=other)
    in_norms = (v**2).sum(dim=other).sqrt()
    zeroed = out_norms == 0
    assert torch.equal(zeroed, in_norms <= lam)
    assert 0 < int(zeroed.sum()) < shape[axis], "the test instance must split the groups"
    # Surviving groups are shrunk by exactly λ in norm (times κ): ‖Γ_g‖ = κ(‖V_g‖ − λ).
    out_l2 = (out**2).sum(dim=other).sqrt()
    torch.testing.assert_close(
        out_l2[~zeroed], kappa * (in_norms[~zeroed] - lam), rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize("structure", ["filter", "channel"])
def test_zero_norm_and_at_threshold_groups_are_exact_zero(structure: str) -> None:
    """An all-zero group and a group with ‖V_g‖ exactly λ give exact 0.0 and no NaN/Inf.

    ``[3, 4]`` has norm exactly 5 in floating point, so λ = 5 sits exactly on the threshold.
    """
    # filter groups (rows) with norms 5, 0 and 10; the channel case uses the transpose
    base = torch.tensor([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]], dtype=F64)
    v = base if structure == "filter" else base.t().contiguous()
    for dtype in (torch.float64, torch.float32):
        out = prox(v.to(dtype), structure, 5.0)
        assert torch.isfinite(out).all()
        expected = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]], dtype=dtype)
        expected = expected if structure == "filter" else expected.t()
        assert torch.equal(out, expected)
    # a tensor with every group zero and a positive threshold
    zeros = torch.zeros(3, 4, 2, dtype=F64)
    out = prox(zeros, structure, 0.3, kappa=2.0)
    assert torch.equal(out, zeros)
    assert not out.isnan().any()


def test_group_prox_tiny_norm_is_zero_not_nan() -> None:
    """A group whose norm underflows (1e-200 entries, squares underflow to 0) gives 0, not NaN."""
    v = torch.tensor([[1e-200, -1e-200], [3.0, 4.0]], dtype=F64)
    out = prox(v, "filter", 1e-3)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(2, dtype=F64))


def test_sqrt_size_threshold() -> None:
    """``group_scaling="sqrt_size"``: λ_g = λ·sqrt(group size); "none": λ_g = λ.

    Group sizes: filter groups of a (4, 3, 2, 2) tensor have 3·2·2 = 12 entries, channel groups
    4·2·2 = 16, elements 1.
    """
    shape = (4, 3, 2, 2)
    assert group_size("filter", shape) == 12
    assert group_size("channel", shape) == 16
    assert group_size("element", shape) == 1
    assert group_threshold(0.5, "filter", shape, "sqrt_size") == pytest.approx(0.5 * math.sqrt(12))
    assert group_threshold(0.5, "channel", shape, "sqrt_size") == 2.0
    assert group_threshold(0.5, "element", shape, "sqrt_size") == 0.5
    for structure in ("element", "filter", "channel"):
        assert group_threshold(0.5, structure, shape, "none") == 0.5


def test_sqrt_size_changes_selection() -> None:
    """A filter group of 4 entries with norm 1.5 survives λ = 1 but not λ·sqrt(4) = 2."""
    v = torch.tensor([[0.75, 0.75, 0.75, 0.75], [2.0, 2.0, 2.0, 2.0]], dtype=F64)  # norms 1.5, 4
    lam_none = group_threshold(1.0, "filter", v.shape, "none")
    lam_sqrt = group_threshold(1.0, "filter", v.shape, "sqrt_size")
    out_none = prox(v, "filter", lam_none)
    out_sqrt = prox(v, "filter", lam_sqrt)
    torch.testing.assert_close(out_none[0], v[0] * (1 - 1 / 1.5), rtol=1e-15, atol=0)
    assert torch.equal(out_sqrt[0], torch.zeros(4, dtype=F64))
    torch.testing.assert_close(out_sqrt[1], v[1] * 0.5, rtol=1e-15, atol=0)


@pytest.mark.parametrize("structure", ["element", "filter", "channel"])
def test_kappa_scales_linearly(structure: str) -> None:
    """prox(V; κ) = κ·prox(V; 1) with the same zero pattern."""
    v = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    base = prox(v, structure, 1.0)
    for kappa in (0.25, 3.0):
        scaled = prox(v, structure, 1.0, kappa=kappa)
        torch.testing.assert_close(scaled, kappa * base, rtol=1e-14, atol=0)
        assert torch.equal(scaled == 0, base == 0)


def test_group_norms_and_axes() -> None:
    """``group_norms`` is ‖t_g‖₂ per group (|t| flattened for elements); axes 0 / 1."""
    t = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert group_axis("filter") == 0
    assert group_axis("channel") == 1
    with pytest.raises(ValueError):
        group_axis("element")
    filt = torch.tensor([math.sqrt(float((t[i] ** 2).sum())) for i in range(3)], dtype=F64)
    chan = torch.tensor([math.sqrt(float((t[:, j] ** 2).sum())) for j in range(4)], dtype=F64)
    torch.testing.assert_close(group_norms(t, "filter"), filt, rtol=1e-14, atol=0)
    torch.testing.assert_close(group_norms(t, "channel"), chan, rtol=1e-14, atol=0)
    assert torch.equal(group_norms(t, "element"), t.abs().flatten())


def test_check_structure() -> None:
    """Known structures fit; group structures need >= 2 dims; unknown names are rejected."""
    for structure in (None, "element", "filter", "channel"):
        check_structure(structure, (3, 4))
    check_structure("element", (5,))
    check_structure(None, (5,))
    for structure in ("filter", "channel"):
        with pytest.raises(ValueError, match="structure") as info:
            check_structure(structure, (5,))
        assert repr(structure) in str(info.value)
    with pytest.raises(ValueError, match="'rows'"):
        check_structure("rows", (3, 4))


@pytest.mark.parametrize("structure", ["filter", "channel"])
def test_groups_under_threshold_are_exact_zero_for_any_lam(structure: str) -> None:
    """For 400 thresholds λ_g in (0, 10] (including the λ·sqrt(size) values that sqrt_size
    produces), a group with ‖V_g‖ = λ_g/2 and, in float64, one with ‖V_g‖ = λ_g exactly, give
    exactly 0.0: the support of Γ must not pick up groups whose factor 1 − λ_g/‖V_g‖ should be 0
    but comes out as ±1e-16 through rounding (e.g. if λ/n is computed as λ·(1/n)).
    """
    lams = [i / 40 for i in range(1, 401)]
    lams += [group_threshold(i / 20, structure, (12, 128), "sqrt_size") for i in range(1, 21)]
    axis = group_axis(structure)
    failures = []
    for lam in lams:
        for dtype in (torch.float64, torch.float32):
            rows = [[lam / 2, 0.0], [0.0, -lam / 2], [3.0 * lam, lam]]
            zero_groups = [0, 1]
            if dtype == torch.float64:
                rows.append([lam, 0.0])  # norm exactly λ_g: on the threshold
                zero_groups.append(3)
            base = torch.tensor(rows, dtype=dtype)
            v = base if structure == "filter" else base.t()
            out = prox(v, structure, lam)
            for g in zero_groups:
                if (out.select(axis, g) != 0).any():
                    failures.append((lam, str(dtype), g, out.select(axis, g).abs().max().item()))
            assert (out.select(axis, 2) != 0).all()
    assert failures == [], f"{len(failures)} cases leave tiny nonzeros, e.g. {failures[:4]}"
