"""Which entries of a run directory are checkpoints, read so that one damaged entry cannot
make the whole run unopenable.

Orbax opens a directory by listing its step directories (a `NameFormat`) and then reading
each one's commit record (`_CHECKPOINT_METADATA`) and metrics. Any error while reading one
of them aborts the constructor, and a FIFO in place of one of those small files blocks it
forever. `CheckedNameFormat` wraps the name format Orbax is given:

- a step directory whose commit record is not a regular file, does not parse, or holds
  values of the wrong type (`[1, 2]`, `"commit_timestamp_nsecs": "x"`,
  `"custom_metadata": []`) is still listed, timed by its directory's mtime, and reported as
  damaged: restores skip it (`MetricCheckpointManager.check_intact` raises for it), retention
  treats it like any other, and nothing on disk is changed;
- locally, a symbolic link is a checkpoint only if it leads out of the run directory (a
  checkpoint moved to another disk and linked back). A link to the run directory itself, to
  one of its parents, or to another entry inside it (say `ck-7-0.100 -> .`) is ignored:
  listed, it would pass for the newest checkpoint (or for a second copy of one).

Problems are collected while Orbax reads (partly in its worker threads) and handed to the
caller's thread by `take_warnings`, each once.

Example:
    ```python
    from orbax.checkpoint.path import step as step_lib

    names = CheckedNameFormat(step_lib.standard_name_format())
    steps = [metadata.step for metadata in names.find_all("/tmp/run")]
    for warning in names.take_warnings():
        print(warning)
    ```
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import stat
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

from etils import epath
from orbax.checkpoint._src.metadata import step_metadata_serialization
from orbax.checkpoint.path import step as step_lib

from artifex_ckpt.directory import file_kind, is_local, read_object
from artifex_ckpt.errors import (
    CheckpointWarning,
    CorruptCheckpointError,
    CorruptCheckpointWarning,
)
from artifex_ckpt.manifest import ManifestCheck, verify

__all__ = ["COMMIT_RECORD", "CheckedNameFormat", "commit_problem", "irregular", "require_intact"]

# The file Orbax writes into every step directory when the save commits.
COMMIT_RECORD = "_CHECKPOINT_METADATA"
# What reading Orbax's small JSON files raises when their content is of the wrong shape.
_READ_ERRORS = (ValueError, TypeError, KeyError, AttributeError, OSError)


def irregular(path: str | os.PathLike[str]) -> str | None:
    """Why the local file `path` must not be read (it is a FIFO, a directory, ...), or None
    if it is a regular file, is absent, or is not local. Follows symbolic links; never opens
    anything, so a FIFO cannot block the caller.

    Example:
        ```python
        assert irregular(epath.Path("/tmp")) == "is a directory, not a regular file"
        ```
    """
    if not is_local(path):
        return None
    try:
        mode = os.stat(os.fspath(path)).st_mode
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"cannot be examined ({err.strerror or err})"
    if stat.S_ISREG(mode):
        return None
    return f"is {file_kind(mode)}, not a regular file"


def commit_problem(step_dir: epath.Path, step: int) -> str | None:
    """What is wrong with the commit record of `step_dir`: None if it commits the checkpoint,
    else a description (missing, not a regular file, not readable, ...).

    On an object store the record is read with one request (Orbax's reader, through
    `epath`, costs about nine: exists, is_file and open each ask the store again).

    Example:
        ```python
        problem = commit_problem(epath.Path("/tmp/run/ck-3"), 3)
        ```
    """
    record = step_dir / COMMIT_RECORD
    problem = irregular(record)
    if problem is not None:
        return f"{COMMIT_RECORD} {problem}"
    try:
        if is_local(step_dir):
            committed = step_lib.Metadata(step=step, path=step_dir).commit_timestamp_nsecs
        else:
            committed = _remote_commit_timestamp(record)
    except _READ_ERRORS as err:
        return f"{COMMIT_RECORD} cannot be read ({type(err).__name__}: {err})"
    return None if committed is not None else "it has no commit record"


def _remote_commit_timestamp(record: epath.Path) -> int | None:
    """The commit time in an object store's commit record, read and checked as Orbax's
    `Metadata.commit_timestamp_nsecs` does: None when the record is absent or not JSON."""
    data = read_object(record)
    if data is None:
        return None
    try:
        stored = json.loads(data)
    except ValueError:  # Orbax's reader logs and answers None for what does not parse
        return None
    # Private Orbax: its only commit-record parser that reads no file itself (docs/design.md).
    committed = step_metadata_serialization.deserialize(stored).commit_timestamp_nsecs
    return None if committed is None else int(committed)


def require_intact(
    step_dir: epath.Path, step: int, metrics_problem: str | None, *, deep: bool
) -> ManifestCheck:
    """Raise `CorruptCheckpointError` if `step_dir` has no readable commit record, if
    `metrics_problem` says its metrics cannot be read, or if its files do not match their
    manifest (sizes; checksums with `deep`). Returns the manifest check ("unverified" for a
    checkpoint written before manifests existed)."""
    problem = commit_problem(step_dir, step)
    if problem is not None:
        raise CorruptCheckpointError(f"checkpoint {step_dir} is not committed: {problem}")
    if metrics_problem is not None:
        raise CorruptCheckpointError(
            f"checkpoint {step_dir} has unreadable metrics: {metrics_problem}"
        )
    check = verify(step_dir, deep=deep)
    if check.status == "mismatch":
        raise CorruptCheckpointError(
            f"checkpoint {step_dir} does not match its manifest: {'; '.join(check.problems)}"
        )
    return check


@dataclasses.dataclass(frozen=True)
class _Checked(step_lib.Metadata):
    """A step's metadata whose commit record, if damaged, reads as absent (and is reported)."""

    problems: _Problems | None = dataclasses.field(default=None, compare=False, repr=False)
    # The commit record's local path as text, when known: opening a directory of thousands
    # of checkpoints then builds no path object per step for this check (B5).
    record: str | None = dataclasses.field(default=None, compare=False, repr=False)

    @functools.cached_property
    def _checkpoint_metadata(self) -> Any:
        record = self.record or self.path / COMMIT_RECORD
        problem = irregular(record)
        if problem is None:
            try:
                return step_lib.Metadata._checkpoint_metadata.func(self)
            except _READ_ERRORS as err:
                problem = f"cannot be read ({type(err).__name__}: {err})"
        if self.problems is not None:
            self.problems.add(
                self.path,
                CorruptCheckpointWarning(
                    f"the commit record {record} of checkpoint {self.path} {problem}; the "
                    "checkpoint is listed (timed by its directory), but restores skip it. "
                    "Move it aside (`artifex-ckpt quarantine`) once it is no longer needed"
                ),
            )
        return None


