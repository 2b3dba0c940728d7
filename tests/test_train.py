"""The training pipeline: run files, exact resume after SIGKILL, bad checkpoints, NaN losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dessilbi.config import ConfigError, load_config
from dessilbi.models import build_model
from dessilbi.train import CheckpointError, TrainingError, train

sys.path.insert(0, str(Path(__file__).parent))
from compare import assert_same

# Two quick epochs of the digits experiment (22 steps each, well under a second on 2 cores);
# nu = 5 makes Γ select a few filters of each layer within them.
QUICK = {"epochs": 2, "nu": 5}


def _cli(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dessilbi", *args],
        capture_output=True, text=True, timeout=300, check=False, **kwargs,  # type: ignore[arg-type]
    )


def test_run_directory_holds_config_metrics_path_and_weights(tmp_path: Path) -> None:
    """Every file a run promises is written, readable, and consistent with the others."""
    config = load_config("digits", {**QUICK, "out": str(tmp_path)})
    result = train(config, quiet=True)
    run = result.run_dir
    assert run == tmp_path / config.default_run_name
    assert run.name.startswith("digits-small_cnn-dessilbi-nu5-seed0-")
    assert load_config(run / "config.yaml") == config

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert lines[-1]["step"] == 2 * (1442 // 64)
    assert lines[-1]["test_acc"] == result.test_acc > 50.0
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert set(lines[-1]["selected"]) == {"conv1.weight", "conv2.weight", "conv3.weight"}

    # The initial weights are those of a fresh model built with the same seed.
    torch.manual_seed(config.seed)
    fresh = build_model("small_cnn", num_classes=10, in_channels=1, image_size=8)
    init = torch.load(run / "init.pt", weights_only=True)
    assert all(torch.equal(init[k], v) for k, v in fresh.state_dict().items())
    final = torch.load(run / "model.pt", weights_only=True)
    assert not torch.equal(final["conv1.weight"], init["conv1.weight"])

    path = torch.load(run / "path.pt", weights_only=True)
    assert path["epochs"].tolist() == [1, 2]
    assert path["group_norms"]["conv3.weight"].shape == (2, 64)
    assert path["support"]["conv3.weight"].shape == (2, 64)
    assert result.optimizer is not None
    gamma = result.optimizer.state[dict(result.model.named_parameters())["conv3.weight"]]["gamma"]  # type: ignore[union-attr]
    live = gamma.flatten(1).norm(dim=1) > 0
    assert torch.equal(path["support"]["conv3.weight"][-1], live)
    for name in path["names"]:
        entry = path["entry_epoch"][name]
        # A group in the support at the end of epoch e entered at epoch e or before.
        for e, support in zip(path["epochs"].tolist(), path["support"][name], strict=True):
            assert bool(((entry >= 1) & (entry <= e))[support].all())
        # Entry steps and entry epochs agree: entry step within that epoch's step range.
        steps = path["entry_step"][name]
        entered = steps >= 0
        assert torch.equal(entered, entry >= 1)
        assert bool(((steps[entered] - 1) // 22 + 1 == entry[entered]).all())
    selected = lines[-1]["selected"]["conv3.weight"]
    assert selected == [int(live.sum()), 64]
    assert 0 < selected[0] < 64, "the test needs a path that selects some but not all filters"


def test_sigkill_mid_epoch_then_resume_is_bitwise_equal(tmp_path: Path) -> None:
    """A run killed in the middle of epoch 2 and resumed ends bitwise equal to a whole run."""
    args = ["train", "--config", "digits", "--epochs", "3", "--nu", "5", "--quiet"]
    whole = _cli(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dessilbi", *args, "--out", str(out), "--log-every", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("epoch 2 step 2/"):  # 20 steps before the epoch's checkpoint
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run must be killed mid-epoch"
    run = next(out.iterdir())
    assert not (run / "model.pt").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1

    resumed = _cli("train", "--resume", str(run), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    reference = whole.stdout.splitlines()
    assert "run directory" in resumed.stdout

    a = torch.load(tmp_path / "whole" / run.name / "model.pt", weights_only=True)
    b = torch.load(run / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca = torch.load(tmp_path / "whole" / run.name / "checkpoint.pt", weights_only=True)
    cb = torch.load(run / "checkpoint.pt", weights_only=True)
    for pid, state in ca["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, cb["optimizer"]["state"][pid][key]), key
    metrics_a = [json.loads(x) for x in (tmp_path / "whole" / run.name / "metrics.jsonl")
                 .read_text().splitlines()]
    metrics_b = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    strip = [{k: v for k, v in m.items() if k != "epoch_time"} for m in metrics_a]
    assert strip == [{k: v for k, v in m.items() if k != "epoch_time"} for m in metrics_b]
    assert reference  # the uninterrupted run printed its summary too
    # The recorded path too, entry steps included.
    path_a = torch.load(tmp_path / "whole" / run.name / "path.pt", weights_only=True)
    path_b = torch.load(run / "path.pt", weights_only=True)
    assert_same(path_a, path_b)
    assert path_b["epochs"].tolist() == [1, 2, 3]
    assert set(path_b["entry_step"]) == {"conv1.weight", "conv2.weight", "conv3.weight"}


def test_rerun_of_a_finished_run_reports_it_and_other_config_is_refused(tmp_path: Path) -> None:
    """Same config again: the finished run is reported, not overwritten. Other config: error."""
    config = load_config("digits", {**QUICK, "out": str(tmp_path)})
    first = train(config, quiet=True)
    before = (first.run_dir / "model.pt").read_bytes()
    again = train(config, quiet=True)
    assert again.test_acc == first.test_acc
    assert (first.run_dir / "model.pt").read_bytes() == before

    other = load_config("digits", {**QUICK, "out": str(tmp_path), "lr": 0.05,
                                   "run_name": first.run_dir.name})
    with pytest.raises(TrainingError, match="lr: 0.1 -> 0.05"):
        train(other, quiet=True)
    assert (first.run_dir / "model.pt").read_bytes() == before


def test_damaged_and_foreign_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    config = load_config("digits", {**QUICK, "epochs": 1, "out": str(tmp_path)})
    run = train(config, quiet=True).run_dir
    good = (run / "checkpoint.pt").read_bytes()

    longer = load_config(run / "config.yaml", {"epochs": 2})
    (run / "checkpoint.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="damaged"):
        train(longer, resume_dir=run, quiet=True)
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        train(longer, resume_dir=run, quiet=True)

    (run / "checkpoint.pt").write_bytes(good)
    foreign = load_config(run / "config.yaml", {"epochs": 2, "model": "mlp"})
    with pytest.raises(CheckpointError, match="'small_cnn'.*'mlp'"):
        train(foreign, resume_dir=run, quiet=True)
    # Nothing already written was lost.
    assert (run / "checkpoint.pt").read_bytes() == good

    result = _cli("train", "--resume", str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert "config.yaml: missing" in result.stderr


def test_nonfinite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    config = load_config(
        "digits", {"epochs": 1, "out": str(tmp_path), "optimizer": "sgd", "lr": 1e12}
    )
    with pytest.raises(TrainingError, match="the loss became (nan|inf).*no checkpoint yet"):
        train(config, quiet=True)


@pytest.mark.parametrize("schedule,expected", [
    ("step", [0.1, 0.1, 0.01, 0.01, 0.001]),
    ("multistep", [0.1, 0.01, 0.01, 0.001, 0.001]),
    ("cosine", None),
])
def test_lr_schedules(tmp_path: Path, schedule: str, expected: list[float] | None) -> None:
    """The lr used in each epoch (as logged) follows the schedule."""
    config = load_config("digits", {
        "epochs": 5, "out": str(tmp_path), "optimizer": "sgd", "schedule": schedule,
        "lr_step": 2, "milestones": [1, 3],
    })
    run = train(config, quiet=True).run_dir
    lrs = [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    if expected is None:
        import math

        expected = [0.1 * 0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(5)]
    assert lrs == pytest.approx(expected)


def test_on_disk_image_folder_trains_through_worker_loading(tmp_path: Path) -> None:
    """The ImageNet path: a folder read lazily by DataLoader workers, classes from sub-folders."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", 8), ("val", 4)):
        for label, name in enumerate(("cat", "dog")):
            folder = tmp_path / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (40, 48, 3), generator=gen, dtype=torch.uint8)
                pixels[..., label] = 255  # a colour cue, so there is something to learn
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    config = load_config("imagenet_resnet18", {
        "data_dir": str(tmp_path / "images"), "model": "small_cnn", "epochs": 2,
        "batch_size": 4, "eval_batch_size": 4, "workers": 1, "out": str(tmp_path / "runs"),
        "nu": 5,
    })
    result = train(config, quiet=True)
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [4, 8]  # 16 images / batch 4, per epoch
    assert result.model is not None
    assert result.model.fc.out_features == 2  # type: ignore[union-attr]
    # Accuracy over 8 validation images is a multiple of 12.5 %.
    assert all(m["test_acc"] % 12.5 == 0 for m in lines)
    # The in-memory augmentation keys do not apply to a folder read from disk.
    crop = load_config(None, config.to_dict() | {"crop_padding": 2, "run_name": "crop"})
    with pytest.raises(ConfigError, match="crop_padding and flip apply to in-memory data sets"):
        train(crop, quiet=True)
    assert not (tmp_path / "runs" / "crop").exists()


