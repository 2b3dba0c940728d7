"""Read-outs along the path (``dessilbi.path``) against quantities computed here from the
optimizer state by hand: supports, selected groups, group norms, and the sparse-weights swap."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from dessilbi import (
    DessiLBI,
    coupled_tensors,
    group_norms,
    group_support,
    selected_groups,
    sparse_weights,
    structured_param_groups,
    support_masks,
    weight_group_norms,
)
from dessilbi.path_record import (
    PICTURE_FILTERS,
    PathFileError,
    PathRecord,
    PathRecorder,
    filter_picture,
    load_path,
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
    """A wrapper that is neither DDP nor DataParallel is not looked through, by the read-outs
    as by structured_param_groups: names keep its "module." prefix in both, so they agree."""
    model, opt = setup(25)

    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    wrapped = Wrapper(model)
    plain = selected_groups(model, opt)
    assert selected_groups(wrapped, opt) == {f"module.{k}": v for k, v in plain.items()}
    coupled_names = [n for g in structured_param_groups(wrapped) if g["structure"]
                     for n in g["param_names"]]
    assert [t.name for t in coupled_tensors(wrapped, opt)] == coupled_names[:3] == [
        f"module.{k}" for k in STRUCTURE_OF
    ]


# ------------------------------------------------------------------------------ PathRecorder

def coupled_setup(coupled: Sequence[str] = ("conv", "fc1", "fc2")) -> tuple[Net, DessiLBI]:
    """Net in float32 with the ``coupled`` layers' weights coupled (conv filters, fc1
    channels, fc2 elements; the others' weights not in the optimizer, ready for
    add_param_group). Γ is scripted by :class:`Script`, not trained (no optimizer steps)."""
    torch.manual_seed(0)
    model = Net()
    groups: list[dict[str, object]] = [
        {"params": [getattr(model, layer).weight], "structure": STRUCTURE_OF[f"{layer}.weight"]}
        for layer in coupled
    ]
    groups.append({"params": [model.conv.bias, model.fc1.bias, model.fc2.bias], "structure": None})
    return model, DessiLBI(groups, lr=0.1, nu=2.0)


def grid_support(gamma: torch.Tensor, structure: str) -> torch.Tensor:
    """Selected groups of Γ in the layer's grid ([G], or the weight shape for elements)."""
    return gamma != 0 if structure == "element" else group_norms(gamma, structure) > 0


def set_gamma(opt: DessiLBI, p: torch.Tensor, structure: str, support: torch.Tensor) -> None:
    """Γ nonzero exactly on the selected groups (a whole slice per group)."""
    if structure == "filter":
        mask = support.view(-1, *[1] * (p.dim() - 1)).expand_as(p)
    elif structure == "channel":
        mask = support.view(1, -1, *[1] * (p.dim() - 2)).expand_as(p)
    else:
        mask = support
    opt.state[p]["gamma"] = mask.to(p.dtype) * 0.5


class Script:
    """A seeded stand-in for training: every step, each unselected group enters with
    probability ``p_in`` and each selected one leaves with ``p_out``; W drifts a little."""

    def __init__(self, model: nn.Module, opt: DessiLBI, seed: int = 0,
                 p_in: float = 0.15, p_out: float = 0.08) -> None:
        self.model, self.opt = model, opt
        self.gen = torch.Generator().manual_seed(seed)
        self.p_in, self.p_out = p_in, p_out
        self.step = 0

    def coupled(self) -> list[tuple[torch.Tensor, str]]:
        return [(p, g["structure"]) for g in self.opt.param_groups if g["structure"]
                for p in g["params"]]

    @torch.no_grad()
    def advance(self) -> int:
        for p, structure in self.coupled():
            gamma = self.opt.state[p].get("gamma", torch.zeros_like(p))
            now = grid_support(gamma, structure)
            draw = torch.rand(now.shape, generator=self.gen)
            stays, enters = now & (draw >= self.p_out), ~now & (draw < self.p_in)
            set_gamma(self.opt, p, structure, stays | enters)
            p.add_(torch.randn(p.shape, generator=self.gen), alpha=0.01)
        self.step += 1
        return self.step


