"""One writer, many readers: a lease file that says which run writes a checkpoint directory.

Two writers on one directory (the same job started twice, or two managers or callbacks on
the same dirpath in one process) interleave their saves and evictions and destroy each
other's checkpoints. A writer therefore `acquire`s the directory before writing anything,
refreshes its lease while it writes, and releases it when it closes. Readers never create,
write or delete the lease; `read_owner` tells them (and the CLI) who writes, and `live_owner`
whether that owner may still be writing. `require_free` raises what `acquire` would, without
writing anything, so that a writer learns of another one before it looks at anything else.

The lease is the file `artifex_owner.json` in the run directory:

```json
{"host": "node-7", "pid": 4242, "process_start": 9130412, "pid_scope": "<boot id>|pid:[...]",
 "token": "<random hex>", "created": 1767225600.0, "refreshed": 1767225630.0,
 "command": "train.py --lr 3e-4"}
```

- `process_start` is the process's start time (Linux `/proc/<pid>/stat`, clock ticks since
  boot), so that a recycled pid is not mistaken for the owner. `pid_scope` names the kernel
  boot and the pid namespace the pid means something in: two containers with the same host
  name do not share pids, and neither does a machine before and after a reboot.
- `token` is unique to one lease; an owner recognises its lease by it, never by its pid.
- `created` and `refreshed` are unix seconds of the owner's clock.

A lease is stale, and is taken over with a `StaleLeaseWarning` naming the old owner, when

- it was written on this machine (same host name and `pid_scope`) and its process is gone:
  no such pid, a zombie, or a pid whose start time differs; or
- its `refreshed` time is older than `stale_after_s` (any host: the only sign of life a
  process on another machine gives). Clocks of different hosts must agree to well within
  `stale_after_s` (NTP does).

Anything else is refused with an `OwnershipError` before anything is written: a live lease
(naming its owner and what to do), a second acquire in the same process while the first
`Lease` is held, and a damaged lease file (not JSON, not an object, missing fields, a
directory, a FIFO, a symlink), which is never overwritten blindly: it says who writes here.

Writes are atomic. Locally a lease is created with `O_CREAT | O_EXCL` on the final name, so
of two processes creating it at once exactly one wins (the loser may read it empty in the
microseconds before it is written, and is refused as for a damaged file); it is refreshed by
writing a temporary file and renaming it over the lease; a stale or released lease is first
renamed aside and removed only if the moved file still holds the token that was read, so a
lease written meanwhile by another process is put back, not deleted. On an object store a
write of one object is atomic, and a lease is created with `mode="create"`: on GCS that is
the `ifGenerationMatch=0` precondition, so of two creators exactly one wins (other stores
may check-then-write). Taking over a stale lease and releasing one are read, compare, delete
there: two runs taking over the same stale lease within one round trip of each other could
both succeed. An `ifGenerationMatch=<generation read>` precondition on that delete would
close the race; gcsfs does not offer one. Every acquire reads the lease back, and every
refresh compares tokens before writing, so a lost race is found at the latest on the next
refresh.

A lease whose owner saves less often than every `stale_after_s` would look stale to other
hosts: `Lease.keep_alive()` refreshes it from a background thread. A forked child never owns
its parent's lease: in the child, `still_ours()` is False, `refresh()` raises and
`release()` does nothing. A lease that is garbage-collected or still held when the
interpreter exits is released then.

Example:
    ```python
    import os

    from artifex_ckpt.ownership import acquire, read_owner

    with acquire("/tmp/run") as lease:
        lease.refresh()  # before each save; raises if another run took over
        assert read_owner("/tmp/run").pid == os.getpid()
    assert read_owner("/tmp/run") is None
    ```
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import json
import math
import os
import socket
import stat
import sys
import threading
import time
import uuid
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from etils import epath

from artifex_ckpt.directory import absolute, is_local, write_atomic_text
from artifex_ckpt.errors import CheckpointError, CheckpointWarning, ConfigError

if TYPE_CHECKING:
    import fsspec

__all__ = [
    "LEASE_FILE",
    "REFRESH_EVERY_S",
    "STALE_AFTER_S",
    "Claim",
    "Lease",
    "OwnerInfo",
    "OwnershipError",
    "StaleLeaseWarning",
    "acquire",
    "live_owner",
    "read_owner",
    "require_free",
]

LEASE_FILE = "artifex_owner.json"
STALE_AFTER_S = 300.0
# A refresh writes at most this often (and at least four times per stale_after_s).
REFRESH_EVERY_S = 30.0
# A lease is a few hundred bytes; anything far larger is not one.
_MAX_BYTES = 64 * 1024
_COMMAND_CHARS = 200
# Rounds of read, decide, write before giving up to a directory that keeps changing.
_ATTEMPTS = 5
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_READ_ONLY_HINT = (
    "setup_checkpoint_manager(dirpath) does so while another run writes, as does "
    "options=ocp.CheckpointManagerOptions(read_only=True)"
)


class OwnershipError(CheckpointError, RuntimeError):
    """Another run (or another manager in this process) writes this directory, or its
    lease file is damaged. `owner` is the owner found, when there is one."""

    def __init__(self, message: str, owner: OwnerInfo | None = None) -> None:
        super().__init__(message)
        self.owner = owner


class StaleLeaseWarning(CheckpointWarning):
    """The lease of a run that is gone was taken over; its checkpoints are kept."""


@dataclass(frozen=True)
class OwnerInfo:
    """Who holds a lease, as stored in its file.

    Example:
        ```python
        owner = read_owner("/tmp/run")
        if owner is not None and owner.stale_reason() is None:
            print(f"written by {owner.describe()}")
        ```

    Attributes:
        host: Host name of the owner's machine.
        pid: Process id of the owner.
        process_start: The process's start time in clock ticks since boot (Linux), or None.
        pid_scope: Boot id and pid namespace the pid belongs to (Linux), or None.
        token: Random hex, unique to this lease.
        created: When the lease was acquired (unix seconds).
        refreshed: When the owner last refreshed it (unix seconds).
        command: The owner's command line, shortened.
    """

    host: str
    pid: int
    process_start: int | None
    pid_scope: str | None
    token: str
    created: float
    refreshed: float
    command: str

    def describe(self, now: float | None = None) -> str:
        """One line naming the owner, e.g. `host 'node-7', pid 4242 (train.py), since ...`."""
        now = time.time() if now is None else now
        return (
            f"host {self.host!r}, pid {self.pid} ({self.command or 'unknown command'}), "
            f"since {_when(self.created)}, last refresh {_when(self.refreshed)} "
            f"({_ago(now - self.refreshed)})"
        )

    def stale_reason(
        self, stale_after_s: float = STALE_AFTER_S, now: float | None = None
    ) -> str | None:
        """Why this lease may be taken over, or None while its owner may be alive.

        On this machine the process itself is looked up (no I/O but /proc); a lease from
        elsewhere is stale once `refreshed` is older than `stale_after_s`.
        """
        now = time.time() if now is None else now
        if self.on_this_machine():
            gone = _process_gone(self.pid, self.process_start)
            if gone is not None:
                return gone
        age = now - self.refreshed
        if age > stale_after_s:
            return (
                f"its last refresh was {age:.0f} s ago, more than stale_after_s={stale_after_s:g}"
            )
        return None

    def on_this_machine(self) -> bool:
        """Whether `pid` can be looked up here: same host name, boot and pid namespace."""
        return self.host == _HOST and self.pid_scope == _PID_SCOPE

    def to_json(self) -> str:
        """The lease file's content."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, data: bytes, path: epath.Path) -> OwnerInfo:
        """Parse a lease file's content; `OwnershipError` naming `path` if it is damaged."""
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            problem = (
                f"is not JSON ({err})"
                if data.strip()
                else "is empty (another run may be creating it this moment, or a crash cut it)"
            )
            raise _damaged(path, problem) from err
        if not isinstance(raw, dict):
            raise _damaged(path, f"holds {type(raw).__name__} {_short(raw)}, not an object")
        fields = {
            "host": (str,),
            "pid": (int,),
            "process_start": (int, type(None)),
            "pid_scope": (str, type(None)),
            "token": (str,),
            "created": (int, float),
            "refreshed": (int, float),
            "command": (str,),
        }
        for name, types in fields.items():
            if name not in raw:
                raise _damaged(path, f"lacks the field {name!r}")
            value = raw[name]
            if isinstance(value, bool) or not isinstance(value, types):
                accepted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise _damaged(path, f"has {name}={_short(value)}; expected {accepted}")
        if raw["pid"] < 1:
            raise _damaged(path, f"has pid={raw['pid']}; expected an int >= 1")
        for name in ("host", "token"):
            if not raw[name]:
                raise _damaged(path, f"has {name}=''; expected a non-empty str")
        for name in ("created", "refreshed"):
            if not math.isfinite(raw[name]):
                raise _damaged(path, f"has {name}={raw[name]}; expected a finite number")
        return cls(**{name: raw[name] for name in fields})


