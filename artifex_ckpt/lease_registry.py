"""The leases this process holds, by directory: one writer per directory within a process.

A lease file alone cannot tell two managers of one process apart (same host, same pid), so
`REGISTRY` remembers which directories this process holds, and refuses a second acquire of
one while the first `Lease` is held (`owned_here` says so). A directory is named by a key
that is the same under every spelling of it. It is thread-safe, and emptied in a forked
child, which never owns its parent's leases.

Example:
    ```python
    registry = Registry()
    root = epath.Path("/tmp/run")
    with registry.reserve("/tmp/run", root):  # an acquire under way
        try:
            registry.check("/tmp/run", root)
        except OwnershipError as err:
            refused = str(err)
    assert "another thread is acquiring it right now" in refused
    registry.check("/tmp/run", root)  # the unfilled reservation left the slot empty again
    ```
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING

from etils import epath

from artifex_ckpt.owner import OwnershipError, when

if TYPE_CHECKING:
    from artifex_ckpt.lease import Lease

__all__ = ["READ_ONLY_HINT", "REGISTRY", "Registry", "owned_here"]

READ_ONLY_HINT = (
    "setup_checkpoint_manager(dirpath) does so while another run writes, as does "
    "options=ocp.CheckpointManagerOptions(read_only=True)"
)


class _Reservation:
    """A registry slot held while a lease is being acquired; empty again if that fails."""

    def __init__(self, registry: Registry, key: str) -> None:
        self._registry = registry
        self._key = key
        self._filled = False

    def __enter__(self) -> _Reservation:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if not self._filled:
            self._registry.drop(self._key)

    def fill(self, lease: Lease) -> None:
        self._registry.fill(self._key, lease)
        self._filled = True


class Registry:
    """The leases this process holds, by directory; thread-safe, emptied in a forked child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # None: being acquired by some thread right now.
        self._held: dict[str, weakref.ref[Lease] | None] = {}

    def reserve(self, key: str, root: epath.Path) -> _Reservation:
        """Hold the slot of `key` while its lease is acquired; `OwnershipError` if taken."""
        with self._lock:
            if key in self._held:
                ref = self._held[key]
                lease = ref() if ref is not None else None
                if ref is None or (lease is not None and lease.held):
                    raise owned_here(root, lease)
            self._held[key] = None
        return _Reservation(self, key)

    def check(self, key: str, root: epath.Path) -> None:
        """Raise as `reserve` would, reserving nothing."""
        with self._lock:
            if key not in self._held:
                return
            ref = self._held[key]
            lease = ref() if ref is not None else None
            if ref is None or (lease is not None and lease.held):
                raise owned_here(root, lease)

    def fill(self, key: str, lease: Lease) -> None:
        with self._lock:
            self._held[key] = weakref.ref(lease)

    def drop(self, key: str) -> None:
        with self._lock:
            self._held.pop(key, None)

    def forget(self, key: str, lease: Lease) -> None:
        """Empty the slot of `key` if `lease` holds it."""
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


def owned_here(root: epath.Path, lease: Lease | None) -> OwnershipError:
    """The refusal of `root` while `lease` of this process holds it (None: another thread is
    acquiring it right now)."""
    who = (
        f"since {when(lease.owner.created)}"
        if lease is not None
        else "another thread is acquiring it right now"
    )
    return OwnershipError(
        f"checkpoint directory {root} is already written by another manager or callback in "
        f"this process (pid {os.getpid()}, {who}); e.g. the same CheckpointConfig passed "
        "twice to one fit, or two ModelCheckpoint callbacks with the same dirpath. Close that "
        f"manager first (close() releases the directory), give each writer its own dirpath, "
        f"or open this one read-only ({READ_ONLY_HINT})",
        None if lease is None else lease.owner,
    )


REGISTRY = Registry()
os.register_at_fork(after_in_child=REGISTRY.reset_after_fork)