def truth(model: nn.Module, opt: DessiLBI) -> dict[str, torch.Tensor]:
    """The true current supports, per coupled layer, in the grid."""
    return {t.name: grid_support(t.gamma, t.structure) for t in coupled_tensors(model, opt)}


def run_epochs(script: Script, recorders: list[PathRecorder], first: int, last: int,
               steps: int = 3) -> list[dict[str, torch.Tensor]]:
    """Epochs ``first..last`` of ``steps`` steps; returns the true supports at each epoch end."""
    seen = []
    for epoch in range(first, last + 1):
        for _ in range(steps):
            step = script.advance()
            for rec in recorders:
                rec.update_step(step)
        for rec in recorders:
            rec.record_epoch(epoch)
        seen.append(truth(script.model, script.opt))
    return seen


def assert_same_state(a: object, b: object, where: str = "state") -> None:
    """Bitwise equality of two path states (NaN padding equal to NaN; dtypes and key order)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: {list(a)} vs {b}"
        for key in a:
            assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def saved_bytes(state: dict[str, object]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def reload(state: dict[str, object], tmp_path: Path, name: str = "path.pt") -> PathRecord:
    torch.save(state, tmp_path / name)
    return load_path(tmp_path / name)


def test_entries_and_leaving_groups_both_encodings(tmp_path: Path) -> None:
    """Scripted supports with groups entering and leaving: entry epoch/step are the FIRST entry
    (the step of update_step that first saw it), the per-epoch supports the current state, for
    the dense (filter, channel) and the flip (element) encodings; selected counts and ‖W‖, ‖W̃‖
    per epoch; element layers store no per-epoch dense tensors."""
    model, opt = coupled_setup()
    rec = PathRecorder(model, opt)
    script = Script(model, opt, p_in=0.2, p_out=0.3)
    first_step = {n: torch.full(s.shape, -1) for n, s in truth(model, opt).items()}
    first_epoch = {n: t.clone() for n, t in first_step.items()}
    seen, norms, sparse_norms = [], [], []
    for epoch in range(1, 7):
        for _ in range(3):
            step = script.advance()
            rec.update_step(step)
            for name, s in truth(model, opt).items():
                first_step[name][s & (first_step[name] < 0)] = step
                first_epoch[name][s & (first_epoch[name] < 0)] = epoch
        rec.record_epoch(epoch)
        seen.append(truth(model, opt))
        norms.append({t.name: t.weight.norm() for t in coupled_tensors(model, opt)})
        sparse_norms.append(
            {t.name: (t.weight * t.mask).norm() for t in coupled_tensors(model, opt)}
        )
    state = rec.state_dict()
    record = reload(state, tmp_path)
    assert record.names == list(STRUCTURE_OF) and record.epochs == [1, 2, 3, 4, 5, 6]
    assert state["steps"].tolist() == [3, 6, 9, 12, 15, 18]
    for name in STRUCTURE_OF:
        left = False
        for i, epoch in enumerate(record.epochs):
            assert torch.equal(record.support(name, epoch), seen[i][name]), (name, epoch)
            assert int(record.selected(name)[i]) == int(seen[i][name].sum())
            if i:
                left |= bool((seen[i - 1][name] & ~seen[i][name]).any())
        assert left, f"{name}: the script should make some group leave"
        assert torch.equal(record.entry_step(name), first_step[name].to(torch.int32))
        assert torch.equal(record.entry_epoch(name), first_epoch[name].to(torch.int32))
        torch.testing.assert_close(record.weight_norms(name), torch.stack([n[name] for n in norms]))
        torch.testing.assert_close(
            record.weight_norms(name, sparse=True), torch.stack([n[name] for n in sparse_norms])
        )
        assert all(torch.equal(a, b[name])
                   for a, b in zip(record.supports(name), seen, strict=True))
    # dense keys for the group layers, as in version 1; flips only for the element layer
    assert set(state["support"]) == set(state["group_norms"]) == {"conv.weight", "fc1.weight"}
    dense = torch.stack([s["conv.weight"] for s in seen])
    assert torch.equal(state["support"]["conv.weight"], dense)
    assert set(state["support_flips"]) == {"fc2.weight"}
    assert state["support_flips"]["fc2.weight"].dtype == torch.int32
    with pytest.raises(ValueError, match="element structure"):
        record.group_norms("fc2.weight")
    torch.testing.assert_close(
        record.group_norms("conv.weight")[-1], group_norms(model.conv.weight, "filter")
    )


def test_recording_of_a_real_run_matches_the_optimizer() -> None:
    """Trained with DessiLBI (groups enter on their own): the recorded supports are those of
    Γ at the end of each epoch, and each group's entry step is the first step with Γ_g ≠ 0."""
    model, opt = setup(0)
    rec = PathRecorder(model, opt)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 2, 6, 6, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (24,), generator=gen)
    history: list[dict[str, torch.Tensor]] = []
    epoch_ends = []
    for epoch in range(1, 5):  # 24 steps: some but not all groups selected (see setup)
        for _ in range(6):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            history.append(truth(model, opt))
            rec.update_step(len(history))
        rec.record_epoch(epoch)
        epoch_ends.append(history[-1])
    record = rec.record()
    for name in STRUCTURE_OF:
        for i, epoch in enumerate(record.epochs):
            assert torch.equal(record.support(name, epoch), epoch_ends[i][name])
        entry = record.entry_step(name)
        assert bool((entry > 0).any()) and bool((entry < 0).any()), name
        for index in range(entry.numel()):
            s = int(entry.reshape(-1)[index])
            column = [bool(h[name].reshape(-1)[index]) for h in history]
            assert s == (column.index(True) + 1 if True in column else -1)