class Lease:
    """The right to write one checkpoint directory, held until `release()`.

    Made by `acquire`; usable as a context manager (leaving it releases). Refresh it before
    each save: `refresh()` raises `OwnershipError` once another run has taken it over.

    Example:
        ```python
        lease = acquire("/tmp/run").keep_alive()
        try:
            lease.refresh()
        finally:
            lease.release()
        ```
    """

    def __init__(
        self,
        directory: epath.Path,
        store: _Store,
        owner: OwnerInfo,
        stale_after_s: float,
        key: str,
    ) -> None:
        self.directory = directory
        self.path = directory / LEASE_FILE
        self.owner = owner
        self.stale_after_s = stale_after_s
        self.refresh_every_s = min(REFRESH_EVERY_S, stale_after_s / 4)
        self._store = store
        self._key = key
        self._lock = threading.Lock()
        self._last_write = time.monotonic()
        self._released = False
        self._lost: OwnershipError | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._finalizer = weakref.finalize(
            self, _release_orphan, store, owner.token, owner.pid, self._lock, self._stop
        )

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"Lease({os.fspath(self.path)!r}, pid={self.owner.pid}, {state})"

    @property
    def held(self) -> bool:
        """Whether this process holds the lease (not released, and not a forked child)."""
        return not self._released and os.getpid() == self.owner.pid

    def refresh(self) -> bool:
        """Record that the owner is alive; True if the file was rewritten.

        At most one write every `refresh_every_s` (30 s, or a quarter of `stale_after_s`);
        in between it returns False at once, without I/O. Before writing it checks that the
        lease is still ours (and re-creates it if someone deleted it). Raises
        `OwnershipError` when another run has taken it over, when it was released, or in a
        forked child.
        """
        self._require_held()
        if self._lost is not None:
            raise self._lost
        with self._lock:
            if time.monotonic() - self._last_write < self.refresh_every_s:
                return False
            self._rewrite()
        return True

    def keep_alive(self) -> Lease:
        """Refresh from a daemon thread every `refresh_every_s` until `release()`.

        For owners that save less often than `stale_after_s`. A takeover the thread finds
        is raised by the next `refresh()`. Returns the lease.
        """
        self._require_held()
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(
                target=_beat,
                args=(weakref.ref(self), self._stop, self.refresh_every_s),
                name=f"artifex-ckpt-lease-{self.owner.token[:8]}",
                daemon=True,
            )
            self._heartbeat.start()
        return self

    def still_ours(self) -> bool:
        """Whether the lease file still holds this lease's token (one read; never writes)."""
        if not self.held:
            return False
        try:
            current = _parse(self._store, self.path)
        except OwnershipError:
            return False
        return current is not None and current.token == self.owner.token

    def release(self) -> None:
        """Stop owning the directory: delete the lease file if it still holds our token.

        Idempotent; does nothing in a forked child (the parent still owns it).
        """
        if not self.held:
            return
        self._released = True
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        _REGISTRY.forget(self._key, self)
        self._finalizer.detach()
        with self._lock:
            self._store.remove_if(self.owner.token)

    def _beat(self) -> None:
        with self._lock:
            # Stopped also by the at-exit finalizer, which must not see the lease re-created.
            if not self._released and not self._stop.is_set():
                self._rewrite()

    def _rewrite(self) -> None:
        ours = self.owner.token
        current = _parse(self._store, self.path)
        if current is None:
            # Deleted by hand while we write: nobody else claims it, so claim it again.
            if self._store.create(self.owner.to_json().encode()):
                current = self.owner
            else:
                current = _parse(self._store, self.path)
        if current is None or current.token != ours:
            now_names = f"it now names {current.describe()}" if current else "it keeps vanishing"
            silent = _ago(time.time() - self.owner.refreshed)
            self._lost = OwnershipError(
                f"the lease on {self.directory} was taken over ({now_names}): another run "
                f"writes there now, and this run (pid {self.owner.pid}) must stop writing to "
                f"it. This run last refreshed it {silent}; if it was alive all along, refresh "
                f"more often than every stale_after_s={self.stale_after_s:g} s "
                "(Lease.keep_alive())",
                current,
            )
            raise self._lost
        self.owner = dataclasses.replace(self.owner, refreshed=time.time())
        self._store.replace(self.owner.to_json().encode())
        self._last_write = time.monotonic()

    def _require_held(self) -> None:
        if self._released:
            raise OwnershipError(f"the lease on {self.directory} was released; acquire it again")
        if os.getpid() != self.owner.pid:
            raise OwnershipError(
                f"this process (pid {os.getpid()}) is a fork of the owner of the lease on "
                f"{self.directory} (pid {self.owner.pid}); a forked child does not own it"
            )


