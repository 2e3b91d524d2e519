"""Work a writer does after each save commits, beside the training loop rather than in it.

Orbax renames evicted steps into the trash when a save finalizes, in its own background
thread. The `Housekeeper` starts after `save` returns, waits until Orbax reports the save
finished (`is_saving_in_progress`, a public question), then runs its tasks (purging the
trash, recording checksums, ...). `finish` joins it and runs the tasks once more, so after
`wait_until_finished` or `close` nothing is left to do. Problems (a task's exception, or the
notes a task returns) are collected and reported on the caller's thread as warnings: a
background thread must not raise into nothing.

Example:
    ```python
    done = []
    keeper = Housekeeper([lambda: done.append(1)])
    keeper.after_save(lambda: False)
    keeper.finish()
    assert done == [1, 1]
    ```
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence

from artifex_ckpt.errors import CheckpointWarning

__all__ = ["Housekeeper", "Task"]

# A task may return notes for the caller (each becomes a `CheckpointWarning`).
Task = Callable[[], Iterable[str] | None]

_FIRST_POLL_S, _LONGEST_POLL_S = 0.002, 0.05


class Housekeeper:
    """Runs `tasks` after each save finishes, in one background thread at a time."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        self._tasks = tuple(tasks)
        self._thread: threading.Thread | None = None
        self._problems: list[str] = []
        self._lock = threading.Lock()

    def after_save(self, saving: Callable[[], bool]) -> None:
        """Run the tasks once `saving()` turns False (the save committed or failed)."""
        self.join()
        self._thread = threading.Thread(
            target=self._when_done, args=(saving,), name="artifex-ckpt-housekeeping", daemon=True
        )
        self._thread.start()

    def join(self) -> None:
        """Wait for the background run, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def finish(self) -> None:
        """Wait for the background run, run the tasks now, and warn about any problem.
        Call only when no save is in flight."""
        self.join()
        self._run()
        with self._lock:
            problems, self._problems = self._problems, []
        for problem in problems:
            warnings.warn(CheckpointWarning(problem), stacklevel=3)

    def _when_done(self, saving: Callable[[], bool]) -> None:
        pause = _FIRST_POLL_S
        while saving():
            time.sleep(pause)
            pause = min(pause * 2, _LONGEST_POLL_S)
        self._run()

    def _run(self) -> None:
        for task in self._tasks:
            try:
                notes = list(task() or ())
            except Exception as err:  # reported on the caller's thread by finish()
                notes = [f"{type(err).__name__}: {err}"]
            with self._lock:
                self._problems.extend(notes)
