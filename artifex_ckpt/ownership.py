"""One writer, many readers: a lease file that says which run writes a checkpoint directory.

Two writers on one directory (the same job started twice, or two managers or callbacks on
the same dirpath in one process) interleave their saves and evictions and destroy each
other's checkpoints. A writer therefore `acquire`s the directory before writing anything,
refreshes its lease while it writes, and releases it when it closes. Readers never create,
write or delete the lease; `read_owner` tells them (and the CLI) who writes, and `live_owner`
whether that owner may still be writing. `require_free` raises what `acquire` would, without
writing anything, so that a writer learns of another one before it looks at anything else.

The lease is the file `artifex_owner.json` in the run directory. The parts:

- `artifex_ckpt.owner`: what the file holds (`OwnerInfo`), and when its owner is gone: its
  process no longer runs on this machine, or (any host) it was not refreshed for
  `stale_after_s`. A stale lease is taken over with a `StaleLeaseWarning` naming the old
  owner.
- `artifex_ckpt.lease_store`: reading, creating, replacing and removing the file, each
  atomic, on local files and on object stores.
- `artifex_ckpt.lease`: the `Lease` a writer holds (refresh, keep-alive, release).
- `artifex_ckpt.lease_registry`: the leases this process holds, so that a second manager of
  one process is refused too.

Anything but a stale lease is refused with an `OwnershipError` before anything is written: a
live lease (naming its owner and what to do), a second acquire in the same process while
the first `Lease` is held, and a damaged lease file (not JSON, not an object, missing
fields, a directory, a FIFO, a symlink), which is never overwritten blindly: it says who
writes here.

Creating a lease is atomic everywhere (of two creators exactly one wins; on GCS through the
`ifGenerationMatch=0` precondition). Taking over a stale lease is read, compare, delete on
an object store: two runs taking over the same stale lease within one round trip of each
other could both succeed. An `ifGenerationMatch=<generation read>` precondition on that
delete would close the race; gcsfs does not offer one. Every acquire reads the lease back,
and every refresh compares tokens before writing, so a lost race is found at the latest on
the next refresh.

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

import math
import os
import warnings

from etils import epath

from artifex_ckpt.directory import absolute, is_local
from artifex_ckpt.errors import CheckpointWarning, ConfigError
from artifex_ckpt.lease import Lease
from artifex_ckpt.lease_registry import READ_ONLY_HINT, REGISTRY, owned_here
from artifex_ckpt.lease_store import LEASE_FILE, ObjectFile, Store, read_lease, store_at
from artifex_ckpt.owner import (
    STALE_AFTER_S,
    OwnerInfo,
    OwnershipError,
    new_owner,
    process_start,
    when,
)

__all__ = [
    "LEASE_FILE",
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

# Rounds of read, decide, write before giving up to a directory that keeps changing.
_ATTEMPTS = 5


class StaleLeaseWarning(CheckpointWarning):
    """The lease of a run that is gone was taken over; its checkpoints are kept."""


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
    store = store_at(root)
    with REGISTRY.reserve(key, root) as reservation:
        if local:
            os.makedirs(os.fspath(root), exist_ok=True)
        owner = new_owner()
        for _ in range(_ATTEMPTS):
            current = read_lease(store, path)
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
        confirmed = read_lease(store, path)
        if confirmed is None or confirmed.token != owner.token:
            raise OwnershipError(
                f"another run acquired {root} at the same moment and won: "
                + (confirmed.describe() if confirmed else "its lease vanished again"),
                confirmed,
            )
        lease = Lease(root, store, owner, float(stale_after_s), key)
        reservation.fill(lease)
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
    REGISTRY.check(_key(root), root)
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
        REGISTRY.check(_key(root), root)
    except OwnershipError as err:
        return err.owner or new_owner()  # a manager of this process (or one being opened)
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
    return read_lease(store_at(root), root / LEASE_FILE)


def _create(store: Store, data: bytes, root: epath.Path) -> bool:
    """`store.create`; on an object store a failure other than "exists" means the directory
    cannot be written: the lease is a writer's first write, and so its permission probe
    (`open_plan` sends no separate one there)."""
    if not isinstance(store, ObjectFile):
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


def _stale_reason(current: OwnerInfo, stale_after_s: float) -> str | None:
    if current.on_this_machine() and current.pid == os.getpid():
        if REGISTRY.holder_of(current.token) is not None:
            return None
        if current.process_start == process_start(os.getpid()):
            # The registry passed it: the Lease that wrote it is gone without releasing.
            return "it was left by a manager of this process that is gone without closing"
    return current.stale_reason(stale_after_s)


def _owned_elsewhere(
    root: epath.Path, path: epath.Path, owner: OwnerInfo, stale_after_s: float
) -> OwnershipError:
    here = REGISTRY.holder_of(owner.token)
    if here is not None:
        return owned_here(root, here)
    return OwnershipError(
        f"checkpoint directory {root} is being written by another run: {owner.describe()} "
        f"(lease file {path}). Two writers on one directory destroy each other's checkpoints. "
        f"Stop the other run, open the directory read-only ({READ_ONLY_HINT}) to read it, or "
        "pick another dirpath. If the other run is gone, its lease is taken over "
        f"automatically once it is older than stale_after_s={stale_after_s:g} s (after "
        f"{when(owner.refreshed + stale_after_s)}), or delete {path}",
        owner,
    )