def acquire(
    directory: str | os.PathLike[str] | epath.Path, *, stale_after_s: float = STALE_AFTER_S
) -> Lease:
    """Become the one writer of `directory`, creating it if needed.

    Raises `OwnershipError`, having written nothing, when a live lease of another run or of
    another manager in this process exists, or when the lease file is damaged. Takes over a
    stale lease with a `StaleLeaseWarning`. Raises `ConfigError` for a bad path or
    `stale_after_s`, and for an object-store directory the lease cannot be written to.

    Example:
        ```python
        lease = acquire("gs://bucket/run", stale_after_s=600)
        ```
    """
    if (
        isinstance(stale_after_s, bool)
        or not isinstance(stale_after_s, int | float)
        or not math.isfinite(stale_after_s)
        or stale_after_s <= 0
    ):
        raise ConfigError(
            f"stale_after_s={stale_after_s!r} is not accepted; use a number of seconds > 0"
        )
    root = absolute(directory)
    local = is_local(root)
    if local and os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"directory {os.fspath(root)!r} is an existing file; pass a directory")
    key = _key(root)
    path = root / LEASE_FILE
    store: _Store = _LocalFile(path) if local else _ObjectFile(path)
    with _REGISTRY.reserve(key, root) as claim:
        if local:
            os.makedirs(os.fspath(root), exist_ok=True)
        owner = _new_owner()
        for _ in range(_ATTEMPTS):
            current = _parse(store, path)
            if current is None:
                if _create(store, owner.to_json().encode(), root):
                    break
                continue
            reason = _stale_reason(current, stale_after_s)
            if reason is None:
                raise _owned_elsewhere(root, path, current, stale_after_s)
            if store.remove_if(current.token) and _create(store, owner.to_json().encode(), root):
                warnings.warn(
                    StaleLeaseWarning(
                        f"took over checkpoint directory {root} from {current.describe()}: {reason}"
                    ),
                    stacklevel=2,
                )
                break
        else:
            raise OwnershipError(
                f"the lease file {path} changed {_ATTEMPTS} times while being acquired; "
                "several runs are starting on this directory at once. Start one"
            )
        confirmed = _parse(store, path)
        if confirmed is None or confirmed.token != owner.token:
            raise OwnershipError(
                f"another run acquired {root} at the same moment and won: "
                + (confirmed.describe() if confirmed else "its lease vanished again"),
                confirmed,
            )
        lease = Lease(root, store, owner, float(stale_after_s), key)
        claim.fill(lease)
    return lease