# --------------------------------------------------------------------------- regressions


def test_every_run_file_is_written_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file reaches its name by a rename of a complete temporary file."""
    import dessilbi.run_files as run_files

    renamed: list[str] = []
    real_replace = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        assert Path(src).name.startswith(".") and Path(src).parent == Path(dst).parent
        renamed.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(run_files.os, "replace", replace)
    config = load_config("digits", {**QUICK, "out": str(tmp_path)})
    run = train(config, quiet=True).run_dir
    written = {p.name for p in run.iterdir()}
    assert written == {"config.yaml", "init.pt", "metrics.jsonl", "path.pt", "checkpoint.pt",
                       "model.pt", "model.json"}
    assert written <= set(renamed)
    assert renamed.count("metrics.jsonl") == 1 + config.epochs  # empty at the start, per epoch
    assert renamed.count("path.pt") == config.epochs  # once per epoch


def test_no_augment_reaches_on_disk_image_folders(tmp_path: Path) -> None:
    from PIL import Image

    from dessilbi.batches import load_run_data
    from dessilbi.distributed import DistInfo

    for split in ("train", "val"):
        folder = tmp_path / split / "cat"
        folder.mkdir(parents=True)
        Image.new("RGB", (40, 48)).save(folder / "0.png")
    base = {"data_dir": str(tmp_path), "model": "small_cnn"}
    augmented, _ = load_run_data(load_config("imagenet_resnet18", base), DistInfo())
    plain, test = load_run_data(load_config("imagenet_resnet18", {**base, "augment": False}),
                                DistInfo())
    assert augmented.train is True  # type: ignore[union-attr]
    assert plain.train is False and test.train is False  # type: ignore[union-attr]


def test_cosine_schedule_length_is_part_of_the_config(tmp_path: Path) -> None:
    """Extending a cosine run is refused unless the new schedule length is asked for."""
    from dessilbi.cli import _resume_config

    config = load_config("digits", {"epochs": 2, "schedule": "cosine", "optimizer": "sgd",
                                    "out": str(tmp_path)})
    assert config.schedule_epochs == 2
    run = train(config, quiet=True).run_dir
    assert load_config(run / "config.yaml").schedule_epochs == 2
    with pytest.raises(ConfigError, match=r"epochs: 4 exceed the cosine schedule's "
                       r"schedule_epochs 2.*--schedule-epochs 4"):
        _resume_config(run, {"epochs": 4})
    # The same run name with more epochs is another run (another schedule): refused.
    longer = load_config("digits", {"epochs": 4, "schedule": "cosine", "optimizer": "sgd",
                                    "out": str(tmp_path), "run_name": run.name})
    with pytest.raises(TrainingError, match="epochs: 2 -> 4, schedule_epochs: 2 -> 4"):
        train(longer, quiet=True)
    # Asked for explicitly: the first two epochs keep their lr, the rest follow the new curve.
    stretched = train(_resume_config(run, {"epochs": 4, "schedule_epochs": 4}),
                      resume_dir=run, quiet=True)
    lrs = [json.loads(x)["lr"] for x in (stretched.run_dir / "metrics.jsonl").read_text()
           .splitlines()]
    import math

    assert lrs[:2] == pytest.approx([0.1, 0.05])
    assert lrs[2:] == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in (2, 3)])
    assert load_config(run / "config.yaml").schedule_epochs == 4
    with pytest.raises(ConfigError, match="schedule_epochs.*cosine"):
        load_config("digits", {"schedule_epochs": 5})


def test_every_seed_and_epoch_has_its_own_data_streams() -> None:
    """(seed s, epoch e+1) used to repeat (seed s+1, epoch e) in the loader workers."""
    from dessilbi.batches import TrainBatches
    from dessilbi.data import load_dataset
    from dessilbi.distributed import DistInfo

    data = load_dataset("digits", None, "train")
    batches = {s: TrainBatches(data, load_config("digits", {"seed": s}), DistInfo(),
                               torch.device("cpu")) for s in range(30)}
    for seed_of in (TrainBatches.loader_seed, TrainBatches.order_seed):
        seeds = {seed_of(b, e) for b in batches.values() for e in range(30)}
        assert len(seeds) == 900
    assert batches[0].loader_seed(1) != batches[1].loader_seed(0)


def test_default_run_names_differ_across_a_sweep() -> None:
    base = load_config("digits")
    sweep = [load_config("digits", {key: value}) for key, value in (
        ("lam", 2.0), ("lam", 3.0), ("lr", 0.05), ("conv_structure", "channel"),
        ("linear_structure", "element"), ("kappa", 2.0), ("conv_lam", 0.5),
        ("precision", "bf16"), ("weight_decay", 1e-4), ("epochs", 31),
    )]
    names = {c.default_run_name for c in [base, *sweep]}
    assert len(names) == 1 + len(sweep)
    assert all(n.startswith("digits-small_cnn-dessilbi-nu70-seed0-") for n in names)
    # Where and how fast a run goes does not make it another run.
    same = load_config("digits", {"out": "elsewhere", "device": "cpu", "data_dir": "x",
                                  "workers": 1, "eval_batch_size": 10})
    assert same.default_run_name == base.default_run_name
    assert base.run_directory_name(2) == base.default_run_name + "-np2"


def test_per_layer_type_lambda_and_group_scaling() -> None:
    from dessilbi.train import build_optimizer

    config = load_config("digits", {"conv_lam": 0.1, "linear_lam": 1.0, "lam": 7.0,
                                    "conv_group_scaling": "sqrt_size",
                                    "linear_structure": "element"})
    model = build_model("small_cnn", num_classes=10, in_channels=1, image_size=8)
    groups = {g["structure"]: g for g in build_optimizer(config, model).param_groups}
    assert (groups["filter"]["lam"], groups["filter"]["group_scaling"]) == (0.1, "sqrt_size")
    assert (groups["element"]["lam"], groups["element"]["group_scaling"]) == (1.0, "none")
    default = build_optimizer(load_config("digits", {"lam": 7.0}), model)
    assert {g["lam"] for g in default.param_groups if g["structure"]} == {7.0}


def test_norm_scales_coupled_by_the_config(tmp_path: Path) -> None:
    """``norm_structure: element``: the batch-norm scales form DessiLBI's coupled group (with
    ``norm_lam``), the convs stay uncoupled; the key is refused with another value; a short
    run records the scales' path and loads its pruned network with the filters zeroed."""
    from dessilbi import load_run
    from dessilbi.path_record import load_path
    from dessilbi.train import build_optimizer

    config = load_config("digits", {"model": "resnet20", "conv_structure": "none",
                                    "norm_structure": "element", "norm_lam": 0.3,
                                    "linear_structure": "none",
                                    "model_kwargs": {"widths": [4, 8, 8]},
                                    "epochs": 2, "lr": 0.5, "nu": 1, "out": str(tmp_path)})
    assert config.config_hash() != load_config("digits").config_hash()
    model = build_model("resnet20", num_classes=10, in_channels=1, image_size=8,
                        widths=[4, 8, 8])
    coupled = [g for g in build_optimizer(config, model).param_groups if g["structure"]]
    assert [(g["structure"], g["lam"], len(g["params"])) for g in coupled] == \
        [("element", 0.3, 21)]
    with pytest.raises(ConfigError, match="invalid norm_structure: 'filter'"):
        load_config("digits", {"norm_structure": "filter"})
    run_dir = train(config, quiet=True).run_dir
    record = load_path(run_dir / "path.pt")
    assert all(name.endswith(".weight") and record.group_shape(name)[0] in (4, 8)
               for name in record.names) and len(record.names) == 21
    kept = sum(int(record.support(n, 2).sum()) for n in record.names)
    assert 0 < kept < sum(record.group_shape(n)[0] for n in record.names)
    pruned = load_run(run_dir, weights="pruned").model
    for name in record.names:
        dropped = ~record.support(name, 2)
        norm = pruned.get_submodule(name.removesuffix(".weight"))
        assert not bool(norm.weight[dropped].any()) and not bool(norm.bias[dropped].any())
    # The path's order and prune --keep --compact work on the norms' channels too.
    from dessilbi.cli import main
    from dessilbi.subnet import ordered_mask

    half = ordered_mask(record, 0.5)
    assert half.counts() == {n: record.group_shape(n)[0] // 2 for n in record.names}
    assert main(["prune", str(run_dir), "--keep", "0.5", "--compact", "--quiet"]) == 0
    compact_dir = next(run_dir.glob("compact-*"))
    assert "Parameters:" in (compact_dir / "report.md").read_text()


def test_affine_norms_couple_scale_and_shift_per_channel(tmp_path: Path) -> None:
    """``norm_structure: affine``: each batch norm's scale and shift form one tied group per
    channel; a short run records both with the same support, loads its pruned network with
    the unselected channels' filters and affine zeroed, and prunes half the channels once."""
    from dessilbi import load_run
    from dessilbi.path_record import load_path
    from dessilbi.structure import distinct_group_names
    from dessilbi.subnet import ordered_mask, support_mask
    from dessilbi.subnet.masks import path_order
    from dessilbi.train import build_optimizer, format_summary

    config = load_config("digits", {"model": "resnet20", "conv_structure": "none",
                                    "norm_structure": "affine", "norm_lam": 1.0,
                                    "linear_structure": "none", "norm_nu": 1,
                                    "model_kwargs": {"widths": [4, 8, 8]},
                                    "epochs": 2, "lr": 0.5, "nu": 100, "out": str(tmp_path)})
    model = build_model("resnet20", num_classes=10, in_channels=1, image_size=8,
                        widths=[4, 8, 8])
    coupled = [g for g in build_optimizer(config, model).param_groups if g["structure"]]
    assert len(coupled) == 21 and {g["structure"] for g in coupled} == {"tied"}
    assert {g["nu"] for g in coupled} == {1} and \
        all([n.rpartition(".")[2] for n in g["param_names"]] == ["weight", "bias"]
            for g in coupled)
    result = train(config, quiet=True)
    run_dir = result.run_dir
    record = load_path(run_dir / "path.pt")
    assert len(record.names) == 42
    summary = format_summary(result)
    assert "layer1.0.bn1.weight" in summary and ".bias" not in summary
    scales = [n for n in record.names if n.endswith(".weight")]
    for name in scales:
        assert torch.equal(record.support(name, 2),
                           record.support(name.replace(".weight", ".bias"), 2))
    kept = sum(int(record.support(n, 2).sum()) for n in scales)
    assert 0 < kept < sum(record.group_shape(n)[0] for n in scales)
    assert sorted(support_mask(record).keep) == sorted(scales)
    assert distinct_group_names(record.names) == scales
    half = ordered_mask(record, 0.5)
    assert half.counts() == {n: record.group_shape(n)[0] // 2 for n in scales}
    # Channels that never entered follow in the order of their joint norm sqrt(γ² + β²).
    # Made-up norms in which the shifts decide: the scales' order is the reverse.
    layer = max(scales, key=lambda n: int((record.entry_step(n) < 0).sum()))
    shift, count = layer.replace(".weight", ".bias"), record.group_shape(layer)[0]
    made_up = {layer: torch.linspace(0.1, 0.2, count), shift: torch.linspace(3.0, 1.0, count)}
    recorded = record.group_norms
    record.group_norms = lambda n: made_up[n].expand(len(record.epochs), -1) \
        if n in made_up else recorded(n)  # type: ignore[method-assign]
    order = path_order(record, layer, 2)
    out = order[(record.entry_step(layer) < 0)[order]]
    assert out.numel() >= 2 and out.tolist() == sorted(out.tolist())
    record.group_norms = recorded  # type: ignore[method-assign]
    pruned = load_run(run_dir, weights="pruned").model
    for name in scales:
        dropped = ~record.support(name, 2)
        norm = pruned.get_submodule(name.removesuffix(".weight"))
        assert not bool(norm.weight[dropped].any()) and not bool(norm.bias[dropped].any())
        assert bool(norm.weight[~dropped].all())


def test_norm_nu_sets_the_coupling_of_the_norm_scales_only() -> None:
    """``norm_nu``: the coupled batch-norm scales get their own ν, every other group keeps
    ``nu``; the key is part of the hash (away from its default) and must be positive."""
    from dessilbi.train import build_optimizer

    overrides = {"model": "resnet20", "norm_structure": "element", "linear_structure": "none",
                 "nu": 50,
                 "model_kwargs": {"widths": [4, 8, 8]}}
    config = load_config("digits", {**overrides, "norm_nu": 2})
    model = build_model("resnet20", num_classes=10, in_channels=1, image_size=8,
                        widths=[4, 8, 8])
    nus = {g["structure"]: g["nu"] for g in build_optimizer(config, model).param_groups}
    assert nus["element"] == 2 and nus["filter"] == 50
    assert config.config_hash() != load_config("digits", overrides).config_hash()
    with pytest.raises(ConfigError, match="invalid norm_nu"):
        load_config("digits", {"norm_structure": "element", "norm_nu": 0})
    # Without coupled norms it would only rename the run: refused, as norm_lam.
    for key in ("norm_nu", "norm_lam"):
        with pytest.raises(ConfigError, match=f"invalid {key}: 2.0 .*norm_structure is none"):
            load_config("digits", {key: 2.0})


def test_bf16_channels_last_trains_with_float32_state(tmp_path: Path) -> None:
    config = load_config("digits", {"epochs": 2, "precision": "bf16", "channels_last": True,
                                    "nu": 5, "out": str(tmp_path)})
    result = train(config, quiet=True)
    assert result.test_acc > 60
    assert result.model is not None and result.optimizer is not None
    conv = result.model.conv2.weight  # type: ignore[union-attr]
    assert conv.dtype == torch.float32 and conv.is_contiguous(memory_format=torch.channels_last)
    state = result.optimizer.state[conv]
    for key in ("v", "gamma", "momentum_buffer"):
        assert state[key].dtype == torch.float32, key
        assert state[key].is_contiguous(memory_format=torch.channels_last), key
    # Against fp32 the run differs only by rounding: the same accuracy within a few points.
    fp32 = train(load_config("digits", {"epochs": 2, "nu": 5, "out": str(tmp_path)}), quiet=True)
    assert abs(fp32.test_acc - result.test_acc) < 5


def test_fp16_steps_skipped_by_the_gradient_scaler_leave_w_v_and_gamma_unchanged() -> None:
    from dessilbi.numerics import gradient_scaler
    from dessilbi.optim import DessiLBI

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = DessiLBI([{"params": [model.weight], "structure": "filter"},
                    {"params": [model.bias], "structure": None}], lr=0.1, nu=0.5, lam=0.01,
                   momentum=0.9)
    scaler = gradient_scaler("fp16", torch.device("cpu"))
    assert scaler.is_enabled()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def step(inputs: torch.Tensor = x) -> None:
        opt.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(model(inputs), y)).backward()
        scaler.step(opt)
        scaler.update()

    step()
    step()
    before = [model.weight.detach().clone(), *(t.clone() for t in opt.state[model.weight].values())]
    scaler.update(3e38)  # the next step's scaled gradients overflow: it is skipped
    step(x * 1e3)
    after = [model.weight, *opt.state[model.weight].values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert scaler.get_scale() == pytest.approx(1.5e38)  # and the scale was lowered
    scaler.update(2.0**8)
    step()
    assert not torch.equal(model.weight, before[0])
    assert int((opt.state[model.weight]["gamma"].norm(dim=1) > 0).sum()) > 0


def test_subnormals_are_flushed_while_training_on_cpu_and_only_then(tmp_path: Path) -> None:
    from dessilbi.callbacks import Callback

    class Probe(Callback):
        def __init__(self) -> None:
            self.seen: list[float] = []

        def on_step_end(self, run: object) -> None:
            # Subnormal results left over, on every intra-op thread's share of the work.
            self.seen.append(int(tiny.mul(1.0).count_nonzero()))

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tiny = torch.full((1 << 16,), 1e-39)
        assert int(tiny.mul(1.0).count_nonzero()) == tiny.numel()  # the pool exists, unflushed
        flushed, kept = Probe(), Probe()
        base = {"epochs": 1, "optimizer": "sgd", "out": str(tmp_path)}
        train(load_config("digits", base), quiet=True, callbacks=[flushed])
        after = int(tiny.mul(1.0).count_nonzero())
        train(load_config("digits", {**base, "flush_denormal": False}), quiet=True,
              callbacks=[kept])
    finally:
        torch.set_num_threads(threads)
    assert set(flushed.seen) == {0}
    assert set(kept.seen) == {tiny.numel()}
    assert after == tiny.numel()  # put back as it was, on every thread


def test_fp16_run_saves_its_gradient_scaler_and_resumes_bitwise(tmp_path: Path) -> None:
    config = {"model": "mlp", "model_kwargs": {"hidden": [32]}, "precision": "fp16",
              "conv_structure": "none", "linear_structure": "filter", "nu": 5,
              "out": str(tmp_path)}
    with pytest.warns(RuntimeWarning, match="fp16 on a CPU"):
        whole = train(load_config("digits", {**config, "epochs": 2, "run_name": "whole"}),
                      quiet=True)
        part = train(load_config("digits", {**config, "epochs": 1, "run_name": "part"}),
                     quiet=True)
        scaler = torch.load(part.run_dir / "checkpoint.pt", weights_only=True)["scaler"]
        assert scaler["scale"] > 0 and "_growth_tracker" in scaler
        resumed = train(load_config(part.run_dir / "config.yaml", {"epochs": 2}),
                        resume_dir=part.run_dir, quiet=True)
    assert resumed.test_acc == whole.test_acc > 50
    assert_same(torch.load(whole.run_dir / "model.pt", weights_only=True),
                torch.load(resumed.run_dir / "model.pt", weights_only=True))


def test_a_training_subset_is_drawn_with_the_seed_and_the_test_set_stays_whole() -> None:
    from dessilbi.batches import load_run_data
    from dessilbi.distributed import DistInfo

    full, test = load_run_data(load_config("digits"), DistInfo())
    picked = [load_run_data(load_config("digits", {"train_subset": 300, "seed": seed}),
                            DistInfo()) for seed in (0, 0, 1)]
    assert [len(train_set) for train_set, _ in picked] == [300, 300, 300]
    assert all(len(test_set) == len(test) for _, test_set in picked)
    assert torch.equal(picked[0][0].images, picked[1][0].images)
    assert not torch.equal(picked[0][0].images, picked[2][0].images)
    # Every picked image is a training image with its own label.
    index = {bytes(img.flatten().tolist()): int(label)
             for img, label in zip(full.images, full.labels, strict=True)}
    assert all(index[bytes(img.flatten().tolist())] == int(label)
               for img, label in zip(picked[0][0].images, picked[0][0].labels, strict=True))
    assert load_config("digits", {"train_subset": 300}).config_hash() != \
        load_config("digits").config_hash()
    with pytest.raises(ConfigError, match="invalid train_subset: 5000 .*1442 images"):
        load_run_data(load_config("digits", {"train_subset": 5000}), DistInfo())
    with pytest.raises(ConfigError, match="invalid train_subset: 0"):
        load_config("digits", {"train_subset": 0})
