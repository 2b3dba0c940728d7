"""``dessilbi prune``: mask from the path, fine-tuning with the mask held, compact network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dessilbi.cli import main
from dessilbi.config import load_config
from dessilbi.path_record import load_path
from dessilbi.runs import load_run
from dessilbi.subnet import load_mask, ordered_mask
from dessilbi.subnet.prune import example_input, load_compact
from dessilbi.subnet.report import layer_flops
from dessilbi.train import train


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return train(load_config("digits", {"epochs": 3, "nu": 5, "out": str(out)}),
                 quiet=True).run_dir


def test_prune_finetunes_with_the_mask_held_and_writes_a_compact_network(
        source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["prune", str(source), "--keep", "0.5", "--finetune-epochs", "2", "--optimizer",
            "sgd", "--lr", "0.02", "--compact", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "mask: 56 of 112 filters kept (path_order, epoch 3)" in printed
    tuned = next(p for p in source.parent.iterdir() if p.name.startswith(f"{source.name}-prune"))
    assert tuned.name.endswith("-sgd-e2") and f"fine-tuned: {tuned}" in printed
    mask = load_mask(tuned / "mask.json")
    expected = ordered_mask(load_path(source / "path.pt"), 0.5)
    assert all(torch.equal(mask.keep[n], expected.keep[n]) for n in expected.keep)
    run = load_run(tuned)
    assert run.epoch == 2 and run.config.optimizer == "sgd" and run.config.lr == 0.02
    weights = run.model.state_dict()
    start = load_run(source).model.state_dict()
    for name, kept in mask.keep.items():  # pruned filters and biases exactly zero after SGD
        layer = name.rpartition(".")[0]
        assert not bool(weights[name][~kept].any()) and not bool(weights[f"{layer}.bias"][~kept]
                                                                  .any())
        assert not torch.equal(weights[name][kept], start[name][kept])  # the rest trained
    compact_net = load_compact(tuned / "compact", example_input(run))
    assert sum(p.numel() for p in compact_net.parameters()) < sum(
        p.numel() for p in run.model.parameters())
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (compact_net(x) - run.model(x)).abs().max() <= 1e-5
    assert "compact: " in printed and "FLOPs per image" in printed
    report = (tuned / "compact" / "report.md").read_text()
    for layer in ("conv1", "conv2", "conv3", "fc"):
        assert f"| {layer} | " in report, layer
    dense_flops = layer_flops(run.model, example_input(run))
    compact_flops = layer_flops(compact_net, example_input(run))
    assert compact_flops[""] < dense_flops[""]
    assert f"FLOPs per image: {dense_flops['']:,} → {compact_flops['']:,}" in report
    assert "| 64 | 1 | as trained |" in report  # the digits CNN has no batch norm to fold
    assert "folded" not in report

    assert main(argv[:-2] + ["--quiet"]) == 0  # the same command again: nothing to train
    assert "finished (2/2 epochs), nothing to train" in capsys.readouterr().out


def test_prune_refuses_conflicting_or_missing_masks(
        source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", str(source), "--mask", str(tmp_path / "m.json"), "--keep", "0.5"]) == 1
    assert "--mask gives the mask itself" in capsys.readouterr().err
    assert main(["prune", str(source), "--mask", str(tmp_path / "m.json")]) == 1
    assert "m.json: no mask file there" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err


def test_export_writes_onnx_that_onnxruntime_runs_at_any_batch(
        source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np
    import onnxruntime as ort

    out = tmp_path / "digits.onnx"
    assert main(["export", str(source), "--weights", "pruned", "--out", str(out)]) == 0
    assert f"onnx: {out} (onnxruntime agrees to" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = load_run(source, weights="pruned").model
    for size in (2, 9):  # the batch dimension is dynamic
        x = torch.randn(size, 1, 8, 8, generator=torch.Generator().manual_seed(size))
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            assert np.abs(got - model(x).numpy()).max() <= 1e-4
    assert main(["export", str(tmp_path / "nowhere")]) == 1
    assert "not a dessilbi run directory" in capsys.readouterr().err


def test_prune_for_a_flops_budget_writes_a_compact_folder_per_mask(
        source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", str(source), "--flops", "0.4", "--compact", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "(budget, epoch 3)" in printed
    folders = sorted(p for p in source.iterdir() if p.name.startswith("compact-"))
    assert len(folders) == 1 and (folders[0] / "compact.json").is_file()
    run = load_run(source)
    net = load_compact(folders[0], example_input(run))
    assert layer_flops(net, example_input(run))[""] <= 0.4 * layer_flops(
        run.model, example_input(run))[""]
    assert main(["prune", str(source), "--flops", "0.6", "--compact", "--quiet"]) == 0
    assert len([p for p in source.iterdir() if p.name.startswith("compact-")]) == 2
    assert main(["prune", str(source), "--keep", "0.5", "--flops", "0.4"]) == 1
    assert "exclude each other" in capsys.readouterr().err


def test_a_compact_run_continues_from_the_sliced_state(
        source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``prune --compact --as-run`` writes a run directory whose checkpoint is the source's with
    the compact weights and the optimizer state that :func:`dessilbi.compact` slices (V, Γ,
    momentum), the epoch, step, schedule and random states kept; its architecture rebuilds the
    compact network; ``train --resume`` trains it on, recording a new path."""
    from dessilbi import compact
    from dessilbi.run_files import load_checkpoint
    from dessilbi.run_state import Architecture
    from dessilbi.subnet.compact_run import compact_run

    assert main(["prune", str(source), "--keep", "0.5", "--compact", "--as-run"]) == 0
    printed = capsys.readouterr().out
    out = next(p for p in source.parent.iterdir() if p.name.startswith(f"{source.name}-compact"))
    assert f"compact run: {out}; train it on with `dessilbi train --resume {out}" in printed
    before = load_checkpoint(source / "checkpoint.pt")
    after = load_checkpoint(out / "checkpoint.pt")
    for key in ("epoch", "step", "scheduler", "callbacks", "model_name"):
        assert after[key] == before[key], key
    for key, states in before["rng"].items():
        assert all(torch.equal(a, b) for a, b in zip(after["rng"][key], states, strict=True))
    loaded = load_run(source, with_optimizer=True)
    mask = ordered_mask(load_path(source / "path.pt"), 0.5)
    expected = compact(loaded.model.eval(), example_input(loaded), loaded.optimizer, mask.keep)
    assert expected.optimizer is not None
    rebuilt = Architecture.from_dict(after["architecture"]).build()
    rebuilt.load_state_dict(after["model"])  # strict: the same shapes
    for name, value in expected.model.state_dict().items():
        assert torch.equal(after["model"][name], value), name
    sliced = expected.optimizer.state_dict()["state"]
    states = after["optimizer"]["state"]
    assert sum("gamma" in state and "momentum_buffer" in state for state in states.values()) == 3
    for index, state in states.items():
        assert set(state) == set(sliced[index])
        for key, value in state.items():
            assert torch.equal(value, sliced[index][key]), (index, key)
    assert sum(p.numel() for p in rebuilt.parameters()) == \
        sum(p.numel() for p in expected.model.parameters()) < 25_866
    assert main(["train", "--resume", str(out), "--epochs", "4", "--quiet"]) == 0
    assert "resuming" in capsys.readouterr().out
    continued = load_run(out)
    assert continued.epoch == 4 and load_path(out / "path.pt").epochs == [4]
    assert [m["epoch"] for m in map(json.loads, (out / "metrics.jsonl").read_text().split(
        "\n")[:-1])] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="exists already"):
        compact_run(source, out)
    # Compacted again: the architecture names the registered model's channels kept by both.
    again = compact_run(out, tmp_path / "again", ordered_mask(load_path(out / "path.pt"), 0.5))
    ckpt = load_checkpoint(again / "checkpoint.pt")
    twice = Architecture.from_dict(ckpt["architecture"])
    assert twice.kept is not None and after["architecture"]["kept"] is not None
    for name, kept in twice.kept.items():
        assert set(kept) <= set(after["architecture"]["kept"].get(name, range(64))), name
        assert len(kept) == ckpt["model"][name].shape[0], name
    twice.build().load_state_dict(ckpt["model"])
    assert Architecture.from_dict(twice.to_dict()) == twice
    # A compact run is fine-tuned as it is: its architecture goes into the fine-tuning run.
    assert main(["prune", str(out), "--keep", "0.5", "--finetune-epochs", "1", "--quiet"]) == 0
    tuned = next(p for p in source.parent.iterdir() if p.name.startswith(f"{out.name}-prune"))
    assert load_run(tuned).architecture == continued.architecture
