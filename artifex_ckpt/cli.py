"""The `artifex-ckpt` command: `demo`, `ls`, `best`, `verify`, `quarantine`, `log`, `plot`.

Every command but `demo` takes a run directory, local or an object-store URL
(`gs://bucket/run`), and opens it read-only; only `quarantine` changes it, by moving one
checkpoint aside. A failure of any kind is one line `error: ...` on standard error and exit
status 1, never a traceback. Warnings of the library are lines `warning: ...`; the logs of
Orbax and absl are silenced.

Reading a FIFO blocks until something writes to it, so before a manager is opened on a local
directory the few small files it reads (`_CHECKPOINT_METADATA` and `metrics/metrics` of each
step, the settings and the history) are checked to be regular files.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import stat
import tempfile
import warnings
from collections.abc import Iterator, Sequence

import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.path import step as step_lib
from rich.console import Console
from rich.text import Text

from artifex_ckpt.directory import absolute, is_local
from artifex_ckpt.errors import CheckpointError, CheckpointNotFoundError, CheckpointWarning
from artifex_ckpt.history import (
    HISTORY_FILE,
    Decision,
    DecisionHistory,
    HistoryWarning,
    explain,
    format_table,
)
from artifex_ckpt.manager import MetricCheckpointManager
from artifex_ckpt.manifest import verify
from artifex_ckpt.plan import plan_manager
from artifex_ckpt.plot import plot_history
from artifex_ckpt.quarantine import quarantine
from artifex_ckpt.settings import SETTINGS_FILE, RetentionSettings
from artifex_ckpt.table import best_listed_step, checkpoint_table, listed_steps

__all__ = ["console_main", "main"]

# The small files a manager reads from each step directory when it opens a run.
_STEP_FILES = ("_CHECKPOINT_METADATA", "metrics/metrics")
_STEP_MARKER = "_CHECKPOINT_METADATA"
_UNVERIFIED = "unverified (no manifest: written before manifests existed)"
_DEFAULT_REASON = "moved aside with artifex-ckpt quarantine"
_SHOWN_NAMES = 3
_INTERRUPTED = 130


def _run_dir(text: str) -> epath.Path:
    path = absolute(text)
    if not path.exists():
        raise CheckpointNotFoundError(f"{text}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{text}: not a directory; pass a run directory")
    return path


def _special_kind(path: str) -> str | None:
    """What `path` is if reading it could block (following links), else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # absent or unreachable: the reader reports that itself
    kinds = {
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    return next((text for test, text in kinds.items() if test(mode)), None)


def _refuse_blocking_run_files(root: epath.Path, names: Sequence[str]) -> None:
    if not is_local(root):
        return
    for name in names:
        path = os.path.join(os.fspath(root), name)
        kind = _special_kind(path)
        if kind is not None:
            raise CheckpointError(
                f"{path} is {kind}, not a regular file; reading it would block. Move it away"
            )


def _refuse_blocking_step_files(root: epath.Path) -> None:
    """Refuse a local run in which opening a manager would block on a step's file."""
    if not is_local(root):
        return
    with os.scandir(os.fspath(root)) as entries:
        steps = [e for e in entries if not e.name.startswith(".") and e.is_dir()]
    for entry in sorted(steps, key=lambda e: e.name):
        for name in _STEP_FILES:
            path = os.path.join(entry.path, *name.split("/"))
            kind = _special_kind(path)
            if kind is not None:
                raise CheckpointError(
                    f"{path} is {kind}, not a regular file; a manager reading it would block, "
                    f"so {os.fspath(root)} cannot be opened. Move the checkpoint aside: "
                    f"artifex-ckpt quarantine {shlex.quote(os.fspath(root))} "
                    f"{shlex.quote(entry.name)}"
                )


def _is_link(path: epath.Path) -> bool:
    return is_local(path) and os.path.islink(os.fspath(path))


def _open(root: epath.Path) -> MetricCheckpointManager:
    _refuse_blocking_run_files(root, (SETTINGS_FILE,))
    _refuse_blocking_step_files(root)
    return MetricCheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True))