class Claim:
    """A writer's hold on a run directory: its lease (kept alive by a heartbeat), and the
    directories created for it, which `release` removes again if nothing was written there.

    Example:
        ```python
        import tempfile

        root = epath.Path(tempfile.mkdtemp()) / "run"
        claim = Claim.take(root, stale_after_s=300.0)
        claim.release()
        assert not root.exists()
        ```
    """

    def __init__(self, lease: Lease, made: list[epath.Path]) -> None:
        self.lease: Lease | None = lease
        self._made = made

    @classmethod
    def take(cls, root: epath.Path, *, stale_after_s: float) -> Claim:
        """Acquire `root` (see `acquire`), remembering which directories did not exist."""
        made = []
        if "://" not in os.fspath(root):
            missing = root
            while not missing.exists() and missing != missing.parent:
                made.append(missing)
                missing = missing.parent
        return cls(acquire(root, stale_after_s=stale_after_s).keep_alive(), made)

    def refresh(self) -> None:
        """`Lease.refresh`: raises `OwnershipError` if another run took the directory."""
        if self.lease is not None:
            self.lease.refresh()

    def release(self) -> None:
        """Give the directory up. A lease that cannot be removed (the file system turned
        read-only) warns: it goes stale instead. Idempotent."""
        lease, self.lease = self.lease, None
        if lease is None:
            return
        try:
            lease.release()
        except OSError as err:
            warnings.warn(
                CheckpointWarning(
                    f"could not remove the lease file {lease.path} ({err}); another writer "
                    f"takes it over once it is stale ({lease.stale_after_s:g} s)"
                ),
                stacklevel=3,
            )
        for made in self._made:  # deepest first; one that is not empty stays, with its parents
            try:
                made.rmdir()
            except (OSError, ValueError):
                break