def test_resume_equals_an_uninterrupted_recording() -> None:
    """Recorder B stops after epoch 3; its state_dict, saved and loaded with weights_only into a
    new recorder, continues to epoch 7: bitwise the state of recorder A that never stopped."""
    model, opt = coupled_setup()
    script = Script(model, opt)
    a, b = PathRecorder(model, opt), PathRecorder(model, opt)
    run_epochs(script, [a, b], 1, 3)
    buffer = io.BytesIO()
    torch.save(b.state_dict(), buffer)
    buffer.seek(0)
    c = PathRecorder(model, opt)
    c.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_state(c.state_dict(), b.state_dict())  # load -> state_dict round trip
    run_epochs(script, [a, c], 4, 7)
    assert_same_state(c.state_dict(), a.state_dict())
    assert c.epochs == list(range(1, 8))


def widen_conv(model: Net, opt: DessiLBI, extra: int) -> nn.Parameter:
    """Growing: conv gets ``extra`` more filters (a new Parameter in the module and in the
    optimizer's param group, Γ carried over and zero on the new filters)."""
    old = model.conv.weight
    fresh = torch.randn(extra, *old.shape[1:], generator=torch.Generator().manual_seed(1))
    new = nn.Parameter(torch.cat([old.detach(), fresh]))
    model.conv.weight = new
    opt.param_groups[0]["params"][0] = new
    state = opt.state.pop(old)
    opt.state[new] = {"gamma": torch.cat([state["gamma"], torch.zeros(extra, *old.shape[1:])])}
    return new


