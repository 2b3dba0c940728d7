"""The read-outs of ``cifar_selective.py compare``: pruned networks of three masks with the same
per-layer counts at the epochs where Γ holds about 70 % and 50 % of the conv filters."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from _runs import (
    check_same_run,
    fmt,
    read_history,
    record_path,
    recorded_history,
    run_directory,
)
from dessilbi.batches import evaluate, example_input, input_normalization, load_run_data
from dessilbi.config import TrainConfig, load_config
from dessilbi.data import dataset_info
from dessilbi.distributed import DistInfo
from dessilbi.numerics import autocast_factory, input_preparer
from dessilbi.path_record import PathRecord, load_path
from dessilbi.run_files import read_metrics
from dessilbi.runs import load_run
from dessilbi.structure import distinct_group_names
from dessilbi.subnet import filter_norms, l1_mask, random_mask, zero_pruned_filters
from dessilbi.subnet.dependency import on_filters

TARGETS = (0.7, 0.5)
RANDOM_SEEDS = (0, 1, 2)
Masks = dict[str, torch.Tensor]


def selected_fraction(record: PathRecord, epoch: int) -> float:
    names = distinct_group_names(record.names)  # a channel's scale and shift: one group
    kept = sum(int(record.support(n, epoch).sum()) for n in names)
    return kept / sum(record.group_shape(n)[0] for n in names)


#: How far from a target fraction the closest epoch may be and still stand for it.
TARGET_TOLERANCE = 0.1


def target_epochs(record: PathRecord, available: set[int]) -> dict[float, int]:
    """For each target fraction, the recorded epoch (with saved weights) closest to it, where
    one comes within :data:`TARGET_TOLERANCE` (a path that never got there has none)."""
    epochs = [e for e in record.epochs if e in available]
    out = {}
    for target in TARGETS:
        closest = min(epochs, key=lambda e: abs(selected_fraction(record, e) - target))
        if abs(selected_fraction(record, closest) - target) <= TARGET_TOLERANCE:
            out[target] = closest
    return out


RECALIBRATION_IMAGES = 2048


@torch.no_grad()
def recalibrate_norms(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Re-estimate the batch-norm statistics of ``model`` on ``images`` (no weight changes)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
    model.train()
    for batch in images.split(256):
        model(batch)
    model.eval()


Evaluator = Callable[[dict[str, torch.Tensor], Masks | None, bool], float]


def _evaluator(run_dir: Path) -> Evaluator:
    """Test accuracy of the run's network with given weights, pruned by a mask, optionally
    with its batch-norm statistics re-estimated on training images first."""
    loaded = load_run(run_dir)
    config = loaded.config
    info = dataset_info(config.dataset, config.data_dir)
    train_set, test_set = load_run_data(config, DistInfo())
    device = torch.device("cpu")
    prepare = input_preparer(input_normalization(config, info), config.channels_last)
    autocast = autocast_factory(config.precision, device)
    example = torch.zeros(1, info.in_channels, *info.image_size)
    # A seeded sample: the JPEG copy is stored class by class.
    pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))
    images = prepare(train_set.images[pick[:RECALIBRATION_IMAGES]])  # type: ignore[union-attr]

    def accuracy(weights: dict[str, torch.Tensor], masks: Masks | None,
                 recalibrate: bool = False) -> float:
        model = loaded.architecture.build()
        model.load_state_dict(weights)
        if masks is not None:
            zero_pruned_filters(model, masks, example)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if recalibrate:
            with autocast():
                recalibrate_norms(model, images)
        return evaluate(model, test_set, prepare, autocast, config, DistInfo(), device)

    return accuracy


def slimming_mask(weights: Masks, norms: dict[str, str], counts: dict[str, int]) -> Masks:
    """Per conv, its ``counts`` channels of largest batch-norm scale |γ| (network slimming's
    criterion), keyed by the conv."""
    by_norm = l1_mask(weights, {f"{norms[c]}.weight": k for c, k in counts.items()}).keep
    return {conv: by_norm[f"{norms[conv]}.weight"] for conv in counts}


def pruned_accuracies(run_dir: Path, record: PathRecord, epoch: int, accuracy: Evaluator,
                      recalibrate: bool) -> dict[str, Any]:
    weights = torch.load(run_dir / "weights" / f"epoch_{epoch:03d}.pt", map_location="cpu",
                         weights_only=True)
    loaded = load_run(run_dir)
    model, example = loaded.model, example_input(loaded.config)
    # Γ on conv filters or on batch-norm scales: either way, masks of the convs' filters.
    support = on_filters(model, {n: record.support(n, epoch) for n in record.names}, example)
    norms = filter_norms(model, example)
    counts = {n: int(s.sum()) for n, s in support.items()}
    sizes = {n: s.numel() for n, s in support.items()}
    randoms = [accuracy(weights, random_mask(sizes, counts, seed).keep, recalibrate)
               for seed in RANDOM_SEEDS]
    by_l1 = l1_mask(weights, counts).keep
    # Masks unrelated to each other, with these per-layer counts, share Σ k²/n of the k kept.
    chance = 100 * sum(counts[n] ** 2 / sizes[n] for n in counts) / max(1, sum(counts.values()))
    return {
        "epoch": epoch,
        "recalibrated": recalibrate,
        "selected": [sum(counts.values()), sum(sizes.values())],
        "dense": accuracy(weights, None, recalibrate),
        "dessilbi": accuracy(weights, support, recalibrate),
        "l1": accuracy(weights, by_l1, recalibrate),
        "l1_overlap": overlap(support, by_l1),
        "chance_overlap": chance,
        "slimming": accuracy(weights, slimming_mask(weights, norms, counts), recalibrate),
        "random": statistics.mean(randoms),
        "random_each": randoms,
        "per_layer": counts,
    }


def overlap(a: Masks, b: Masks) -> float:
    """The share (%) of the filters kept by ``a`` that ``b`` keeps too (100 when the masks
    agree)."""
    both = sum(int((a[n] & b[n]).sum()) for n in a)
    return 100 * both / max(1, sum(int(a[n].sum()) for n in a))


def compare(args: argparse.Namespace, run_config: Callable[[str, argparse.Namespace],
                                                             TrainConfig]) -> None:
    configs = {"dessilbi": run_config(args.variant, args), "sgd": run_config(args.baseline, args)}
    if configs["dessilbi"].batch_size != configs["sgd"].batch_size:
        raise SystemExit(f"--variant {args.variant} trains at batch "
                         f"{configs['dessilbi'].batch_size}, --baseline {args.baseline} at "
                         f"{configs['sgd'].batch_size}: compare runs of the same budget "
                         "(sgd_b32 for the batch-32 variants)")
    runs = {name: run_directory(config) for name, config in configs.items()}
    if not (runs["dessilbi"] / "weights").is_dir():
        raise SystemExit(f"--variant {args.variant}: no run with per-epoch weights in "
                         f"{runs['dessilbi']} (a record of its numbers is not enough here): "
                         f"train it first (train --only {args.variant}, same flags)")
    check_same_run(runs["dessilbi"], configs["dessilbi"])
    record = load_path(runs["dessilbi"] / "path.pt")
    available = {int(p.stem.split("_")[1]) for p in (runs["dessilbi"] / "weights").glob("*.pt")}
    accuracy = _evaluator(runs["dessilbi"])
    missing = sorted(set(args.also_at) - available)
    if missing:
        raise SystemExit(f"--also-at {' '.join(map(str, missing))}: no saved weights of "
                         f"{'that epoch' if len(missing) == 1 else 'those epochs'} in "
                         f"{runs['dessilbi'] / 'weights'}")
    epochs = sorted(set(target_epochs(record, available).values()) | set(args.also_at))
    results = [pruned_accuracies(runs["dessilbi"], record, epoch, accuracy, recalibrate)
               for recalibrate in (False, True) for epoch in epochs]
    hists = {"dessilbi": read_history(runs["dessilbi"]), "sgd": _baseline(configs["sgd"], args)}
    config = load_config(runs["dessilbi"] / "config.yaml")
    text = write_markdown(args, record, hists, results, config)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "pruned": results,
         "runs": hists}, indent=1))
    print(text)


def _baseline(config: TrainConfig, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The SGD run's per-epoch records: from its run directory when it finished there, else as
    recorded."""
    run_dir = run_directory(config)
    done = read_metrics(run_dir / "metrics.jsonl")
    if len(done) >= config.epochs:
        check_same_run(run_dir, config)
        return done[: config.epochs]
    recorded = recorded_history(config)
    if recorded is None:
        raise SystemExit(
            f"--baseline {args.baseline}: {len(done)} of {config.epochs} epochs in {run_dir}, "
            f"and no finished run recorded in {record_path(config)}: train it first (train "
            f"--only {args.baseline}, with the same --model, --train-subset, --epochs, --seed "
            "and --threads)")
    return recorded