class _Listing(NamedTuple):
    """The last listing: of which directory (as given, and as text), whether local, and each
    step's name."""

    given: object
    base: str
    local: bool
    names: dict[int, str]


class _Problems:
    """Warnings found while listing, each reported once per path; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Warning] = []
        self._seen: set[str] = set()

    def add(self, path: epath.Path, warning: Warning) -> None:
        with self._lock:
            key = f"{type(warning).__name__}:{os.fspath(path)}"
            if key not in self._seen:
                self._seen.add(key)
                self._pending.append(warning)

    def take(self) -> list[Warning]:
        with self._lock:
            pending, self._pending = self._pending, []
        return pending


class CheckedNameFormat(step_lib.NameFormat[step_lib.Metadata]):
    """Orbax `NameFormat` wrapping `inner`: it lists what `inner` lists, less symbolic links
    that lead back into the run directory, and with damaged commit records tolerated.

    `find_step` answers from the last listing when it can (no I/O beyond a stat), so
    wrapping Orbax's standard format costs no extra lookups per step.
    """

    def __init__(self, inner: step_lib.NameFormat[step_lib.Metadata]) -> None:
        self.inner = inner
        self._problems = _Problems()
        self._listing = _Listing(None, "", True, {})

    def __str__(self) -> str:
        return f"CheckedNameFormat({self.inner})"

    @property
    def single_host_load_and_broadcast(self) -> bool:
        """The wrapped format's setting, which Orbax's options check against their own."""
        return bool(getattr(self.inner, "single_host_load_and_broadcast", False))

    def build_name(self, step: int) -> str:
        return self.inner.build_name(step)

    def find_all(self, base_path: epath.PathLike) -> Iterator[step_lib.Metadata]:
        base = epath.Path(base_path)
        text = os.fspath(base)
        local = is_local(text)
        root = os.path.realpath(text) if local else None
        links = _symbolic_links(text) if local else frozenset()
        names: dict[int, str] = {}
        # In place before the first step is handed out: Orbax looks steps up meanwhile.
        self._listing = _Listing(base_path, text, local, names)
        for metadata in self.inner.find_all(base):
            name = metadata.path.name
            if root is not None and name in links and not self._leads_out(metadata.path, root):
                continue
            names[metadata.step] = name
            record = os.path.join(text, name, COMMIT_RECORD) if local else None
            yield _Checked(metadata.step, metadata.path, problems=self._problems, record=record)

    def find_step(self, base_path: epath.PathLike, step: int) -> step_lib.Metadata:
        # Orbax asks once per step while opening, from many threads: answered from the
        # listing, with one stat locally (none on an object store, where it is as fresh).
        listing = self._listing
        name = listing.names.get(step)
        same = base_path is listing.given or os.fspath(base_path) == listing.base
        if name is None or not same:
            return self.inner.find_step(base_path, step)
        if listing.local and not os.path.isdir(os.path.join(listing.base, name)):
            return self.inner.find_step(base_path, step)
        base = base_path if isinstance(base_path, epath.Path) else epath.Path(base_path)
        return step_lib.Metadata(step=step, path=base / name)

    def take_warnings(self) -> list[Warning]:
        """Problems found since the last call, each path reported once: damaged commit
        records (`CorruptCheckpointWarning`) and ignored links (`CheckpointWarning`)."""
        return self._problems.take()

    def _leads_out(self, path: epath.Path, root: str) -> bool:
        name = os.fspath(path)
        target = os.path.realpath(name)
        if target == root or root.startswith(target.rstrip(os.sep) + os.sep):
            where = "the run directory or one of its parents"
        elif target.startswith(root + os.sep):
            where = "another entry of the run directory"
        else:
            return True
        self._problems.add(
            path,
            CheckpointWarning(
                f"{name} is a symbolic link to {target}, {where}; it is not a checkpoint of "
                "this run and is ignored (a link is listed only when it leads out of the run "
                "directory, e.g. to a checkpoint moved to another disk)"
            ),
        )
        return False


def _symbolic_links(directory: str) -> frozenset[str]:
    """Names of the symbolic links in `directory`: one scandir, whose entry types come with
    the names, instead of an lstat per checkpoint (B5)."""
    try:
        with os.scandir(directory) as entries:
            return frozenset(entry.name for entry in entries if entry.is_symlink())
    except OSError:
        return frozenset()
