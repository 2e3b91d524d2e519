"""The `artifex-ckpt` command: `demo`, `ls` and `best`."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence

import orbax.checkpoint as ocp
from rich.console import Console
from rich.markup import escape

from artifex_ckpt.directory import absolute
from artifex_ckpt.errors import CheckpointError
from artifex_ckpt.manager import MetricCheckpointManager
from artifex_ckpt.table import checkpoint_table

__all__ = ["console_main", "main"]


def _open(directory: str) -> MetricCheckpointManager:
    path = absolute(directory)
    if not path.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    return MetricCheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))


def _demo(args: argparse.Namespace, console: Console) -> int:
    from artifex_ckpt.demo import run_demo

    directory = args.dir or tempfile.mkdtemp(prefix="artifex-ckpt-demo-")
    console.print(f"training a VAE on synthetic data; checkpoints go to {directory}")
    result = run_demo(directory, epochs=args.epochs, console=console, progress=not args.no_progress)
    return 0 if result.matches else 1


def _ls(args: argparse.Namespace, console: Console) -> int:
    with _open(args.dir) as manager:
        if not manager.all_steps():
            raise CheckpointError(f"{args.dir}: no checkpoints")
        console.print(checkpoint_table(manager))
    return 0


def _best(args: argparse.Namespace, console: Console) -> int:
    with _open(args.dir) as manager:
        best = manager.best_step()
        if best is None:
            raise CheckpointError(
                f"{args.dir}: no checkpoint with a finite {manager.settings.monitor}"
            )
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
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(err))}")
        return 1


def console_main() -> None:
    """Console-script wrapper: exit with `main()`'s status."""
    raise SystemExit(main())