def widen_fc2_inputs(model: Net, opt: DessiLBI, extra: int) -> nn.Parameter:
    """fc2's weight [3, 12] becomes [3, 12 + extra]: new ENTRIES in every row (dim 1)."""
    old = model.fc2.weight
    fresh = torch.randn(old.shape[0], extra, generator=torch.Generator().manual_seed(2))
    new = nn.Parameter(torch.cat([old.detach(), fresh], dim=1))
    model.fc2.weight = new
    group = next(g for g in opt.param_groups if g["structure"] == "element")
    group["params"][0] = new
    state = opt.state.pop(old)
    opt.state[new] = {"gamma": torch.cat([state["gamma"], torch.zeros(old.shape[0], extra)], 1)}
    return new


def test_widened_parameters_keep_history_and_record_new_groups(tmp_path: Path) -> None:
    """conv 8 -> 12 filters and fc2 [3, 12] -> [3, 16] after epoch 2: old groups keep their
    entries (elements at their (row, column)), new ones start at -1 and are recorded from then
    on; earlier epochs show NaN norms / False support for the new filters, and the element
    supports decode in each epoch's own shape."""
    model, opt = coupled_setup()
    script = Script(model, opt, p_in=0.3, p_out=0.05)
    rec = PathRecorder(model, opt)
    seen = run_epochs(script, [rec], 1, 2)
    before = rec.record()
    widen_conv(model, opt, 4)
    widen_fc2_inputs(model, opt, 4)
    seen += run_epochs(script, [rec], 3, 5)
    record = reload(rec.state_dict(), tmp_path)

    conv_entry = record.entry_epoch("conv.weight")
    assert conv_entry.shape == (12,)
    old_conv = before.entry_epoch("conv.weight")
    assert bool((old_conv >= 0).any())
    assert torch.equal(conv_entry[:8][old_conv >= 0], old_conv[old_conv >= 0])
    new_conv = conv_entry[8:]
    assert bool((new_conv >= 3).any()) and not bool(((new_conv >= 0) & (new_conv < 3)).any())
    norms = record.group_norms("conv.weight")
    assert norms.shape == (5, 12) and bool(norms[:2, 8:].isnan().all())
    assert not norms[:2, :8].isnan().any() and not norms[2:].isnan().any()
    assert record.group_shape("conv.weight", 2) == (8,)
    assert record.group_shape("conv.weight") == (12,)
    fc2_entry = record.entry_epoch("fc2.weight")
    assert fc2_entry.shape == (3, 16)
    old_entry = before.entry_epoch("fc2.weight")
    assert torch.equal(fc2_entry[:, :12][old_entry >= 0], old_entry[old_entry >= 0])
    assert not bool(((fc2_entry[:, 12:] >= 0) & (fc2_entry[:, 12:] < 3)).any())
    for i, epoch in enumerate(record.epochs):
        for name in STRUCTURE_OF:
            assert torch.equal(record.support(name, epoch), seen[i][name]), (name, epoch)
    assert record.support("fc2.weight", 2).shape == (3, 12)
    assert record.support("fc2.weight", 3).shape == (3, 16)
    state = rec.state_dict()
    assert state["shape_changes"]["conv.weight"].tolist() == [[8], [12]]
    assert state["shape_changed_at"]["conv.weight"].tolist() == [[0, 0], [7, 2]]


