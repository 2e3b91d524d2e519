"""The `artifex-ckpt` command: `demo`, `ls` and `best`."""

from __future__ import annotations

import argparse
import datetime
import tempfile
from collections.abc import Sequence
from pathlib import Path

import orbax.checkpoint as ocp
from rich.console import Console
from rich.table import Table

from artifex_ckpt.errors import CheckpointError
from artifex_ckpt.manager import MetricCheckpointManager

__all__ = ["checkpoint_table", "console_main", "main"]


def _open(directory: str) -> MetricCheckpointManager:
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    return MetricCheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))


def _size(path: Path) -> str:
    total = float(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if total < 1024 or unit == "GiB":
            return f"{total:.0f} {unit}" if unit == "B" else f"{total:.1f} {unit}"
        total /= 1024
    raise AssertionError("unreachable")


def _time(manager: MetricCheckpointManager, step: int) -> str:
    nanoseconds = manager.metadata(step).commit_timestamp_nsecs
    if nanoseconds is None:
        return "?"
    moment = datetime.datetime.fromtimestamp(nanoseconds / 1e9)
    return moment.strftime("%m-%d %H:%M:%S")


def checkpoint_table(manager: MetricCheckpointManager) -> Table:
    """A rich table of the retained checkpoints: step, name, score, best/last, size, time."""
    settings = manager.settings
    best, latest = manager.best_step(), manager.latest_step()
    table = Table(title=f"{manager.directory}  ({settings.monitor}, {settings.mode})")
    for column in ("step", "name", settings.monitor, "best", "last", "size", "time"):
        table.add_column(column, justify="right" if column in ("step", "size") else "left")
    for step in sorted(manager.all_steps()):
        score = manager.score(step)
        table.add_row(
            str(step),
            manager.step_path(step).name,
            "-" if score is None else f"{score:.6g}",
            "*" if step == best else "",
            "*" if step == latest else "",
            _size(Path(manager.step_path(step))),
            _time(manager, step),
        )
    return table


def _demo(args: argparse.Namespace, console: Console) -> int:
    from artifex_ckpt.demo import run_demo

    directory = args.dir or tempfile.mkdtemp(prefix="artifex-ckpt-demo-")
    console.print(f"training a VAE on synthetic data; checkpoints go to {directory}")
    result = run_demo(directory, epochs=args.epochs, console=console, progress=not args.no_progress)
    return 0 if result.matches else 1


def _ls(args: argparse.Namespace, console: Console) -> int:
    manager = _open(args.dir)
    if not manager.all_steps():
        raise CheckpointError(f"{args.dir}: no checkpoints")
    console.print(checkpoint_table(manager))
    return 0


def _best(args: argparse.Namespace, console: Console) -> int:
    manager = _open(args.dir)
    best = manager.best_step()
    if best is None:
        raise CheckpointError(f"{args.dir}: no checkpoint with a finite {manager.settings.monitor}")
    print(manager.step_path(best))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="artifex-ckpt",
        description="Keep the k best and the newest checkpoints of a JAX/Flax run (on Orbax).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="train a small VAE with checkpointing, then restore the best",
        description="Train a small VAE on synthetic data (nothing is downloaded) with "
        "ModelCheckpoint, EarlyStopping and a progress bar; list the retained checkpoints; "
        "restore the best and check its validation loss against the stored score.",
    )
    demo.add_argument("dir", nargs="?", help="checkpoint directory (default: a new temp dir)")
    demo.add_argument("--epochs", type=int, default=20, help="maximum epochs (default: 20)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(run=_demo)
    ls = commands.add_parser("ls", help="table of the checkpoints in DIR")
    ls.add_argument("dir", metavar="DIR")
    ls.set_defaults(run=_ls)
    best = commands.add_parser("best", help="print the best checkpoint's path")
    best.add_argument("dir", metavar="DIR")
    best.set_defaults(run=_best)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (1 with a message on errors)."""
    args = _parser().parse_args(argv)
    console = Console()
    try:
        return int(args.run(args, console))
    except CheckpointError as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}")
        return 1


def console_main() -> None:
    """Console-script wrapper: exit with `main()`'s status."""
    raise SystemExit(main())
