"""The table of a checkpoint directory, shown by `artifex-ckpt ls` and by the demo."""

from __future__ import annotations

import datetime

from rich.markup import escape
from rich.table import Table

from artifex_ckpt.directory import tree_size
from artifex_ckpt.manager import MetricCheckpointManager

__all__ = ["checkpoint_table", "human_size"]


def human_size(total: float) -> str:
    """Bytes as `812 B`, `3.4 KiB`, `1.2 MiB` or `5.0 GiB`."""
    for unit in ("B", "KiB", "MiB"):
        if total < 1024:
            return f"{total:.0f} {unit}" if unit == "B" else f"{total:.1f} {unit}"
        total /= 1024
    return f"{total:.1f} GiB"


def _time(manager: MetricCheckpointManager, step: int) -> str:
    nanoseconds = manager.metadata(step).commit_timestamp_nsecs
    if nanoseconds is None:
        return "?"
    moment = datetime.datetime.fromtimestamp(nanoseconds / 1e9)
    return moment.strftime("%m-%d %H:%M:%S")


def checkpoint_table(manager: MetricCheckpointManager) -> Table:
    """A rich table of the retained checkpoints: step, name, score, best/last, size, time.

    Example:
        ```python
        from rich.console import Console

        Console().print(checkpoint_table(manager))
        ```
    """
    settings = manager.settings
    monitor = settings.monitor or "score"
    best, latest = manager.best_step(), manager.latest_step()
    ranking = f"{settings.monitor}, {settings.mode}" if settings.monitor else "newest kept"
    table = Table(title=escape(f"{manager.directory}  ({ranking})"))
    for column in ("step", "name", monitor, "best", "last", "size", "time"):
        table.add_column(escape(column), justify="right" if column in ("step", "size") else "left")
    for step in sorted(manager.all_steps()):
        score = manager.score(step)
        path = manager.step_path(step)
        table.add_row(
            str(step),
            escape(path.name),
            "-" if score is None else f"{score:.6g}",
            "*" if step == best else "",
            "*" if step == latest else "",
            human_size(tree_size(path)),
            _time(manager, step),
        )
    return table