def test_filter_pictures_follow_the_weights_and_widening(tmp_path: Path) -> None:
    """The first filter-structured conv is pictured at every epoch: each recorded picture
    equals the literal one of that epoch's weight (mean over its 2 input channels, float16),
    widening 8 -> 12 filters shows 12 from then on, the pictures survive path.pt, and a
    version-2 file written before pictures existed reads as having none."""
    model, opt = coupled_setup()
    script = Script(model, opt)
    rec = PathRecorder(model, opt)
    expected = {}
    for epoch in (1, 2, 3):
        if epoch == 3:
            widen_conv(model, opt, 4)
        run_epochs(script, [rec], epoch, epoch)
        weight = model.conv.weight.detach()
        expected[epoch] = weight.mean(1, keepdim=True).half()
    record = reload(rec.state_dict(), tmp_path)
    assert record.picture_layer == "conv.weight"
    pictures = record.filter_pictures()
    assert sorted(pictures) == [1, 2, 3]
    assert [p.shape for p in pictures.values()] == [(8, 1, 3, 3), (8, 1, 3, 3), (12, 1, 3, 3)]
    for epoch, picture in pictures.items():
        assert torch.equal(picture, expected[epoch]), epoch
    assert not torch.equal(pictures[1], pictures[2])  # the weights moved
    rgb = nn.Conv2d(3, 100, 3).weight
    assert filter_picture(rgb).shape == (PICTURE_FILTERS, 3, 3, 3)
    assert torch.equal(filter_picture(rgb), rgb.detach()[:PICTURE_FILTERS].half())
    old = rec.state_dict()
    del old["picture_layer"], old["filter_pictures"]
    assert PathRecord(old).picture_layer is None and PathRecord(old).filter_pictures() == {}
    broken = rec.state_dict()
    broken["picture_layer"] = "fc9.weight"
    with pytest.raises(ValueError, match="fc9.weight.*not a recorded layer"):
        PathRecord(broken)


def test_replaced_model_and_optimizer_are_followed() -> None:
    """A growing step that builds a new model (conv 8 -> 11 filters) and a new optimizer, set
    on the recorder: conv's history continues with the new filters appended."""
    model, opt = coupled_setup()
    script = Script(model, opt, p_in=0.3)
    rec = PathRecorder(model, opt)
    before = run_epochs(script, [rec], 1, 2)
    model2, opt2 = coupled_setup()
    with torch.no_grad():
        for p, q in zip(model.parameters(), model2.parameters(), strict=True):
            q.copy_(p)
            if "gamma" in opt.state[p]:
                opt2.state[q]["gamma"] = opt.state[p]["gamma"].clone()
    widen_conv(model2, opt2, 3)
    rec.model, rec.optimizer = model2, opt2
    script2 = Script(model2, opt2, seed=1, p_in=0.3)
    script2.step = 6
    after = run_epochs(script2, [rec], 3, 3)
    record = rec.record()
    assert record.group_shape("conv.weight") == (11,)
    assert torch.equal(record.support("conv.weight", 2), before[1]["conv.weight"])
    assert torch.equal(record.support("conv.weight", 3), after[0]["conv.weight"])
    assert record.support("conv.weight", 3).shape == (11,)


def test_added_param_group_is_recorded() -> None:
    """fc2 coupled by add_param_group after epoch 2: recorded from then on, with "not coupled"
    rows (zero grid, NaN norms, empty support) for epochs 1-2 and entries -1 until they enter."""
    model, opt = coupled_setup(("conv", "fc1"))
    script = Script(model, opt, p_in=0.3)
    rec = PathRecorder(model, opt)
    run_epochs(script, [rec], 1, 2)
    assert rec.names == ["conv.weight", "fc1.weight"]
    opt.add_param_group({"params": [model.fc2.weight], "structure": "element"})
    seen = run_epochs(script, [rec], 3, 4)
    record = rec.record()
    assert record.names == ["conv.weight", "fc1.weight", "fc2.weight"]
    assert record.group_shape("fc2.weight", 1) == (0, 0)
    assert record.support("fc2.weight", 2).numel() == 0
    assert record.weight_norms("fc2.weight")[:2].isnan().all()
    assert torch.equal(record.support("fc2.weight", 3), seen[0]["fc2.weight"])
    assert torch.equal(record.support("fc2.weight", 4), seen[1]["fc2.weight"])
    entry = record.entry_epoch("fc2.weight")
    assert set(entry.unique().tolist()) <= {-1, 3, 4} and bool((entry == 3).any())
    assert int(record.entry_step("fc2.weight")[entry >= 0].min()) >= 7


