"""`ProgressBarCallback`: epoch and batch progress bars with the latest metrics, on rich."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column

from artifex_ckpt.callbacks.base import BaseCallback, Logs, TrainerLike
from artifex_ckpt.metrics import to_float

__all__ = ["ProgressBarCallback", "ProgressBarConfig"]

# Reading a batch metric syncs the device, so batch metrics refresh at most this often.
_BATCH_REFRESH_SECONDS = 0.25


@dataclass(frozen=True, slots=True)
class ProgressBarConfig:
    """How `ProgressBarCallback` looks.

    Attributes:
        show_eta: Show the estimated time remaining.
        show_metrics: Show the latest batch and epoch metrics.
        leave: Keep the bars on screen after training.
        disable: Write nothing at all.
    """

    show_eta: bool = True
    show_metrics: bool = True
    leave: bool = True
    disable: bool = False


class ProgressBarCallback(BaseCallback):
    """An epoch bar and a batch bar (total = the trainer's `num_batches`).

    Before training it can be copied and pickled like its config. A copy (`copy.copy`,
    `copy.deepcopy`) writes to the same console, which is an output like a file; an
    unpickled one, in another process, writes to rich's default console (the terminal).
    Bars being drawn are never copied: a copy starts its own when its training begins.

    Example:
        ```python
        trainer.fit(callbacks=[ProgressBarCallback(ProgressBarConfig(show_eta=False))])
        ```
    """

    __slots__ = ("_batch_task", "_epoch_task", "_last_refresh", "_progress", "config", "console")

    def __init__(
        self, config: ProgressBarConfig | None = None, console: Console | None = None
    ) -> None:
        self.config = config or ProgressBarConfig()
        self.console = console
        self._progress: Progress | None = None
        self._epoch_task: TaskID | None = None
        self._batch_task: TaskID | None = None
        self._last_refresh = 0.0

    def __copy__(self) -> ProgressBarCallback:
        return ProgressBarCallback(self.config, console=self.console)

    def __deepcopy__(self, memo: dict[int, Any]) -> ProgressBarCallback:
        return ProgressBarCallback(copy.deepcopy(self.config, memo), console=self.console)

    def __getstate__(self) -> dict[str, Any]:
        # A console holds locks and its output stream; neither crosses a process boundary.
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        ProgressBarCallback.__init__(self, state["config"])

    def on_train_begin(self, trainer: TrainerLike) -> None:
        if self.config.disable:
            return
        columns: list[ProgressColumn | str] = [
            TextColumn("{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        ]
        if self.config.show_eta:
            columns.append(TimeRemainingColumn())
        if self.config.show_metrics:
            # The metrics take what room is left; the bars keep their width.
            room = Column(ratio=1, no_wrap=True, overflow="ellipsis")
            columns.append(TextColumn("{task.fields[metrics]}", table_column=room))
        self._progress = Progress(
            *columns, console=self.console, transient=not self.config.leave, expand=True
        )
        first = trainer.initial_epoch
        epochs = trainer.epochs
        self._epoch_task = self._progress.add_task(
            "epochs", total=None if epochs is None else epochs - first, metrics=""
        )
        self._batch_task = self._progress.add_task("batches", total=trainer.num_batches, metrics="")
        self._progress.start()

    def on_epoch_begin(self, trainer: TrainerLike, epoch: int) -> None:
        if self._progress is not None and self._batch_task is not None:
            self._progress.reset(self._batch_task, description=f"epoch {epoch}", metrics="")

    def on_batch_end(self, trainer: TrainerLike, batch: int, logs: Logs) -> None:
        if self._progress is None or self._batch_task is None:
            return
        now = time.monotonic()
        fields: dict[str, Any] = {}
        if self.config.show_metrics and now - self._last_refresh >= _BATCH_REFRESH_SECONDS:
            fields["metrics"] = _format(logs)
            self._last_refresh = now
        self._progress.update(self._batch_task, advance=1, **fields)

    def on_epoch_end(self, trainer: TrainerLike, epoch: int, logs: Logs) -> None:
        if self._progress is None or self._epoch_task is None:
            return
        metrics = _format(logs) if self.config.show_metrics else ""
        self._progress.update(self._epoch_task, advance=1, metrics=metrics)

    def on_train_end(self, trainer: TrainerLike) -> None:
        self._stop()

    def on_exception(self, trainer: TrainerLike, error: BaseException) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _format(logs: Logs) -> str:
    parts = []
    # Validation metrics first: on a narrow terminal they are what survives the ellipsis.
    for name, value in sorted(logs.items(), key=lambda item: not item[0].startswith("val_")):
        try:
            parts.append(f"{name}={to_float(name, value):.4g}")
        except ValueError:
            continue
    return " ".join(parts)
