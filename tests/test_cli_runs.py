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


def test_a_diverged_run_names_the_command_that_trains_on(tmp_path: Path) -> None:
    diverged = _cli("--optimizer", "sgd", "--lr", "1e12", "--epochs", "1", "--quiet",
                    "--out", str(tmp_path))
    assert diverged.returncode == 1
    assert "rerun the command with a lower learning rate (--lr 1e+11)" in diverged.stderr
    # And the command it names is accepted: another lr is another run directory.
    lower = _cli("--optimizer", "sgd", "--lr", "0.05", "--epochs", "1", "--quiet",
                 "--out", str(tmp_path))
    assert lower.returncode == 0, lower.stderr
    with pytest.raises(TrainingError, match="and another --run-name"):
        train(load_config("digits", {"optimizer": "sgd", "lr": 1e12, "epochs": 1,
                                     "out": str(tmp_path), "run_name": "named"}), quiet=True)


def test_ctrl_c_ends_with_one_line_and_the_run_resumes(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dessilbi", "train", *QUICK, "--epochs", "3", "--log-every", "1",
         "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:
        if line.startswith("epoch 2 step 2/"):
            os.kill(proc.pid, signal.SIGINT)
            break
    stderr = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    run = next(tmp_path.iterdir())
    assert f"interrupted in epoch 2; {run} keeps the checkpoint of epoch 1" in stderr
    resumed = _cli("--resume", str(run), "--quiet")
    assert resumed.returncode == 0 and f"resuming {run} from epoch 1 of 3" in resumed.stdout


def test_results_without_a_checkpoint_are_not_overwritten(tmp_path: Path) -> None:
    config = load_config("digits", {"epochs": 1, "out": str(tmp_path)})
    run = train(config, quiet=True).run_dir
    (run / "checkpoint.pt").unlink()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(TrainingError, match="holds the results of an earlier run "
                       r"\(metrics.jsonl, path.pt, model.pt\) but no checkpoint.pt"):
        train(config, quiet=True)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_error_messages_name_the_option_and_the_closest_one() -> None:
    bad_structure = _cli("--conv-structure", "foo", "--epochs", "1")
    assert bad_structure.returncode == 1
    assert ("invalid conv_structure: 'foo' (expected filter, channel, element or none)"
            in bad_structure.stderr)
    typo = _cli("--nuu", "20")
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
    help_text = " ".join(_cli("--help").stdout.split())
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