def test_a_layer_no_longer_coupled_keeps_its_history() -> None:
    """fc2 taken out of the optimizer after epoch 2: its epochs 1-2 stay, later rows are "not
    coupled", its entries stay as they were; coupled again at epoch 4, it is recorded again."""
    model, opt = coupled_setup()
    script = Script(model, opt, p_in=0.3)
    rec = PathRecorder(model, opt)
    seen = run_epochs(script, [rec], 1, 2)
    entries = rec.record().entry_epoch("fc2.weight")
    opt.param_groups.pop(2)  # the element group
    run_epochs(script, [rec], 3, 3)
    record = rec.record()
    assert record.names == list(STRUCTURE_OF)
    assert torch.equal(record.support("fc2.weight", 2), seen[1]["fc2.weight"])
    assert record.group_shape("fc2.weight", 3) == (0, 0)
    assert torch.equal(record.entry_epoch("fc2.weight"), entries)
    # coupled again: its support decodes from empty, not from its support of epoch 2
    opt.add_param_group({"params": [model.fc2.weight], "structure": "element"})
    again = run_epochs(script, [rec], 4, 4)
    assert torch.equal(rec.record().support("fc2.weight", 4), again[0]["fc2.weight"])
    assert torch.equal(rec.record().entry_epoch("fc2.weight")[entries >= 0], entries[entries >= 0])


def test_a_narrowed_layer_is_refused() -> None:
    """Pruning conv to 6 filters: update_step raises ValueError naming the layer, and the
    recording is unchanged; so does a recording loaded into the pruned network, at its next
    record_epoch."""
    model, opt = coupled_setup()
    script = Script(model, opt)
    rec = PathRecorder(model, opt)
    run_epochs(script, [rec], 1, 2)
    saved = rec.state_dict()
    narrow = nn.Parameter(model.conv.weight.detach()[:6].clone())
    model.conv.weight = narrow
    opt.param_groups[0]["params"][0] = narrow
    with pytest.raises(ValueError, match=r"conv\.weight: its group grid went from \(8,\) to"):
        rec.update_step(7)
    assert_same_state(rec.state_dict(), saved)
    loaded = PathRecorder(model, opt)
    loaded.load_state_dict(saved)  # checked against the model at the next call
    with pytest.raises(ValueError, match=r"conv\.weight: its group grid"):
        loaded.record_epoch(3)
    assert_same_state(loaded.state_dict(), saved)


def test_load_state_dict_with_more_layers_and_other_structure() -> None:
    """A recording of conv + fc1 loads into a run that also couples fc2 (recorded from the next
    epoch on); a recording where fc1 had another structure is refused."""
    model, opt = coupled_setup(("conv", "fc1"))
    script = Script(model, opt)
    rec = PathRecorder(model, opt)
    run_epochs(script, [rec], 1, 2)
    state = rec.state_dict()
    model2, opt2 = coupled_setup()
    script2 = Script(model2, opt2)
    script2.step = 6
    rec2 = PathRecorder(model2, opt2)
    rec2.load_state_dict(state)
    assert rec2.names == ["conv.weight", "fc1.weight"]
    run_epochs(script2, [rec2], 3, 3)
    record = rec2.record()
    assert record.names == list(STRUCTURE_OF)
    assert record.group_shape("fc2.weight", 2) == (0, 0)
    assert record.group_shape("fc2.weight", 3) == (3, 12)
    changed = PathRecorder(model, opt)
    changed.load_state_dict(dict(state, structures=["filter", "filter"]))
    with pytest.raises(ValueError, match=r"fc1\.weight: recorded with structure 'filter'"):
        changed.update_step(7)