def require_free(
    directory: str | os.PathLike[str] | epath.Path, *, stale_after_s: float = STALE_AFTER_S
) -> None:
    """Raise the `OwnershipError` that `acquire` would raise, without writing anything: when
    a live run, or another manager of this process, writes `directory`, or its lease file is
    damaged. A stale lease passes (`acquire` takes it over).

    For a writer to learn, before it looks at anything else, that another run writes here.

    Example:
        ```python
        require_free("/tmp/run")  # raises OwnershipError naming the owner, if there is one
        ```
    """
    root = absolute(directory)
    _REGISTRY.check(_key(root), root)
    current = read_owner(root)
    if current is not None and _stale_reason(current, stale_after_s) is None:
        raise _owned_elsewhere(root, root / LEASE_FILE, current, stale_after_s)


def live_owner(
    directory: str | os.PathLike[str] | epath.Path, *, stale_after_s: float = STALE_AFTER_S
) -> OwnerInfo | None:
    """The owner of `directory` while it may still write there (a live run, or a manager of
    this process); None if nobody holds it or the lease is stale. Never writes. Raises
    `OwnershipError` naming the file if the lease file is damaged.

    Example:
        ```python
        owner = live_owner("/tmp/run")
        mode = "read-only" if owner is not None else "writer"
        ```
    """
    root = absolute(directory)
    try:
        _REGISTRY.check(_key(root), root)
    except OwnershipError as err:
        return err.owner or _new_owner()  # a manager of this process (or one being opened)
    current = read_owner(root)
    if current is None or _stale_reason(current, stale_after_s) is not None:
        return None
    return current


