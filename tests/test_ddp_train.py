"""``torchrun -m dessilbi train`` semantics: DDP with 2 gloo processes on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from dessilbi.config import load_config
from dessilbi.train import train

SETTINGS = {"epochs": 2, "nu": 5, "batch_size": 64}

# Each rank saves its own Γ after training, so the test can compare ranks (only rank 0 writes
# the run directory).
RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from dessilbi.config import load_config
    from dessilbi.train import train
    out, settings = sys.argv[1], json.loads(sys.argv[2])
    result = train(load_config("digits", {**settings, "out": out}), quiet=True)
    params = dict(result.model.named_parameters())
    gammas = {n: result.optimizer.state[p]["gamma"] for n, p in params.items()
              if "gamma" in result.optimizer.state.get(p, {})}
    torch.save(gammas, os.path.join(out, f"gamma_rank{os.environ['RANK']}.pt"))
""")


def test_two_gloo_processes_agree_with_each_other_and_with_one_process(tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "ddp"
    out.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(out), json.dumps(SETTINGS)],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    g0 = torch.load(out / "gamma_rank0.pt", weights_only=True)
    g1 = torch.load(out / "gamma_rank1.pt", weights_only=True)
    assert g0.keys() == g1.keys() and len(g0) == 3
    assert all(torch.equal(g0[n], g1[n]) for n in g0), "Γ differs between ranks"
    assert any(bool(g.ne(0).any()) for g in g0.values()), "nothing selected: test is vacuous"

    # Only rank 0 wrote the run directory.
    ddp_run = next(out.glob("digits-*"))
    lines = [json.loads(x) for x in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]

    # One process on the same global batches selects the same groups.
    single = train(load_config("digits", {**SETTINGS, "out": str(tmp_path / "single")}),
                   quiet=True)
    assert single.selected == {k: tuple(v) for k, v in lines[-1]["selected"].items()}
    assert single.optimizer is not None and single.model is not None
    for name, param in single.model.named_parameters():
        if name in g0:
            gamma = single.optimizer.state[param]["gamma"]
            assert torch.equal(gamma != 0, g0[name] != 0), name
            torch.testing.assert_close(gamma, g0[name], rtol=1e-4, atol=1e-5)