def test_truncate_equals_the_recording_at_that_epoch() -> None:
    """Recorded to epoch 6 with widenings and an added layer after epoch 3: truncate(3, s_3)
    gives bitwise the state recorded at the end of epoch 3 (also via a reloaded state), and a
    resumed run (the model of epoch 3, the path file of epoch 6 loaded and truncated)
    continues to bitwise the uninterrupted recording."""
    model, opt = coupled_setup(("conv", "fc2"))
    script = Script(model, opt, p_in=0.1)
    rec = PathRecorder(model, opt)
    run_epochs(script, [rec], 1, 3)
    at_3 = rec.state_dict()
    rng_at_3 = script.gen.get_state()
    weights_at_3 = {n: p.detach().clone() for n, p in model.named_parameters()}
    gammas_at_3 = {n: opt.state[p]["gamma"].clone() for n, p in model.named_parameters()
                   if "gamma" in opt.state[p]}

    def continue_run(recorders: list[PathRecorder], m: Net, o: DessiLBI, s: Script) -> None:
        run_epochs(s, recorders, 4, 4)
        widen_conv(m, o, 2)
        widen_fc2_inputs(m, o, 3)
        o.add_param_group({"params": [m.fc1.weight], "structure": "channel"})
        run_epochs(s, recorders, 5, 6)

    continue_run([rec], model, opt, script)
    final = rec.state_dict()
    assert rec.names == ["conv.weight", "fc2.weight", "fc1.weight"]
    assert final["group_shape"]["fc2.weight"].tolist() == [[3, 12]] * 4 + [[3, 15]] * 2

    reloaded = PathRecorder(model, opt)
    reloaded.load_state_dict(final)
    for r in (rec, reloaded):
        r.truncate(3, 9)
        assert_same_state(r.state_dict(), at_3)

    # A fresh run from the state of epoch 3 (as a resumed trainer would have it).
    model2, opt2 = coupled_setup(("conv", "fc2"))
    with torch.no_grad():
        for n, p in model2.named_parameters():
            p.copy_(weights_at_3[n])
            if n in gammas_at_3:
                opt2.state[p]["gamma"] = gammas_at_3[n].clone()
    script2 = Script(model2, opt2, p_in=0.1)
    script2.gen.set_state(rng_at_3)
    script2.step = 9
    resumed = PathRecorder(model2, opt2)
    resumed.load_state_dict(torch.load(io.BytesIO(saved_bytes(final)), weights_only=True))
    resumed.truncate(3, 9)
    assert_same_state(resumed.state_dict(), at_3)
    continue_run([resumed], model2, opt2, script2)
    assert_same_state(resumed.state_dict(), final)
    # groups entered after epoch 3 (so the truncation had entries to forget)
    assert bool((final["entry_epoch"]["fc2.weight"] > 3).any())

    # A path file of another run (epoch 3 ended at another step) is refused.
    other = PathRecorder(model, opt)
    other.load_state_dict(final)
    with pytest.raises(ValueError, match="epoch 3 was recorded at step 9"):
        other.truncate(3, 8)


def test_element_storage_is_compact_and_exact(tmp_path: Path) -> None:
    """A 512 -> 1000 linear layer (512,000 entries) under the element structure over 20 epochs,
    a growing fraction selected and a few leaving each epoch: path.pt stays far below the
    dense per-epoch encoding (20 x 512,000 x (4 + 1) bytes = 51 MB), and every epoch's support
    decodes to the true one."""
    torch.manual_seed(0)
    layer = nn.Linear(512, 1000, bias=False)
    opt = DessiLBI([{"params": [layer.weight], "structure": "element"}])
    rec = PathRecorder(layer, opt)
    gen = torch.Generator().manual_seed(0)
    score = torch.rand(layer.weight.shape, generator=gen)
    supports = []
    for epoch in range(1, 21):
        support = (score < 0.015 * epoch) & (torch.rand(score.shape, generator=gen) >= 0.01)
        opt.state[layer.weight]["gamma"] = support.float()
        rec.update_step(epoch * 10)
        rec.record_epoch(epoch)
        supports.append(support)
    torch.save(rec.state_dict(), tmp_path / "path.pt")
    size = (tmp_path / "path.pt").stat().st_size
    dense = 20 * 512_000 * 5
    assert size < dense / 8, size
    record = load_path(tmp_path / "path.pt")
    decoded = record.supports("weight")
    assert all(torch.equal(d, s) for d, s in zip(decoded, supports, strict=True))
    assert torch.equal(record.support("weight", 13), supports[12])
    assert record.selected("weight").tolist() == [int(s.sum()) for s in supports]