def read_owner(directory: str | os.PathLike[str] | epath.Path) -> OwnerInfo | None:
    """Who holds the lease on `directory`, or None if nobody does. Never writes.

    The owner may be gone: ask `owner.stale_reason()`. Raises `OwnershipError` naming the
    file if the lease file is damaged.

    Example:
        ```python
        owner = read_owner("gs://bucket/run")
        print("free" if owner is None else owner.describe())
        ```
    """
    root = absolute(directory)
    path = root / LEASE_FILE
    return _parse(_LocalFile(path) if is_local(root) else _ObjectFile(path), path)


def _create(store: _Store, data: bytes, root: epath.Path) -> bool:
    """`store.create`; on an object store a failure other than "exists" means the directory
    cannot be written: the lease is a writer's first write, and so its permission probe
    (`open_plan` sends no separate one there)."""
    if not isinstance(store, _ObjectFile):
        return store.create(data)
    try:
        return store.create(data)
    except Exception as err:  # object-store clients raise their own types too
        raise ConfigError(
            f"directory {os.fspath(root)!r} is not writable: creating the lease file "
            f"{LEASE_FILE} failed with {type(err).__name__}: {err}"
        ) from err


def _key(root: epath.Path) -> str:
    # One directory under every spelling: symlinks and `..` resolved locally.
    return os.path.realpath(os.fspath(root)) if is_local(root) else os.fspath(root).rstrip("/")


class _Store(Protocol):
    """The lease file's few operations, each atomic on its storage."""

    def read(self) -> bytes | None: ...

    def create(self, data: bytes) -> bool: ...

    def replace(self, data: bytes) -> None: ...

    def remove_if(self, token: str) -> bool: ...


class _LocalFile:
    def __init__(self, path: epath.Path) -> None:
        self.path = path
        self.name = os.fspath(path)

    def read(self) -> bytes | None:
        return _read_regular(self.name, self.path)

    def create(self, data: bytes) -> bool:
        try:
            fd = os.open(self.name, _CREATE_FLAGS, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(self.name)
            raise
        os.close(fd)
        return True

    def replace(self, data: bytes) -> None:
        write_atomic_text(self.path, data.decode())

    def remove_if(self, token: str) -> bool:
        # Renamed aside first: what is compared is then exactly what gets deleted.
        aside = os.path.join(
            os.path.dirname(self.name), f".{LEASE_FILE}.{uuid.uuid4().hex}.removed"
        )
        try:
            os.rename(self.name, aside)
        except FileNotFoundError:
            return False
        try:
            moved = OwnerInfo.from_json(_read_regular(aside, self.path) or b"", self.path)
        except OwnershipError:
            moved = None
        if moved is not None and moved.token == token:
            os.unlink(aside)
            return True
        # Written by someone else meanwhile: put it back, unless yet another one replaced it.
        try:
            os.link(aside, self.name)
        except FileExistsError:
            pass
        except OSError:
            if not os.path.lexists(self.name):
                os.rename(aside, self.name)
                return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)
        return False


class _ObjectFile:
    def __init__(self, path: epath.Path) -> None:
        self.path = path

    def _fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        # fsspec directly: gcsfs answers `epath` reads from a listing cache that other
        # processes' writes do not update; `cat_file` is always one fresh GET.
        import fsspec

        fs, target = fsspec.core.url_to_fs(os.fspath(self.path))
        return fs, str(target)

    def read(self) -> bytes | None:
        fs, target = self._fs()
        try:
            return bytes(fs.cat_file(target))
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> bool:
        fs, target = self._fs()
        try:
            fs.pipe_file(target, data, mode="create")
        except FileExistsError:
            return False
        return True

    def replace(self, data: bytes) -> None:
        fs, target = self._fs()
        fs.pipe_file(target, data)

    def remove_if(self, token: str) -> bool:
        fs, target = self._fs()
        try:
            current = OwnerInfo.from_json(self.read() or b"", self.path)
        except OwnershipError:
            return False
        if current.token != token:
            return False
        try:
            fs.rm_file(target)
        except FileNotFoundError:
            return False
        return True


