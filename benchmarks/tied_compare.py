"""How much smaller does ResNet-20 get with tied filters? Per-layer filter groups against
``conv_structure: tied`` on CIFAR-10, both from ``cifar10_resnet20_selective``.

Usage (after ``benchmarks/cifar_selective.py train --only dessilbi`` and the tied run)::

    .venv/bin/dessilbi train --config cifar10_resnet20_selective \\
        --data-dir ../shared/data/cifar10-jpeg --conv-structure tied --threads 1 --device cpu \\
        --selection-start 4 --selection-calibration 1 \\
        --out runs/bench-selective --run-name cifar10-resnet20-selective-tied-e20-s0
    .venv/bin/python benchmarks/tied_compare.py

For each run, Γ's support at the last epoch is compacted (:func:`dessilbi.compact`): the
filters Γ dropped, the channels actually removed, parameters and FLOPs, and the accuracy of W,
of W̃ and of the compact network (which equals the pruned network). The table goes to
``benchmarks/results/tied_compare.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from _runs import fmt, read_history
from dessilbi.path_record import load_path
from dessilbi.runs import load_run
from dessilbi.subnet import compact, support_mask
from dessilbi.subnet.prune import example_input
from dessilbi.subnet.report import layer_flops
from selective_compare import _evaluator

RUNS = {
    "filter groups per layer": "runs/bench-selective/cifar10-resnet20-selective-dessilbi-e20-s0",
    "tied filters": "runs/bench-selective/cifar10-resnet20-selective-tied-e20-s0",
}


def row(label: str, run_dir: Path) -> dict[str, object]:
    run = load_run(run_dir)
    example = example_input(run)
    mask = support_mask(load_path(run_dir / "path.pt"))
    result = compact(run.model, example, keep=mask.keep)
    last = read_history(run_dir)[-1]
    accuracy = _evaluator(run_dir)(run.model.state_dict(), mask.keep, False)
    return {
        "label": label, "epochs": last["epoch"], "dense": last["test_acc"],
        "sparse": last["test_acc_sparse"], "pruned": accuracy,
        "dropped": mask.total - mask.kept, "total": mask.total,
        "removed": sum(len(v) for v in result.removed.values()),
        "params": [sum(p.numel() for p in run.model.parameters()),
                   sum(p.numel() for p in result.model.parameters())],
        "flops": [layer_flops(run.model, example)[""], layer_flops(result.model, example)[""]],
    }


def main() -> None:
    torch.set_num_threads(1)
    rows = [row(label, Path(d)) for label, d in RUNS.items()]
    lines = ["# ResNet-20 on CIFAR-10: compaction with and without tied filters", "",
             "Both runs: `cifar10_resnet20_selective` (20 epochs, bf16, `selection_start: 4`), "
             "the second with `--conv-structure tied` (each stage's stem or shortcut and the "
             "blocks' second convolutions as one group per filter). Compacted at the last "
             "epoch's support of Γ; the compact network's accuracy is the pruned network's "
             "(no fine-tuning). Produced by `.venv/bin/python benchmarks/tied_compare.py`.", "",
             "| structure | dense W (%) | W̃ (%) | compact (%) | filters Γ dropped | channels "
             "removed | parameters | FLOPs per image |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params, flops = r["params"], r["flops"]
        assert isinstance(params, list) and isinstance(flops, list)
        lines.append(
            f"| {r['label']} | {fmt(r['dense'])} | {fmt(r['sparse'])} | {fmt(r['pruned'])} | "
            f"{r['dropped']} / {r['total']} | {r['removed']} | {params[1]:,} of {params[0]:,} "
            f"({params[1] / params[0]:.1%}) | {flops[1]:,} ({flops[0] / flops[1]:.2f}x fewer) |")
    out = Path("benchmarks/results/tied_compare.md")
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(out.read_text())


if __name__ == "__main__":
    main()
