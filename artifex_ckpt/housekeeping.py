"""Work a writer does after each save commits, beside the training loop rather than in it.

Orbax renames evicted steps into the trash when a save finalizes, in its own background
thread. The `Housekeeper` is handed each save after `save` returns; its thread waits until
Orbax reports the save finished (`is_saving_in_progress`, a public question), then runs its
tasks (purging the trash, recording checksums, ...). `finish` waits for it and runs the
tasks once more, so after `wait_until_finished` or `close` nothing is left to do. Problems
(a task's exception, or the notes a task returns) are collected and reported on the
caller's thread as warnings: a background thread must not raise into nothing.

Example:
    ```python
    done = []
    keeper = Housekeeper([lambda: done.append(1)])
    keeper.after_save(lambda: False)
    keeper.finish()
    keeper.close()
    assert done == [1, 1]
    ```
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from artifex_ckpt.errors import CheckpointWarning

__all__ = ["Housekeeper", "Task"]

# A task may return notes for the caller (each becomes a `CheckpointWarning`).
Task = Callable[[], Iterable[str] | None]

_FIRST_POLL_S, _LONGEST_POLL_S = 0.002, 0.05


class Housekeeper:
    """Runs `tasks` after each save finishes, on one background thread kept for the writer's
    life: handing work to a running thread costs microseconds, where starting a thread per
    save blocked the loop for milliseconds while Orbax's writers held the GIL (B2). In a
    process forked from the writer it does nothing: the work is the parent's."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        self._tasks = tuple(tasks)
        self._worker: ThreadPoolExecutor | None = None
        self._runs: list[Future[None]] = []
        self._pid = os.getpid()
        self._problems: list[str] = []
        self._lock = threading.Lock()

    def after_save(self, saving: Callable[[], bool]) -> None:
        """Run the tasks once `saving()` turns False (the save committed or failed)."""
        if self._forked():
            return
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="artifex-ckpt-housekeeping")
        self._runs = [run for run in self._runs if not run.done()]
        self._runs.append(self._worker.submit(self._when_done, saving))

    def join(self) -> None:
        """Wait for the background runs, if any."""
        if self._forked():
            return
        runs, self._runs = self._runs, []
        for run in runs:
            run.result()

    def finish(self) -> None:
        """Wait for the background runs, run the tasks now, and warn about any problem.
        Call only when no save is in flight."""
        if self._forked():
            return
        self.join()
        self._run()
        with self._lock:
            problems, self._problems = self._problems, []
        for problem in problems:
            warnings.warn(CheckpointWarning(problem), stacklevel=3)

    def close(self) -> None:
        """Wait for the background runs and stop the thread (the next save starts another)."""
        self.join()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.shutdown(wait=True)

    def _forked(self) -> bool:
        # In a forked child the parent's thread does not exist (waiting for its runs would
        # block forever) and the work is the parent's: the child does none of it.
        if os.getpid() == self._pid:
            return False
        self._worker, self._runs = None, []
        return True

    def _when_done(self, saving: Callable[[], bool]) -> None:
        pause = _FIRST_POLL_S
        try:
            while saving():
                time.sleep(pause)
                pause = min(pause * 2, _LONGEST_POLL_S)
        except Exception as err:  # reported on the caller's thread by finish()
            with self._lock:
                self._problems.append(f"{type(err).__name__}: {err}")
            return
        self._run()

    def _run(self) -> None:
        for task in self._tasks:
            try:
                notes = list(task() or ())
            except Exception as err:  # reported on the caller's thread by finish()
                notes = [f"{type(err).__name__}: {err}"]
            with self._lock:
                self._problems.extend(notes)