def test_data_parallel_is_looked_through() -> None:
    """Under nn.DataParallel the names carry no "module." prefix: those of the bare model and
    of structured_param_groups' param_names, in the read-outs and in the recorder."""
    model, opt = setup(5)
    wrapped = nn.DataParallel(model)
    assert [t.name for t in coupled_tensors(wrapped, opt)] == list(STRUCTURE_OF)
    assert selected_groups(wrapped, opt) == selected_groups(model, opt)
    names = [n for g in structured_param_groups(wrapped) for n in g["param_names"]]
    assert set(STRUCTURE_OF) <= set(names) and not any(n.startswith("module.") for n in names)
    rec = PathRecorder(wrapped, opt)
    rec.update_step(6)
    rec.record_epoch(1)
    assert rec.names == list(STRUCTURE_OF) == rec.record().names


def test_load_path_errors(tmp_path: Path) -> None:
    """A missing file, a damaged file, a torch file that holds no path, and an unknown version
    each raise an error naming the file."""
    missing = tmp_path / "nope" / "path.pt"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_path(missing)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a zip file at all")
    with pytest.raises(PathFileError, match="damaged.pt"):
        load_path(damaged)
    model, opt = coupled_setup()
    other = tmp_path / "weights.pt"
    torch.save(model.state_dict(), other)
    with pytest.raises(PathFileError, match=r"weights\.pt: not a dessilbi path file"):
        load_path(other)
    rec = PathRecorder(model, opt)
    future = tmp_path / "future.pt"
    torch.save(dict(rec.state_dict(), version=99), future)
    with pytest.raises(PathFileError, match=r"future\.pt.*version 99"):
        load_path(future)
    broken = dict(rec.state_dict())
    broken["support"] = {}
    with pytest.raises(ValueError, match="conv.weight"):
        PathRecord(broken)
    rec.record_epoch(1)
    broken = rec.state_dict()
    broken["support_flips"]["fc2.weight"] = torch.tensor([36], dtype=torch.int32)
    broken["support_flip_counts"]["fc2.weight"] = torch.tensor([1])
    with pytest.raises(ValueError, match="fc2.weight.*flips outside the grid"):
        PathRecord(broken)


def test_version_1_states_are_read() -> None:
    """An untagged dense (version 1) state, as written before: the reader decodes it, element
    supports included, and a recorder resumes from it."""
    model, opt = coupled_setup()
    script = Script(model, opt)
    rec = PathRecorder(model, opt)
    seen = run_epochs(script, [rec], 1, 3)
    names = list(STRUCTURE_OF)
    old = {
        "names": names,
        "structures": list(STRUCTURE_OF.values()),
        "epochs": torch.tensor([1, 2, 3]),
        "entry_step": {n: rec.record().entry_step(n).reshape(-1).long() for n in names},
        "entry_epoch": {n: rec.record().entry_epoch(n).reshape(-1).long() for n in names},
        "group_norms": {n: torch.rand(3, seen[0][n].numel()) for n in names},
        "support": {n: torch.stack([s[n].reshape(-1) for s in seen]) for n in names},
    }
    record = PathRecord(old)
    assert record.version == 1
    for n in names:
        assert [torch.equal(s.reshape(-1), t[n].reshape(-1)) for s, t in
                zip(record.supports(n), seen, strict=True)] == [True] * 3
    resumed = PathRecorder(model, opt)
    resumed.load_state_dict(old)
    assert resumed.record().group_shape("fc2.weight") == (3, 12)
    assert torch.equal(resumed.record().support("fc2.weight", 3), seen[2]["fc2.weight"])
    run_epochs(script, [resumed], 4, 4)
    assert resumed.epochs == [1, 2, 3, 4]
