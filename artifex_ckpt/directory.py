"""Housekeeping of a checkpoint directory: where it is, and what a crash leaves in it.

Two kinds of leftovers are cleaned: saves that never committed (named with Orbax's
temporary suffix) and evicted checkpoints. Orbax deletes an evicted step file by file,
so a crash midway would leave a directory with a valid name and missing files; evicted
steps are therefore renamed into `TRASH` (atomic, Orbax's `todelete_subdir`) and removed
from there by a `TrashPurger`.
"""

from __future__ import annotations

import contextlib
import os
import threading

from etils import epath
from orbax.checkpoint.path import step as step_lib

from artifex_ckpt.errors import ConfigError

__all__ = ["TRASH", "TrashPurger", "absolute", "is_local", "remove_unfinished", "require_writable"]

TRASH = ".artifex-deleted"


def absolute(directory: str | os.PathLike[str] | epath.Path) -> epath.Path:
    """`directory` made absolute; Orbax refuses relative paths, but only in the first
    background save."""
    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def is_local(directory: epath.Path) -> bool:
    return "://" not in os.fspath(directory)


def require_writable(directory: epath.Path) -> None:
    """Fail now, not after an epoch, if `directory` can never be created or written."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return
    reason = "is not a directory" if not existing.is_dir() else "is not writable"
    raise ConfigError(
        f"directory {os.fspath(directory)!r} is not writable: {os.fspath(existing)!r} {reason}"
    )


def remove_unfinished(directory: epath.Path) -> None:
    """Remove saves that never committed. Locally those carry the temporary suffix;
    Orbax's own scan checks each entry through an event loop (~0.2 s per 1,000)."""
    if not directory.exists():
        return
    for path in directory.iterdir():
        if step_lib.TMP_DIR_SUFFIX in path.name:
            path.rmtree(missing_ok=True) if path.is_dir() else path.unlink(missing_ok=True)


class TrashPurger:
    """Empties `directory / TRASH`, beside the training loop or right away."""

    def __init__(self, directory: epath.Path) -> None:
        self.trash = directory / TRASH
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Purge in a background thread (a save may be renaming into the trash)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._purge, name="artifex-ckpt-purge", daemon=True
            )
            self._thread.start()

    def finish(self) -> None:
        """Wait for a background purge, then purge and remove the trash itself.
        Call only when no save is in flight."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._purge(remove_trash=True)

    def _purge(self, remove_trash: bool = False) -> None:
        with contextlib.suppress(FileNotFoundError):
            for entry in self.trash.iterdir():
                entry.rmtree(missing_ok=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        if remove_trash:
            with contextlib.suppress(OSError):  # gone already, or refilled meanwhile
                self.trash.rmdir()