def _no_checkpoints(root: epath.Path) -> CheckpointError:
    """The error for a run in which no checkpoint is found, saying why if it can tell."""
    marked = sorted(
        path.name
        for path in root.iterdir()
        if not path.name.startswith(".")
        and step_lib.TMP_DIR_SUFFIX not in path.name
        and not _is_link(path)
        and (path / _STEP_MARKER).exists()
    )
    if not marked:
        return CheckpointError(f"{root}: no checkpoints")
    shown = ", ".join(marked[:_SHOWN_NAMES]) + (", ..." if len(marked) > _SHOWN_NAMES else "")
    count = f"{len(marked)} checkpoint director{'y' if len(marked) == 1 else 'ies'} ({shown})"
    if not (root / SETTINGS_FILE).exists():
        return CheckpointError(
            f"{root} has {count} but no {SETTINGS_FILE}; without its filename template their "
            f"names cannot be read as steps. Restore {SETTINGS_FILE}, or open the run with its "
            "template: MetricCheckpointManager(DIR, filename=...)"
        )
    template = RetentionSettings.load(root)
    naming = (
        f"the template {template.filename!r}"
        if template is not None and template.filename
        else "numeric step names"
    )
    return CheckpointError(
        f"{root} has {count}, but none is named by {naming} stored in {SETTINGS_FILE}"
    )


def _stored_ranking(root: epath.Path) -> tuple[str, str]:
    """Monitor and mode from the stored settings; ("score", "min") if there are none."""
    try:
        settings = RetentionSettings.load(root)
    except CheckpointError as err:
        warnings.warn(CheckpointWarning(f"{err}; scores are shown as 'score'"), stacklevel=2)
        return "score", "min"
    if settings is None:
        return "score", "min"
    return settings.monitor or "score", settings.mode


def _decisions(root: epath.Path) -> list[Decision]:
    _refuse_blocking_run_files(root, (HISTORY_FILE,))
    history = DecisionHistory(root)
    if history.path.is_dir():
        raise CheckpointError(
            f"{history.path} is a directory, not the decision history file; move it away"
        )
    if not history.path.exists():
        raise CheckpointError(
            f"{root} has no decision history ({HISTORY_FILE}); a MetricCheckpointManager "
            "writes one as it saves"
        )
    return history.read()


def _demo(args: argparse.Namespace, console: Console) -> int:
    from artifex_ckpt.demo import run_demo

    directory = args.dir or tempfile.mkdtemp(prefix="artifex-ckpt-demo-")
    console.print(Text(f"training a VAE on synthetic data; checkpoints go to {directory}"))
    result = run_demo(directory, epochs=args.epochs, console=console, progress=not args.no_progress)
    return 0 if result.matches else 1


def _ls(args: argparse.Namespace, console: Console) -> int:
    root = _run_dir(args.dir)
    with _open(root) as manager:
        if not listed_steps(manager):
            raise _no_checkpoints(root)
        console.print(checkpoint_table(manager))
    return 0


def _best(args: argparse.Namespace, console: Console) -> int:
    root = _run_dir(args.dir)
    with _open(root) as manager:
        if not listed_steps(manager):
            raise _no_checkpoints(root)
        best = best_listed_step(manager)
        if best is None:
            raise CheckpointError(f"{root}: no checkpoint with a finite {manager.settings.monitor}")
        print(manager.step_path(best))
    return 0


def _verify(args: argparse.Namespace, console: Console) -> int:
    root = _run_dir(args.dir)
    plan = plan_manager(
        root, RetentionSettings.load(root), {}, ocp.CheckpointManagerOptions(read_only=True)
    )
    # The listing leaves out links back into the run; a checkpoint linked from another disk
    # is verified through its link, as the manager restores it.
    found = {metadata.path.name: metadata.step for metadata in plan.step_names.find_all(root)}
    names = sorted(found, key=lambda name: found[name])
    if args.checkpoint is not None:
        names = [_named(root, args.checkpoint, found)]
    elif not names:
        raise _no_checkpoints(root)
    damaged = False
    for name in names:
        try:
            check = verify(root / name, deep=not args.shallow)
        except CheckpointNotFoundError:
            print(f"{name}: gone (removed while verifying)")
            continue
        if check.status == "ok":
            print(f"{name}: ok")
        elif check.status == "unverified":
            print(f"{name}: {_UNVERIFIED}")
        else:
            damaged = True
            print(f"{name}: MISMATCH: {'; '.join(check.problems)}")
    return 1 if damaged else 0


def _named(root: epath.Path, wanted: str, found: dict[str, int]) -> str:
    """The checkpoint `wanted` names: a directory name, or a step number."""
    if wanted in found:
        return wanted
    by_step = {step: name for name, step in found.items()}
    if wanted.isdigit() and int(wanted) in by_step:
        return by_step[int(wanted)]
    if "/" not in wanted and wanted not in (".", "..") and (root / wanted).is_dir():
        return wanted  # not listed by a manager (a foreign name), but a directory of the run
    listed = ", ".join(f"{step} ({name})" for step, name in sorted(by_step.items())) or "none"
    raise CheckpointNotFoundError(
        f"no checkpoint {wanted!r} in {root}; pass a step or a directory name: {listed}"
    )


