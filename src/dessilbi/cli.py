"""The ``dessilbi`` command line."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dessilbi.config import ConfigError, TrainConfig, add_config_arguments, load_config

if TYPE_CHECKING:
    from dessilbi.subnet.masks import FilterMask

__all__ = ["main"]

_DESCRIPTION = """\
DessiLBI: train a network and read off its sparse structure along the whole path.

Examples:
  dessilbi train                                  # the digits demo (embedded data)
  dessilbi report runs/<run directory>            # its figures and report.html
  dessilbi train --config mnist_lenet5 --data-dir ../shared/data
  dessilbi train --config cifar10_resnet20 --data-dir ../shared/data/cifar10-jpeg --epochs 20
  dessilbi train --resume runs/mnist-lenet5-dessilbi-nu20-seed0-<hash>
  torchrun --nproc_per_node=2 -m dessilbi train --config cifar10_resnet56 \\
      --dataset cifar10_jpeg --data-dir ../shared/data/cifar10-jpeg
"""


def _train_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "train",
        help="train a model (DessiLBI, SGD or Adam) and record its path",
        description=(
            "Train a model and record, every epoch, the accuracy of the dense weights W and of "
            "the sparse network W~ = W * 1[Gamma != 0], the selected groups per layer, and the "
            "path (group norms, supports, entry epochs) into a run directory. Values come from "
            "the defaults, then --config, then the options below."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        help="a YAML config file, or the name of a shipped one (default: digits): "
        + ", ".join(sorted(_shipped())),
    )
    parser.add_argument(
        "--resume", metavar="RUN_DIR", type=Path,
        help="continue the run in RUN_DIR from its last checkpoint (its config is reused; "
        "--epochs may extend it)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars; a line per epoch")
    parser.add_argument("--report", action="store_true",
                        help="write the run's report (dessilbi report) when training ends")
    parser.add_argument(
        "--log-every", type=int, default=0, metavar="STEPS",
        help="also print a line every STEPS training steps (default: never)",
    )
    add_config_arguments(parser)
    return parser


def _refuse_unknown(parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    """An error naming the unknown option, with the closest known one (``--nuu``: ``--nu``)."""
    word = next((u for u in unknown if u.startswith("--")), unknown[0])
    known = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    close = difflib.get_close_matches(word.split("=")[0], known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    if not word.startswith("-"):
        example = ("--epochs 5,10,20; --compare takes the run directories after it"
                   if "--compare" in known else "--exclude conv1,conv2")
        hint = f" (list values are comma-separated: {example})"
    parser.error(f"unrecognized argument {word!r}{hint}")


def _shipped() -> list[str]:
    from dessilbi.config import builtin_configs

    return list(builtin_configs())


def _resume_config(run_dir: Path, overrides: dict[str, Any]) -> TrainConfig:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"{saved}: missing; is {run_dir} a dessilbi run directory?")
    allowed = {"epochs", "schedule_epochs", "device", "workers", "eval_batch_size", "data_dir",
               "download"}
    changed = sorted(set(overrides) - allowed)
    if changed:
        raise ConfigError(
            f"cannot change {', '.join(changed)} when resuming (only {', '.join(sorted(allowed))})"
        )
    return load_config(saved, overrides)


def _report_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "report",
        help="figures and a one-page HTML report of a run directory",
        description=(
            "Write RUN_DIR/report/: the solution path of every coupled layer (one curve of "
            "||W_g|| per group, coloured by whether Gamma selected it), selected groups per "
            "layer, accuracies of W and W~, loss and sparsity against epoch, entry epochs, the "
            "first coupled convolution's filters, and report.html holding them all (PNG and "
            "SVG files beside it). A run still in progress is reported as far as it got."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    parser.add_argument("--compare", metavar="OTHER_RUN", type=Path, nargs="+", default=[],
                        help="runs shown beside it (an SGD run's paths on the same scale)")
    parser.add_argument("--epochs", metavar="E1,E2", default="",
                        help="epochs marked in the path figures, comma-separated (20,40,80)")
    return parser


def _prune_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "prune",
        help="a run's pruned subnetwork: fine-tuned with its mask held fixed, and compacted",
        description=(
            "Choose filters from RUN_DIR's path (Gamma's support at the last or a given epoch, "
            "or the first groups in the path's order up to --keep, or a --mask file), fine-tune "
            "the pruned network through the training loop with the pruned filters, biases and "
            "norm channels held at zero (a run directory of its own, resumable), and with "
            "--compact remove them physically (torch-pruning) into compact/ (model.pt and "
            "compact.json)."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    parser.add_argument("--epoch", type=int, help="the path's epoch (default: the last)")
    parser.add_argument("--keep", type=float, metavar="RATIO",
                        help="keep this share of every layer's filters, in the path's order")
    parser.add_argument("--round-to", type=int, default=1, metavar="N",
                        help="with --keep: round every layer's kept filters up to a multiple "
                        "of N (8: whole channel blocks of CPU and GPU kernels)")
    parser.add_argument("--mask", type=Path, metavar="FILE", help="a mask file (mask.json)")
    parser.add_argument("--flops", type=float, metavar="SHARE",
                        help="the longest stretch of the path whose compact network has at "
                        "most this share of the dense FLOPs (0.5: half)")
    parser.add_argument("--params", type=float, metavar="SHARE",
                        help="the same for the share of the parameters")
    parser.add_argument("--finetune-epochs", type=int, default=0, metavar="N",
                        help="fine-tuning epochs (default: 0, no fine-tuning)")
    parser.add_argument("--optimizer", help="fine-tuning optimizer (default: the run's)")
    parser.add_argument("--lr", type=float, help="fine-tuning learning rate (default: the run's)")
    parser.add_argument("--compact", action="store_true",
                        help="write the compact network (pruned filters removed)")
    parser.add_argument("--as-run", action="store_true",
                        help="with --compact: also write it as a run directory beside the run "
                        "(weights and optimizer state sliced: DessiLBI's V, Gamma, momentum), "
                        "which dessilbi train --resume DIR --epochs N trains on")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _export_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "export",
        help="a run's network (or its compact network) as ONNX, checked with onnxruntime",
        description=(
            "Write SOURCE's network as ONNX (dynamic batch): SOURCE is a run directory (its "
            "final weights, or --weights sparse / pruned) or the compact/ folder of "
            "dessilbi prune --compact. The file is checked against onnxruntime on CPU (max "
            "abs difference <= 1e-4). Needs pip install 'dessilbi[export]'."
        ),
    )
    parser.add_argument("source", metavar="SOURCE", type=Path)
    parser.add_argument("--out", type=Path, help="the .onnx file (default: SOURCE/model.onnx)")
    parser.add_argument("--weights", choices=("dense", "sparse", "pruned"), default="dense",
                        help="for a run directory: W, W~ or the pruned network (default: W)")
    return parser


def _epochs(text: str) -> list[int]:
    try:
        return [int(e) for e in text.split(",") if e.strip()]
    except ValueError as exc:
        raise ConfigError(f"invalid --epochs: {text!r} (expected comma-separated integers)") \
            from exc


def _report(run_dir: Path, compare: Sequence[Path], epochs: Sequence[int]) -> int:
    from dessilbi.report import ReportError, write_report

    try:
        page = write_report(run_dir, compare, epochs)
    except (ReportError, ImportError, ConfigError) as exc:
        print(f"dessilbi: error: {exc}", file=sys.stderr)
        return 1
    print(f"report: {page}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dessilbi`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="dessilbi", description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = {"train": _train_parser(sub), "report": _report_parser(sub),
                "prune": _prune_parser(sub), "export": _export_parser(sub)}
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _refuse_unknown(commands.get(args.command, parser), unknown)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "report":
        try:
            return _report(args.run_dir, args.compare, _epochs(args.epochs))
        except ConfigError as exc:
            print(f"dessilbi: error: {exc}", file=sys.stderr)
            return 1
    if args.command == "export":
        return _export(args)
    with _interrupt_on_sigterm():
        return _prune(args) if args.command == "prune" else _train(args)


@contextlib.contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """While training, end on SIGTERM (a scheduler's preemption, torchrun stopping its
    workers, a ``kill``) as on Ctrl-C: the last complete epoch stays, and the message names the
    command that continues. (A background job of a non-interactive shell ignores SIGINT.) The
    previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _export(args: argparse.Namespace) -> int:
    from dessilbi.export import ExportError, export_onnx
    from dessilbi.run_files import CheckpointError
    from dessilbi.runs import load_run
    from dessilbi.subnet.prune import example_input, load_compact

    source: Path = args.source
    try:
        if (source / "compact.json").is_file():  # compact/ inside the run it came from
            example = example_input(load_run(source.parent))
            model = load_compact(source, example)
        else:
            run = load_run(source, weights=args.weights)
            model, example = run.model, example_input(run)
        out = args.out or source / "model.onnx"
        difference = export_onnx(model, example, out)
    except (ConfigError, CheckpointError, ExportError, ValueError, ImportError) as exc:
        print(f"dessilbi: error: {exc}", file=sys.stderr)
        return 1
    print(f"onnx: {out} (onnxruntime agrees to {difference:.1e})")
    return 0