class _Claim:
    """A registry slot held while a lease is being acquired; empty again if that fails."""

    def __init__(self, registry: _Registry, key: str) -> None:
        self._registry = registry
        self._key = key
        self._filled = False

    def __enter__(self) -> _Claim:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if not self._filled:
            self._registry.drop(self._key)

    def fill(self, lease: Lease) -> None:
        self._registry.fill(self._key, lease)
        self._filled = True


class _Registry:
    """The leases this process holds, by directory; thread-safe, emptied in a forked child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # None: being acquired by some thread right now.
        self._held: dict[str, weakref.ref[Lease] | None] = {}

    def reserve(self, key: str, root: epath.Path) -> _Claim:
        with self._lock:
            if key in self._held:
                ref = self._held[key]
                lease = ref() if ref is not None else None
                if ref is None or (lease is not None and lease.held):
                    raise _owned_here(root, lease)
            self._held[key] = None
        return _Claim(self, key)

    def check(self, key: str, root: epath.Path) -> None:
        """Raise as `reserve` would, reserving nothing."""
        with self._lock:
            if key not in self._held:
                return
            ref = self._held[key]
            lease = ref() if ref is not None else None
            if ref is None or (lease is not None and lease.held):
                raise _owned_here(root, lease)

    def fill(self, key: str, lease: Lease) -> None:
        with self._lock:
            self._held[key] = weakref.ref(lease)

    def drop(self, key: str) -> None:
        with self._lock:
            self._held.pop(key, None)

    def forget(self, key: str, lease: Lease) -> None:
        with self._lock:
            ref = self._held.get(key)
            if ref is not None and ref() is lease:
                del self._held[key]

    def holder_of(self, token: str) -> Lease | None:
        """The held lease with `token`, under whatever spelling of its directory."""
        with self._lock:
            refs = [ref for ref in self._held.values() if ref is not None]
        for ref in refs:
            lease = ref()
            if lease is not None and lease.held and lease.owner.token == token:
                return lease
        return None

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._held = {}


def _read_regular(name: str, shown: epath.Path) -> bytes | None:
    """The bytes of a regular file, None if absent. Never follows a symlink, never waits on a
    FIFO (O_NONBLOCK), never reads more than `_MAX_BYTES`."""
    try:
        fd = os.open(name, _READ_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _damaged(shown, "is a symlink, not a regular file") from err
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _damaged(shown, f"is {_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        chunks = []
        size = 0
        while size <= _MAX_BYTES and (chunk := os.read(fd, _MAX_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > _MAX_BYTES:
        raise _damaged(shown, f"is larger than {_MAX_BYTES} bytes")
    return b"".join(chunks)


def _parse(store: _Store, path: epath.Path) -> OwnerInfo | None:
    data = store.read()
    if data is not None and len(data) > _MAX_BYTES:
        raise _damaged(path, f"is larger than {_MAX_BYTES} bytes")
    return None if data is None else OwnerInfo.from_json(data, path)


def _stale_reason(current: OwnerInfo, stale_after_s: float) -> str | None:
    if current.on_this_machine() and current.pid == os.getpid():
        if _REGISTRY.holder_of(current.token) is not None:
            return None
        if current.process_start == _process_start(os.getpid()):
            # The registry passed it: the Lease that wrote it is gone without releasing.
            return "it was left by a manager of this process that is gone without closing"
    return current.stale_reason(stale_after_s)


def _process_gone(pid: int, started: int | None) -> str | None:
    """Why process `pid` (started at `started`) no longer runs on this machine, or None."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"process {pid} no longer exists"
    except PermissionError:
        pass  # alive, and another user's
    found = _proc_stat(pid)
    if found is None:
        return None
    state, start = found
    if state == "Z":
        return f"process {pid} has exited (it is a zombie)"
    if started is not None and start != started:
        return f"pid {pid} now belongs to another process (one started later)"
    return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """State and start time (clock ticks since boot) of `pid` from /proc, if readable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
        # The command name (field 2) is in parentheses and may itself hold spaces and ')'.
        fields = text[text.rindex(")") + 2 :].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _process_start(pid: int) -> int | None:
    found = _proc_stat(pid)
    return None if found is None else found[1]


def _pid_scope() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        return f"{boot}|{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


_HOST = socket.gethostname()
# Fixed for the life of the process (a fork stays in its parent's namespace).
_PID_SCOPE = _pid_scope()


def _new_owner() -> OwnerInfo:
    now = time.time()
    command = " ".join(sys.argv)
    if len(command) > _COMMAND_CHARS:
        command = command[: _COMMAND_CHARS - 3] + "..."
    return OwnerInfo(
        host=_HOST,
        pid=os.getpid(),
        process_start=_process_start(os.getpid()),
        pid_scope=_PID_SCOPE,
        token=uuid.uuid4().hex,
        created=now,
        refreshed=now,
        command=command,
    )


def _owned_elsewhere(
    root: epath.Path, path: epath.Path, owner: OwnerInfo, stale_after_s: float
) -> OwnershipError:
    here = _REGISTRY.holder_of(owner.token)
    if here is not None:
        return _owned_here(root, here)
    return OwnershipError(
        f"checkpoint directory {root} is being written by another run: {owner.describe()} "
        f"(lease file {path}). Two writers on one directory destroy each other's checkpoints. "
        f"Stop the other run, open the directory read-only ({_READ_ONLY_HINT}) to read it, or "
        "pick another dirpath. If the other run is gone, its lease is taken over "
        f"automatically once it is older than stale_after_s={stale_after_s:g} s (after "
        f"{_when(owner.refreshed + stale_after_s)}), or delete {path}",
        owner,
    )


def _owned_here(root: epath.Path, lease: Lease | None) -> OwnershipError:
    who = (
        f"since {_when(lease.owner.created)}"
        if lease is not None
        else "another thread is acquiring it right now"
    )
    return OwnershipError(
        f"checkpoint directory {root} is already written by another manager or callback in "
        f"this process (pid {os.getpid()}, {who}); e.g. the same CheckpointConfig passed "
        "twice to one fit, or two ModelCheckpoint callbacks with the same dirpath. Close that "
        f"manager first (close() releases the directory), give each writer its own dirpath, "
        f"or open this one read-only ({_READ_ONLY_HINT})",
        None if lease is None else lease.owner,
    )


def _damaged(path: epath.Path, problem: str) -> OwnershipError:
    return OwnershipError(
        f"lease file {path} {problem}. It records which run writes this directory, so it "
        f"is not overwritten blindly; if no other run writes to {path.parent}, delete {path} "
        "and open the directory again"
    )


def _release_orphan(
    store: _Store, token: str, pid: int, lock: threading.Lock, stop: threading.Event
) -> None:
    # A finalizer, at garbage collection or interpreter exit: best effort, never raises.
    if os.getpid() != pid:
        return
    stop.set()
    # A heartbeat may be writing right now (at exit the lease is still alive).
    locked = lock.acquire(timeout=5.0)
    try:
        with contextlib.suppress(Exception):
            store.remove_if(token)
    finally:
        if locked:
            lock.release()


def _beat(ref: weakref.ref[Lease], stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        lease = ref()
        if lease is None:
            return
        try:
            lease._beat()
        except OwnershipError:
            return  # recorded in the lease; the next refresh() raises it
        except OSError:
            pass  # a network hiccup; the next beat tries again
        del lease


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, tz=datetime.UTC).isoformat(timespec="seconds")


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s ago" if seconds >= 0 else f"{-seconds:.0f} s in the future"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    return next((text for test, text in kinds.items() if test(mode)), "a special file")


_REGISTRY = _Registry()
os.register_at_fork(after_in_child=_REGISTRY.reset_after_fork)