def _quarantine(args: argparse.Namespace, console: Console) -> int:
    root = _run_dir(args.dir)
    target = quarantine(root, args.name, reason=args.reason)
    origin = root / args.name
    print(f"moved {args.name} to {target}")
    print("managers no longer list it; a resume continues from the remaining checkpoints")
    undo = "mv" if is_local(root) else "gcloud storage mv"
    print(f"to undo, move it back: {undo} {shlex.quote(str(target))} {shlex.quote(str(origin))}")
    return 0


def _log(args: argparse.Namespace, console: Console) -> int:
    root = _run_dir(args.dir)
    decisions = _decisions(root)
    monitor, _ = _stored_ranking(root)
    if args.why is not None:
        print(explain(args.why, decisions, monitor=monitor))
        return 0
    if not decisions:
        raise CheckpointError(f"{root / HISTORY_FILE} holds no readable decision")
    console.print(format_table(decisions, monitor=monitor, title=f"{root}  (oldest first)"))
    return 0


def _plot(args: argparse.Namespace, console: Console) -> int:
    root = _run_dir(args.dir)
    decisions = _decisions(root)
    monitor, mode = _stored_ranking(root)
    data = plot_history(decisions, monitor, mode, args.output)
    best = (
        f"; best {data.best.values[0]:.6g} at step {data.best.steps[0]}" if data.best.steps else ""
    )
    print(f"wrote {args.output}: {len(data.points.steps)} values of {monitor} ({mode}){best}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="artifex-ckpt",
        description="Keep the k best and the newest checkpoints of a JAX/Flax run (on Orbax). "
        "DIR may be local or an object-store URL such as gs://bucket/run.",
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
    check = commands.add_parser(
        "verify",
        help="check checkpoints against their manifests (exit 1 on a mismatch)",
        description="Compare each checkpoint (or the one named) with its manifest of sizes "
        "and CRC-32C checksums; exit status 1 if any differs.",
    )
    check.add_argument("dir", metavar="DIR")
    check.add_argument("checkpoint", nargs="?", metavar="STEP_OR_NAME")
    check.add_argument("--shallow", action="store_true", help="check sizes only (no reads)")
    check.set_defaults(run=_verify)
    move = commands.add_parser(
        "quarantine",
        help="move a damaged checkpoint aside (never deletes)",
        description="Move checkpoint NAME into DIR/.artifex-quarantine/, where no manager "
        "looks, and record it in the run's history. Moving it back undoes it.",
    )
    move.add_argument("dir", metavar="DIR")
    move.add_argument("name", metavar="NAME")
    move.add_argument("--reason", default=_DEFAULT_REASON, help="recorded in the history")
    move.set_defaults(run=_quarantine)
    log = commands.add_parser("log", help="the run's decision history, oldest first")
    log.add_argument("dir", metavar="DIR")
    log.add_argument("--why", metavar="NAME", help="explain what happened to checkpoint NAME")
    log.set_defaults(run=_log)
    plot = commands.add_parser("plot", help="draw the monitored metric over steps (PNG)")
    plot.add_argument("dir", metavar="DIR")
    plot.add_argument("-o", "--output", required=True, help="PNG file to write")
    plot.set_defaults(run=_plot)
    return parser


def _message(err: BaseException) -> str:
    """`err` as one line: our own messages as they are, others with their type."""
    if isinstance(err, CheckpointError):
        text = str(err)
    elif isinstance(err, OSError | ValueError | KeyError):
        text = f"{type(err).__name__}: {err}"
    else:
        text = f"unexpected {type(err).__name__}: {err}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    # Orbax logs through absl (read-only notes, missing metadata files); the command
    # reports what matters itself.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status: 0, or 1 with one `error: ...` line on stderr.

    Example:
        ```python
        status = main(["verify", "/tmp/run", "--shallow"])
        ```
    """
    args = _parser().parse_args(argv)
    console = Console()
    stderr = Console(stderr=True, soft_wrap=True, highlight=False)
    failure: str | None = None
    status = 1
    with _quiet_libraries(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            status = int(args.run(args, console))
        except KeyboardInterrupt:
            failure, status = "interrupted", _INTERRUPTED
        except Exception as err:  # the command's contract: one line, never a traceback
            failure = _message(err)
    shown: set[str] = set()
    for warning in caught:
        text = " ".join(str(warning.message).split())
        if issubclass(warning.category, CheckpointWarning | HistoryWarning) and text not in shown:
            shown.add(text)
            stderr.print(Text.assemble(("warning:", "yellow"), " ", text))
    if failure is not None:
        stderr.print(Text.assemble(("error:", "red"), " ", failure))
    return status


def console_main() -> None:
    """Console-script wrapper: exit with `main()`'s status."""
    raise SystemExit(main())