def _coupling(c: TrainConfig) -> str:
    """What Γ is coupled to in the DessiLBI run, in words."""
    norms = {"element": "Γ on the batch-norm scales (one group per channel",
             "affine": "Γ on each channel's batch-norm scale and shift (one group per channel"}
    if c.norm_structure is None:
        return "filter groups on every conv"
    text = norms[c.norm_structure] + (f", ν {c.norm_nu:g}" if c.norm_nu is not None else "")
    return text + ("; convs uncoupled)" if c.conv_structure is None else "; conv filters too)")


def write_markdown(args: argparse.Namespace, record: PathRecord,
                   hists: dict[str, list[dict[str, Any]]], results: list[dict[str, Any]],
                   c: TrainConfig) -> str:
    """The table; ``c``: the DessiLBI run's config."""
    lbi, sgd = hists["dessilbi"], hists["sgd"]
    config = f"cifar10_{args.model}_selective"
    subset = f"a seeded subset of {args.train_subset} training images" if args.train_subset \
        else "all 50,000 training images"
    flags = f" --model {args.model}" if args.model != "resnet20" else ""
    flags += f" --train-subset {args.train_subset}" if args.train_subset else ""
    flags += f" --epochs {args.epochs}" if args.epochs != 20 else ""
    lines = [
        f"# A selective path on CIFAR-10: {args.model}, `{config}`, variant `{args.variant}`",
        "",
        f"{len(lbi)} epochs (DessiLBI) and {len(sgd)} (SGD) of {args.epochs} on {subset} "
        f"(the test set whole), cosine lr {c.lr:g}, batch {c.batch_size}, Nesterov "
        f"{c.momentum:g}, wd {c.weight_decay:g}, crop + flip, "
        "CIFAR-10 JPEG copy, bf16 autocast + channels-last on CPU "
        f"({args.threads} thread(s), torch {torch.__version__}, {platform.machine()}). "
        f"DessiLBI: ν {c.nu:g}, κ {c.kappa:g}, "
        f"{_coupling(c)}, classifier "
        f"uncoupled, `selection_start: {c.selection_start}` (λ per layer calibrated over "
        f"{c.selection_calibration} epoch(s), `{c.selection_extrapolation}` extrapolation"
        + (", equal filter norms" if c.equal_filter_norms else "")
        + (f", filters started at {c.filter_norm_scale:g}× their drawn norm"
           if c.filter_norm_scale != 1 else "")
        + "). SGD: the config with `optimizer: sgd`, at the same batch, from the drawn "
        "initialisation.",
        "",
        f"Produced by `.venv/bin/python benchmarks/cifar_selective.py train{flags} --only "
        f"{args.variant} {args.baseline}` and `... compare{flags}"
        + (f" --variant {args.variant}" if args.variant != "dessilbi" else "")
        + (f" --baseline {args.baseline}" if args.baseline != "sgd" else "")
        + (f" --also-at {' '.join(map(str, args.also_at))}" if args.also_at else "") + "`.",
        "",
        "| run | dense W (%) | sparse W̃ (%) | selected channels |",
        "|---|---|---|---|",
        f"| SGD | {fmt(sgd[-1]['test_acc'])} | – | – |",
        f"| DessiLBI | {fmt(lbi[-1]['test_acc'])} | {fmt(lbi[-1]['test_acc_sparse'])} | "
        f"{_selected(lbi[-1])} |",
        "",
        "## Pruned networks, no fine-tuning",
        "",
        "At the epochs where Γ's support holds about 70 % and 50 % of the channels"
        + (f" (and at epoch {', '.join(map(str, args.also_at))}, asked for)" if args.also_at
           else "") + ": test "
        "accuracy (%) of the network of that epoch's weights with the unselected filters, their "
        "biases and batch-norm affine zeroed, for DessiLBI's support and for masks of the same "
        "per-layer counts: the largest-L1-norm filters of the same weights, the largest "
        "batch-norm scales |γ| of the same weights (network slimming's criterion), and random "
        f"filters (mean of seeds {', '.join(map(str, RANDOM_SEEDS))}).",
        "",
        "The second half of the table re-estimates the batch-norm statistics of each network on "
        f"{RECALIBRATION_IMAGES} training images first (no weight changes).",
        "",
        "The last column: the share of the support's filters that the L1 mask keeps too "
        "(agreeing masks: 100 %), and in brackets that of two unrelated masks of the same "
        "per-layer counts (Σ k²/n over the layers, of Σ k).",
        "",
        "| epoch | BN statistics | filters kept | dense W | DessiLBI support | L1 norm "
        "| BN \\|γ\\| | random | support ∩ L1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if not results:
        lines.append(f"| – | – | no recorded epoch held within {100 * TARGET_TOLERANCE:.0f} "
                     "points of " + " or ".join(f"{100 * t:.0f} %" for t in TARGETS)
                     + " of the filters | | | | | | |")
    for r in results:
        kept, total = r["selected"]
        stats = "re-estimated" if r["recalibrated"] else "as trained"
        lines.append(f"| {r['epoch']} | {stats} | {kept} / {total} ({100 * kept / total:.0f} %) | "
                     f"{fmt(r['dense'])} | {fmt(r['dessilbi'])} | {fmt(r['l1'])} | "
                     f"{fmt(r.get('slimming'))} | {fmt(r['random'])} "
                     f"({', '.join(fmt(x) for x in r['random_each'])}) | "
                     f"{_overlap(r)} |")
    layers = distinct_group_names(record.names)  # a channel's scale and shift: one group
    lines += ["", "## Per epoch", "",
              "Test accuracy (%) of SGD and of DessiLBI's W and W̃, and the selected groups "
              "per layer (columns: the coupled tensors in order).", "",
              "| epoch | SGD | W | W̃ | selected | " + " | ".join(
                  n.removesuffix(".weight") for n in layers) + " |",
              "|---|---|---|---|---|" + "---|" * len(layers)]
    for i, m in enumerate(lbi):
        epoch = m["epoch"]
        cells = [f"{int(record.support(n, epoch).sum())}" for n in layers] \
            if epoch in record.epochs else ["–"] * len(layers)
        sgd_acc = fmt(sgd[i]["test_acc"]) if i < len(sgd) else "–"
        lines.append(f"| {epoch} | {sgd_acc} | {fmt(m['test_acc'])} | "
                     f"{fmt(m['test_acc_sparse'])} | {_selected(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _overlap(result: dict[str, Any]) -> str:
    if result.get("l1_overlap") is None:
        return "–"
    chance = result.get("chance_overlap")
    return f"{result['l1_overlap']:.0f} %" + (f" ({chance:.0f} %)" if chance is not None else "")


def _selected(metrics: dict[str, Any]) -> str:
    selected = metrics["selected"]
    pairs = [selected[n] for n in distinct_group_names(selected)]
    return f"{sum(p[0] for p in pairs)} / {sum(p[1] for p in pairs)}"
