"""DessiLBI under DistributedDataParallel: two CPU processes (gloo, file store, no ports).

DDP all-reduces (averages) the gradients before ``optimizer.step()``, so every rank runs the same
DessiLBI step on the same gradient: V and Γ must stay bitwise identical across ranks although each
rank sees different data, and the run must equal a single process on the global batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dessilbi import DessiLBI, selected_groups, structured_param_groups
from nets import Net

F64 = torch.float64
WORLD_SIZE = 2
STEPS = 20
LOCAL_BATCH = 16




def make_model() -> Net:
    torch.manual_seed(0)
    return Net().to(F64)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(WORLD_SIZE * LOCAL_BATCH, 2, 6, 6, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (WORLD_SIZE * LOCAL_BATCH,), generator=gen)
    return x, y


def make_optimizer(model: nn.Module) -> DessiLBI:
    """Conv filters (λ = 0.45) and linear elements (λ = 0.1) coupled: after 20 steps 6 of the 8
    filters and some linear weights are selected."""
    groups = structured_param_groups(model)
    assert groups[0]["structure"] == "filter"
    groups[0]["lam"] = 0.45
    return DessiLBI(groups, lr=0.1, nu=2.0, lam=0.1, momentum=0.9)


def train(model: nn.Module, opt: DessiLBI, x: torch.Tensor, y: torch.Tensor) -> None:
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def coupled_state(model: nn.Module, opt: DessiLBI, prefix: str = "") -> dict[str, torch.Tensor]:
    """W, V and Γ of every coupled parameter, keyed by the bare parameter name."""
    out = {}
    for group in opt.param_groups:
        if group["structure"] is None:
            continue
        for name, p in zip(group["param_names"], group["params"], strict=True):
            name = name.removeprefix(prefix)
            out[f"{name}/w"] = p.detach().clone()
            out[f"{name}/v"] = opt.state[p]["v"].clone()
            out[f"{name}/gamma"] = opt.state[p]["gamma"].clone()
    return out


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD_SIZE
    )
    try:
        model = DistributedDataParallel(make_model())
        opt = make_optimizer(model)
        x, y = global_batch()
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)  # different data per rank
        train(model, opt, x[local], y[local])
        state = coupled_state(model, opt, prefix="module.")
        state["selected"] = torch.tensor(
            [s for s, _ in selected_groups(model.module, opt).values()]
        )
        torch.save(state, os.path.join(tmp, f"rank{rank}.pt"))
        # Both ranks reach teardown together: gloo aborts a rank ("terminate called without an
        # active exception") when its peer destroys the group while it still sends or receives.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_agree_and_match_single_process(tmp_path: Path) -> None:
    """2 ranks × 20 steps on different local batches: V and Γ of every coupled parameter are
    bitwise identical across ranks, some group is selected and W moved; the result equals one
    process on the concatenated batch (DDP's averaged gradient = the global-batch mean-loss
    gradient up to rounding): the same selected groups exactly, Γ to float64 tolerance."""
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key

    initial = dict(make_model().named_parameters())
    names = [key.removesuffix("/gamma") for key in ranks[0] if key.endswith("/gamma")]
    assert names == ["conv.weight", "fc1.weight", "fc2.weight"]
    assert any(bool((ranks[0][f"{n}/gamma"] != 0).any()) for n in names)
    for n in names:
        assert not torch.equal(ranks[0][f"{n}/w"], initial[n].detach())

    single = make_model()
    opt = make_optimizer(single)
    x, y = global_batch()
    train(single, opt, x, y)
    expected = coupled_state(single, opt)
    for key, value in expected.items():
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-9, atol=1e-12, msg=key)
        if key.endswith("/gamma"):
            assert torch.equal(ranks[0][key] != 0, value != 0), key
    single_selected = torch.tensor([s for s, _ in selected_groups(single, opt).values()])
    assert torch.equal(ranks[0]["selected"], single_selected)
    assert bool((single_selected > 0).all())
    assert int(single_selected[0]) < 8  # not every filter