def _say_interrupted(exc: BaseException) -> None:
    """One line for the user; under torchrun only from rank 0, since every worker stops alike
    and the line (which checkpoint is kept, how to go on) is the same for all."""
    from dessilbi.distributed import DistInfo

    if DistInfo.from_env().is_main:
        print(f"dessilbi: {exc}", file=sys.stderr)


def _prune(args: argparse.Namespace) -> int:
    from dessilbi.data import DatasetError
    from dessilbi.run_files import CheckpointError, TrainingError, TrainingInterrupted
    from dessilbi.subnet.masks import MaskFileError

    try:
        return _prune_run(args)
    except TrainingInterrupted as exc:
        _say_interrupted(exc)
        return 130
    except KeyboardInterrupt:
        print("dessilbi: interrupted outside training; files are written whole or not at all, "
              "and the same command starts again", file=sys.stderr)
        return 130
    except (ConfigError, DatasetError, CheckpointError, TrainingError, MaskFileError,
            ValueError, FileNotFoundError, ImportError) as exc:
        print(f"dessilbi: error: {exc}", file=sys.stderr)
        return 1


def _prune_run(args: argparse.Namespace) -> int:
    from dessilbi.runs import load_run
    from dessilbi.subnet import compact
    from dessilbi.subnet.prune import (
        choose_mask,
        example_input,
        finetune,
        mask_hash,
        save_compact,
    )

    if args.as_run and not args.compact:
        raise ValueError("--as-run writes the compact network as a run: add --compact")
    mask = choose_mask(args.run_dir, epoch=args.epoch, keep=args.keep, mask_file=args.mask,
                       flops=args.flops, params=args.params, round_to=args.round_to)
    print(f"mask: {mask.kept} of {mask.total} filters kept ({mask.source.get('method')}, "
          f"epoch {mask.source.get('epoch', '-')})")
    target = args.run_dir
    if args.epoch is not None and args.finetune_epochs == 0:
        print(f"note: the mask is from epoch {args.epoch}, the weights from the run's last "
              "epoch (only those are kept)", file=sys.stderr)
    if args.finetune_epochs > 0:
        overrides = {k: v for k, v in (("optimizer", args.optimizer), ("lr", args.lr))
                     if v is not None}
        result = finetune(args.run_dir, mask, args.finetune_epochs, overrides, args.quiet)
        target = result.run_dir
        print(f"fine-tuned: {target} (test accuracy {result.test_acc:.2f} %)")
    if args.compact:
        run = load_run(target)
        example = example_input(run)
        out = compact(run.model, example, keep=mask.keep)
        # Beside the source run (no fine-tuning), one folder per mask: nothing is overwritten.
        name = "compact" if target != args.run_dir else f"compact-{mask_hash(mask, {})}"
        folder = save_compact(out, run.architecture, mask, target / name)
        from dessilbi.run_files import atomic_write_text
        from dessilbi.subnet.report import compact_report

        report = compact_report(run.model, out.model, example)
        atomic_write_text(report, folder / "report.md")
        totals = next(line for line in report.splitlines() if line.startswith("Parameters:"))
        print(f"compact: {folder} (report.md: per layer, and CPU latency)\n{totals}")
        if args.as_run:
            _write_compact_run(args.run_dir, target, mask)
    return 0


