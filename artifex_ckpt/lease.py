"""A held lease: the right to write one checkpoint directory, kept alive until released.

`acquire` (in `artifex_ckpt.ownership`) makes a `Lease`. Its owner refreshes it before each
save; every refresh compares tokens before writing, so a run whose lease another run took
over learns so at the latest on its next refresh. A lease whose owner saves less often than
every `stale_after_s` would look stale to other hosts: `Lease.keep_alive()` refreshes it
from a background thread. A forked child never owns its parent's lease: in the child,
`still_ours()` is False, `refresh()` raises and `release()` does nothing. A lease that is
garbage-collected or still held when the interpreter exits is released then.

Example:
    ```python
    from artifex_ckpt.ownership import acquire

    with acquire("/tmp/run") as lease:
        assert lease.held and lease.still_ours()
        assert lease.refresh() is False  # just written: no I/O until refresh_every_s passed
    assert not lease.held
    ```
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
import weakref

from etils import epath

from artifex_ckpt.lease_registry import REGISTRY
from artifex_ckpt.lease_store import LEASE_FILE, Store, read_lease
from artifex_ckpt.owner import OwnerInfo, OwnershipError, ago

__all__ = ["REFRESH_EVERY_S", "Lease"]

# A refresh writes at most this often (and at least four times per stale_after_s).
REFRESH_EVERY_S = 30.0


class Lease:
    """The right to write one checkpoint directory, held until `release()`.

    Made by `acquire`; usable as a context manager (leaving it releases). Refresh it before
    each save: `refresh()` raises `OwnershipError` once another run has taken it over.

    Example:
        ```python
        from artifex_ckpt.ownership import acquire

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
        store: Store,
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
        # Checked without the lock first: this runs at every save and every declined epoch.
        if time.monotonic() - self._last_write < self.refresh_every_s:
            return False
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
            current = read_lease(self._store, self.path)
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
        REGISTRY.forget(self._key, self)
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
        current = read_lease(self._store, self.path)
        if current is None:
            # Deleted by hand while we write: nobody else claims it, so claim it again.
            if self._store.create(self.owner.to_json().encode()):
                current = self.owner
            else:
                current = read_lease(self._store, self.path)
        if current is None or current.token != ours:
            now_names = f"it now names {current.describe()}" if current else "it keeps vanishing"
            silent = ago(time.time() - self.owner.refreshed)
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


def _release_orphan(
    store: Store, token: str, pid: int, lock: threading.Lock, stop: threading.Event
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
