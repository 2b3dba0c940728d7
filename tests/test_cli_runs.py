"""What the command line says and keeps when a run is rerun, extended, stopped or diverges."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dessilbi.config import load_config
from dessilbi.train import TrainingError, train

QUICK = ["--epochs", "2", "--nu", "5", "--quiet"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dessilbi", "train", *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_runs_that_differ_in_epochs_or_processes_get_their_own_directories(
    tmp_path: Path,
) -> None:
    out = ["--out", str(tmp_path)]
    first = _cli(*QUICK, *out)
    assert first.returncode == 0, first.stderr
    assert "new run:" in first.stdout and "(2 epochs)" in first.stdout
    again = _cli(*QUICK, *out)
    assert again.returncode == 0
    assert "finished (2/2 epochs), nothing to train" in again.stdout
    shorter = _cli("--epochs", "1", "--nu", "5", "--quiet", *out)
    assert shorter.returncode == 0 and "new run:" in shorter.stdout  # not the 2-epoch run
    assert len(list(tmp_path.iterdir())) == 2
    config = load_config("digits", {"nu": 5, "epochs": 2})
    assert config.run_directory_name(2) != config.run_directory_name(1)

    run = tmp_path / config.default_run_name
    longer = _cli("--resume", str(run), "--epochs", "3", "--quiet")
    assert longer.returncode == 0 and f"resuming {run} from epoch 2 of 3" in longer.stdout
    cut = _cli("--resume", str(run), "--epochs", "1", "--quiet")
    assert cut.returncode == 1 and "has trained 3 epochs already" in cut.stderr
    named = _cli(*QUICK, "--epochs", "4", "--run-name", run.name, *out)
    assert named.returncode == 1
    assert f"dessilbi train --resume {run} --epochs 4" in named.stderr
    # The 2-epoch command again, after the run was extended to 3: not told to cut it back.
    original = _cli(*QUICK, "--run-name", run.name, *out)
    assert original.returncode == 1
    assert "holds this run extended to 3 epochs" in original.stderr
    assert "--epochs 2`" not in original.stderr


def test_a_diverged_run_names_the_command_that_trains_on(tmp_path: Path) -> None:
    diverged = _cli("--optimizer", "sgd", "--lr", "1e12", "--epochs", "1", "--quiet",
                    "--out", str(tmp_path))
    assert diverged.returncode == 1
    run = next(tmp_path.iterdir())
    command = f"dessilbi train --config {run / 'config.yaml'} --lr 1e+11"
    assert f"`{command}`" in diverged.stderr
    # The command it names is accepted: a new run (it diverges too, at lr 1e11).
    again = _cli(*command.split()[2:], "--quiet")
    assert "the loss became" in again.stderr and "already holds" not in again.stderr
    assert len(list(tmp_path.iterdir())) == 2
    with pytest.raises(TrainingError, match="--run-name named-lr1e"):
        train(load_config("digits", {"optimizer": "sgd", "lr": 1e12, "epochs": 1,
                                     "out": str(tmp_path), "run_name": "named"}), quiet=True)


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_ends_with_one_line_and_the_run_resumes(tmp_path: Path, sent: int) -> None:
    """Ctrl-C, and SIGTERM (a scheduler's preemption) alike."""
    proc = subprocess.Popen(
        # Batch 8: 180 steps an epoch. On a busy machine this process may read the lines late
        # (the pipe holds some epochs of them), so the run has epochs to spare and the signal
        # may land after epoch 2.
        [sys.executable, "-m", "dessilbi", "train", *QUICK, "--epochs", "12", "--log-every",
         "1", "--batch-size", "8", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell's background job (`make test &`, nohup) ignores SIGINT, and Python keeps an
        # ignored SIGINT ignored: give the run the default a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:
        if line.startswith("epoch 2 step 2/"):
            os.kill(proc.pid, sent)
            break
    _, stderr = proc.communicate(timeout=120)  # drains stdout too: a full pipe would block it
    assert proc.returncode == 130
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    run = next(tmp_path.iterdir())
    found = re.search(rf"interrupted in epoch (\d+); {re.escape(str(run))} keeps the "
                      r"checkpoint of epoch (\d+)", stderr)
    assert found is not None, stderr
    epoch, kept = int(found[1]), int(found[2])
    assert epoch >= 2 and kept == epoch - 1
    resumed = _cli("--resume", str(run), "--quiet", "--epochs", str(kept + 1))
    assert resumed.returncode == 0 and f"resuming {run} from epoch {kept} of" in resumed.stdout


@pytest.mark.parametrize("rank", [None, "0", "1"])
def test_only_rank_0_says_it_was_interrupted(
        rank: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under torchrun every worker is stopped alike: one line from rank 0, status 130 from all."""
    import dessilbi.train
    from dessilbi.cli import main
    from dessilbi.run_files import TrainingInterrupted

    def stopped(*args: object, **kwargs: object) -> None:
        raise TrainingInterrupted("interrupted in epoch 2; runs/x keeps the checkpoint of epoch 1")

    monkeypatch.setattr(dessilbi.train, "train", stopped)
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    assert main(["train", "--epochs", "1", "--quiet"]) == 130
    said = capsys.readouterr().err
    assert said == ("" if rank == "1" else
                    "dessilbi: interrupted in epoch 2; runs/x keeps the checkpoint of epoch 1\n")


def test_results_without_a_checkpoint_are_not_overwritten(tmp_path: Path) -> None:
    config = load_config("digits", {"epochs": 1, "out": str(tmp_path)})
    run = train(config, quiet=True).run_dir
    (run / "checkpoint.pt").unlink()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(TrainingError, match="holds the results of an earlier run "
                       r"\(metrics.jsonl, path.pt, model.pt, model.json\) but no checkpoint"):
        train(config, quiet=True)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # What a crash while epoch 1 was saved leaves (its path.pt and metrics line, no checkpoint,
    # no final weights) holds nothing to lose: the same command starts the run over.
    (run / "model.pt").unlink()
    (run / "model.json").unlink()
    again = train(config, quiet=True)
    assert again.epochs == 1 and (run / "checkpoint.pt").is_file()


def test_error_messages_name_the_option_and_the_closest_one() -> None:
    bad_structure = _cli("--conv-structure", "foo", "--epochs", "1", "--out", "/nonexistent")
    assert bad_structure.returncode == 1
    assert ("invalid conv_structure: 'foo' (expected filter, tied, channel, element or none)"
            in bad_structure.stderr)
    typo = _cli("--nuu", "20", "--out", "/nonexistent")
    assert typo.returncode == 2
    assert "unrecognized argument '--nuu'; did you mean --nu?" in typo.stderr
    for key, value, expected in (("nu", -1.0, "> 0"), ("momentum", 1.0, "in [0, 1)"),
                                 ("lam", -1.0, ">= 0")):
        message = f"invalid {key}: {value} (expected {expected}"
        with pytest.raises(ValueError, match=re.escape(message)):
            load_config("digits", {key: value})

    import torch
    from torch import nn

    from dessilbi import DessiLBI, selected_groups, structured_param_groups

    with pytest.raises(ValueError, match=r"invalid conv: 'filters' \(expected 'filter'"):
        structured_param_groups(nn.Conv2d(1, 2, 3), conv="filters")
    net, other = nn.Conv2d(1, 2, 3), nn.Conv2d(1, 2, 3)
    optimizer = DessiLBI(structured_param_groups(other), lr=0.1)
    with pytest.raises(ValueError, match="holds none of the model's parameters"):
        selected_groups(net, optimizer)
    assert selected_groups(other, optimizer) == {"weight": (0, 2)}
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    assert selected_groups(net, sgd) == {}  # holds them, none coupled: nothing selected


def test_help_shows_defaults_list_formats_and_the_models() -> None:
    raw = _cli("--help").stdout
    help_text = " ".join(raw.split())
    assert "(default: none) (default" not in help_text
    for option_help in help_text.split(" --")[1:]:
        assert option_help.count("(default") <= 1, option_help
    assert "(default: 0.1)" in help_text and "(default: dessilbi)" in help_text
    assert "comma-separated (conv1,conv2" in help_text
    assert "resnet56_bottleneck" in help_text and "$DESSILBI_DATA" in help_text


def test_the_demo_config_trains_on_one_thread_and_gives_the_thread_count_back(
    tmp_path: Path,
) -> None:
    import torch

    from dessilbi.callbacks import Callback

    class Threads(Callback):
        seen: set[int] = set()

        def on_step_end(self, run: object) -> None:
            self.seen.add(torch.get_num_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        probe = Threads()
        train(load_config("digits", {"epochs": 1, "out": str(tmp_path)}), quiet=True,
              callbacks=[probe])
        assert load_config("digits").threads == 1 and probe.seen == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_cifar_batches_error_points_to_the_jpeg_reader(tmp_path: Path) -> None:
    from dessilbi.data import DatasetError, load_dataset

    (tmp_path / "train.zip").write_bytes(b"")
    with pytest.raises(DatasetError, match="holds the JPEG copy of CIFAR-10, which --dataset "
                       "cifar10_jpeg reads"):
        load_dataset("cifar10", tmp_path, "train")


def test_a_two_process_run_does_not_land_in_a_one_process_run(tmp_path: Path) -> None:
    from dessilbi.run_files import RunFiles

    config = load_config("digits", {"epochs": 1, "out": str(tmp_path)})
    single = train(config, quiet=True).run_dir
    files, ckpt = RunFiles.open(config, None, is_main=True, world_size=2)
    assert ckpt is None and files.run_dir == single.with_name(single.name + "-np2")


def test_one_thread_gives_the_same_figures_whatever_the_thread_count(tmp_path: Path) -> None:
    import json

    import torch

    before = torch.get_num_threads()
    records = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            run = train(load_config("digits", {"epochs": 1, "out": str(tmp_path / str(threads))}),
                        quiet=True).run_dir
            line = json.loads((run / "metrics.jsonl").read_text())
            records.append({k: v for k, v in line.items() if k != "epoch_time"})
    finally:
        torch.set_num_threads(before)
    assert records[0] == records[1]
