"""The table of a checkpoint directory, shown by `artifex-ckpt ls` and by the demo.

The table reads the manager's in-memory view plus, per checkpoint, one small file (the
commit time in `_CHECKPOINT_METADATA`) and a size. It never reads item metadata or arrays,
so a checkpoint whose metrics or arrays are damaged is still listed. A step directory that
is a symbolic link (`model-07-0.1000 -> .`) is not a checkpoint and is left out; one that
vanished after the manager listed it is shown as `gone`.
"""

from __future__ import annotations

import datetime
import math

from etils import epath
from orbax.checkpoint.path import step as step_lib
from rich.markup import escape
from rich.table import Table

from artifex_ckpt.directory import tree_size
from artifex_ckpt.manager import MetricCheckpointManager

__all__ = ["best_listed_step", "checkpoint_table", "human_size", "listed_steps"]

GONE = "gone"


def human_size(total: float) -> str:
    """Bytes as `812 B`, `3.4 KiB`, `1.2 MiB` or `5.0 GiB`."""
    for unit in ("B", "KiB", "MiB"):
        if total < 1024:
            return f"{total:.0f} {unit}" if unit == "B" else f"{total:.1f} {unit}"
        total /= 1024
    return f"{total:.1f} GiB"


def listed_steps(manager: MetricCheckpointManager) -> list[int]:
    """The manager's retained steps, ascending: what `ls` lists and `best` chooses from.

    A link named like a checkpoint that leads back into the run (`ckpt-7 -> .`) is not
    among them (the manager's listing leaves it out, with a warning); a checkpoint moved to
    another disk and linked back is, as the manager restores it.

    Example:
        ```python
        for step in listed_steps(manager):
            print(step, manager.step_path(step).name)
        ```
    """
    return sorted(manager.all_steps())


def best_listed_step(manager: MetricCheckpointManager) -> int | None:
    """The best of `listed_steps`: the first of `manager.ranked_steps()` with a finite
    score; without a monitor, the newest. None if no listed step qualifies.

    Example:
        ```python
        best = best_listed_step(manager)
        print(manager.step_path(best) if best is not None else "no finite score")
        ```
    """
    listed = listed_steps(manager)
    if manager.settings.monitor is None:
        return listed[-1] if listed else None
    for step in manager.ranked_steps():
        score = manager.score(step)
        if step in listed and score is not None and math.isfinite(score):
            return step
    return None


def checkpoint_table(manager: MetricCheckpointManager) -> Table:
    """A rich table of the retained checkpoints: step, name, score, best/last, size, time.

    A checkpoint whose directory vanished since the manager listed it shows `gone` as its
    time, and no size.

    Example:
        ```python
        from rich.console import Console

        Console().print(checkpoint_table(manager))
        ```
    """
    settings = manager.settings
    monitor = settings.monitor or "score"
    steps = listed_steps(manager)
    best, latest = best_listed_step(manager), (steps[-1] if steps else None)
    ranking = f"{settings.monitor}, {settings.mode}" if settings.monitor else "newest kept"
    title = f"{manager.directory}  ({ranking})"
    # As wide as its title (where the terminal allows), so a long path is not broken.
    table = Table(title=escape(title), min_width=len(title))
    for column in ("step", "name", monitor, "best", "last", "size", "time"):
        table.add_column(escape(column), justify="right" if column in ("step", "size") else "left")
    for step in steps:
        score = manager.score(step)
        path = manager.step_path(step)
        size, when = ("-", GONE) if not path.exists() else _size_and_time(path, step)
        table.add_row(
            str(step),
            escape(path.name),
            "-" if score is None else f"{score:.6g}",
            "*" if step == best else "",
            "*" if step == latest else "",
            size,
            when,
        )
    return table


def _size_and_time(path: epath.Path, step: int) -> tuple[str, str]:
    size = human_size(tree_size(path))
    try:
        nanoseconds = step_lib.Metadata(step=step, path=path).commit_timestamp_nsecs
    except (OSError, ValueError, TypeError, KeyError):
        nanoseconds = None
    if nanoseconds is None:
        # No readable commit record: the directory vanished meanwhile, or is damaged.
        return size, GONE if not path.exists() else "?"
    moment = datetime.datetime.fromtimestamp(nanoseconds / 1e9)
    return size, moment.strftime("%m-%d %H:%M:%S")