def _write_compact_run(source: Path, target: Path, mask: FilterMask) -> None:
    from dessilbi.run_files import load_checkpoint
    from dessilbi.subnet.compact_run import compact_run
    from dessilbi.subnet.prune import mask_hash

    # The fine-tuning run holds its mask; the source run takes the chosen one. The epoch in
    # the name: a source trained on is compacted into another directory.
    epoch = load_checkpoint(target / "checkpoint.pt")["epoch"]
    out = target.parent / f"{target.name}-compact-{mask_hash(mask, {})}-e{epoch}"
    if (out / "checkpoint.pt").is_file():
        print(f"compact run: {out} exists already; train it on with "
              f"`dessilbi train --resume {out} --epochs N`")
        return
    compact_run(target, out, mask if target == source else None)
    print(f"compact run: {out}; train it on with `dessilbi train --resume {out} --epochs N`")


def _train(args: argparse.Namespace) -> int:
    from dessilbi.data import DatasetError
    from dessilbi.train import (
        CheckpointError,
        TrainingError,
        TrainingInterrupted,
        format_summary,
        train,
    )

    options = vars(args)
    reserved = {"command", "config", "resume", "quiet", "log_every", "report"}
    overrides = {k: v for k, v in options.items() if k not in reserved}
    if args.report:  # before training, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("dessilbi: error: --report needs matplotlib: pip install 'dessilbi[report]'",
                  file=sys.stderr)
            return 1
    try:
        if args.resume is not None:
            if args.config is not None:
                raise ConfigError("--config and --resume exclude each other")
            config = _resume_config(args.resume, overrides)
        else:
            config = load_config(args.config or "digits", overrides)
        result = train(config, resume_dir=args.resume, quiet=args.quiet, log_every=args.log_every)
    except TrainingInterrupted as exc:
        _say_interrupted(exc)
        return 130  # the shell's status for an end by SIGINT
    except KeyboardInterrupt:
        print("dessilbi: interrupted while setting up, before training; nothing was changed, "
              "and the same command starts again", file=sys.stderr)
        return 130
    except (ConfigError, DatasetError, CheckpointError, TrainingError, ValueError,
            FloatingPointError, ImportError) as exc:
        # Bad input of every kind (invalid hyperparameters included) and a diverged run end
        # with one line naming the problem, not a traceback.
        print(f"dessilbi: error: {exc}", file=sys.stderr)
        return 1
    from dessilbi.distributed import DistInfo

    if not DistInfo.from_env().is_main:
        return 0
    print(format_summary(result))
    return _report(result.run_dir, (), ()) if args.report else 0


if __name__ == "__main__":
    sys.exit(main())
