"""The lease file `artifex_owner.json`: its few operations, each atomic on its storage.

Locally a lease is created with `O_CREAT | O_EXCL` on the final name, so of two processes
creating it at once exactly one wins (the loser may read it empty in the microseconds
before it is written); it is replaced by writing a temporary file and renaming it over the
lease; a lease is removed by renaming it aside first and deleting it only if the moved file
still holds the token that was read, so a lease written meanwhile by another process is put
back, not deleted. Reads never follow a symlink, never wait on a FIFO and never read more
than a lease can hold.

On an object store a write of one object is atomic, and a lease is created with
`mode="create"`: on GCS that is the `ifGenerationMatch=0` precondition, so of two creators
exactly one wins (other stores may check-then-write). Removing is read, compare, delete
there: an `ifGenerationMatch=<generation read>` precondition on that delete would close the
race with a writer in between; gcsfs does not offer one.

Example:
    ```python
    from artifex_ckpt.owner import new_owner

    root = epath.Path("/tmp/run")
    root.mkdir(parents=True, exist_ok=True)
    store, owner = store_at(root), new_owner()
    assert store.create(owner.to_json().encode())
    assert not store.create(b"a second creator loses")
    assert read_lease(store, root / LEASE_FILE) == owner
    assert store.remove_if(owner.token) and store.read() is None
    ```
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import TYPE_CHECKING, Protocol

from etils import epath

from artifex_ckpt.directory import NotRegularFileError, is_local, read_regular, write_atomic_text
from artifex_ckpt.owner import OwnerInfo, OwnershipError, damaged

if TYPE_CHECKING:
    import fsspec

__all__ = ["LEASE_FILE", "LocalFile", "ObjectFile", "Store", "read_lease", "store_at"]

LEASE_FILE = "artifex_owner.json"
# A lease is a few hundred bytes; anything far larger is not one.
_MAX_BYTES = 64 * 1024
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class Store(Protocol):
    """The lease file's few operations, each atomic on its storage."""

    def read(self) -> bytes | None: ...

    def create(self, data: bytes) -> bool: ...

    def replace(self, data: bytes) -> None: ...

    def remove_if(self, token: str) -> bool: ...


def store_at(root: epath.Path) -> LocalFile | ObjectFile:
    """The lease file of the run directory `root`, on its storage."""
    path = root / LEASE_FILE
    return LocalFile(path) if is_local(root) else ObjectFile(path)


def read_lease(store: Store, path: epath.Path) -> OwnerInfo | None:
    """The lease in `store` (shown as `path` in errors), None if there is none.

    Raises `OwnershipError` naming `path` if the file is not a lease.
    """
    data = store.read()
    if data is not None and len(data) > _MAX_BYTES:
        raise damaged(path, f"is larger than {_MAX_BYTES} bytes")
    return None if data is None else OwnerInfo.from_json(data, path)


class LocalFile:
    """The lease file on a local file system."""

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


class ObjectFile:
    """The lease file on an object store, through fsspec (gcsfs for gs://)."""

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


def _read_regular(name: str, shown: epath.Path) -> bytes | None:
    """The bytes of a regular file, None if absent (see `directory.read_regular`): never
    more than `_MAX_BYTES`."""
    try:
        data = read_regular(name, _MAX_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except NotRegularFileError as err:
        raise damaged(shown, f"is {err.kind}, not a regular file") from err
    if len(data) > _MAX_BYTES:
        raise damaged(shown, f"is larger than {_MAX_BYTES} bytes")
    return data
