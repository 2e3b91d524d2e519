"""Housekeeping of a checkpoint directory: where it is, what a crash leaves in it, and
the few file operations that differ between a local disk and an object store.

Paths are local or object-store URLs (`gs://bucket/prefix`, and the other schemes of
`etils.epath`). Object stores have no directories and no atomic rename: a "directory"
is a name prefix, a rename is copy + delete, and a single-object write is atomic.

Two kinds of leftovers are cleaned: saves that never committed (named with Orbax's
temporary suffix) and evicted checkpoints. Orbax deletes an evicted step file by file,
so a crash midway would leave a directory with a valid name and missing files; evicted
local steps are therefore renamed into `TRASH` (atomic, Orbax's `todelete_subdir`) and
removed from there by a `TrashPurger`. On gs:// Orbax ignores `todelete_subdir` and
deletes evicted steps itself, so there the purger does nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, Literal

from etils import epath
from orbax.checkpoint.path import step as step_lib

from artifex_ckpt.errors import ConfigError

if TYPE_CHECKING:
    import fsspec

__all__ = [
    "TRASH",
    "NotRegularFileError",
    "TrashPurger",
    "absolute",
    "file_kind",
    "filesystem",
    "find_uncached",
    "forget_listing",
    "is_local",
    "open_regular",
    "read_object",
    "read_regular",
    "remove_uncommitted",
    "remove_unfinished",
    "require_writable",
    "tree_size",
    "write_atomic",
    "write_atomic_text",
]

TRASH = ".artifex-deleted"
# The URL schemes `etils.epath` maps to a storage backend (gcsfs, s3fs, adlfs, hffs).
SCHEMES = ("gs", "s3", "az", "hf")
_SCHEME = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
# Orbax sends evicted steps to `todelete_subdir` everywhere but on GCS.
_NO_TRASH_PREFIX = "gs://"
_ACCEPTED = "a local path or a URL " + ", ".join(f"{s}://bucket/prefix" for s in SCHEMES)
# Orbax's mark of a committed step on an object store (its `CommitFileTemporaryPath`).
COMMIT_SUCCESS = "commit_success.txt"


def absolute(directory: str | os.PathLike[str] | epath.Path) -> epath.Path:
    """`directory` made absolute, `~` expanded; object-store URLs keep their scheme.

    Orbax refuses relative paths, but only in the first background save, so the check
    is here. Raises `ConfigError` for an empty path, a NUL character, an unknown
    scheme or a URL without a bucket.

    Example:
        ```python
        assert str(absolute("gs://bucket/run")) == "gs://bucket/run"
        assert str(absolute("~/run")) == os.path.expanduser("~/run")
        ```
    """
    if not isinstance(directory, str | os.PathLike):
        raise ConfigError(f"directory={directory!r} is not a path; pass {_ACCEPTED}")
    text = os.fspath(directory)
    if not isinstance(text, str):
        raise ConfigError(f"directory={text!r} is bytes; pass {_ACCEPTED} as str")
    if not text:
        raise ConfigError(f"directory={text!r} is empty; pass {_ACCEPTED}")
    if "\0" in text:
        raise ConfigError(f"directory={text!r} contains a NUL character; pass {_ACCEPTED}")
    if "://" not in text:
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    match = _SCHEME.match(text)
    scheme = match.group("scheme").lower() if match else None
    if match is None or scheme not in SCHEMES:
        shown = f"scheme {match.group(0)!r}" if match else "a '://' that is not a scheme"
        raise ConfigError(f"directory={text!r} has {shown}; pass {_ACCEPTED}")
    rest = text[match.end() :]
    if not rest or rest.startswith("/"):
        raise ConfigError(f"directory={text!r} names no bucket; pass {_ACCEPTED}")
    return epath.Path(f"{scheme}://{rest}")


def is_local(directory: str | os.PathLike[str]) -> bool:
    """Whether `directory` is on a local file system (not an object-store URL)."""
    return "://" not in os.fspath(directory)


def file_kind(mode: int) -> str:
    """What a file of `st_mode` `mode` is, in words ("a FIFO", "a directory", ...): for
    messages about a file that is not what a reader expected.

    Example:
        ```python
        assert file_kind(os.stat("/tmp").st_mode) == "a directory"
        ```
    """
    kinds = {
        stat.S_ISREG: "a regular file",
        stat.S_ISDIR: "a directory",
        stat.S_ISLNK: "a symlink",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    return next((text for test, text in kinds.items() if test(mode)), "a special file")


class NotRegularFileError(OSError):
    """A file a reader expected to be regular is something else: `kind` says what, in
    `file_kind`'s words. Its `strerror` reads "is a FIFO, not a regular file".

    Example:
        ```python
        try:
            read_regular("/runs/exp1/artifex_owner.json", 1 << 16)
        except NotRegularFileError as err:
            print(f"the lease {err.filename} {err.strerror}")  # ... is a FIFO, not a ...
        ```
    """

    def __init__(self, kind: str, path: str) -> None:
        code = errno.ELOOP if kind == "a symlink" else errno.EINVAL
        super().__init__(code, f"is {kind}, not a regular file", path)
        self.kind = kind

    def __reduce__(self) -> tuple[type[NotRegularFileError], tuple[str, str]]:
        # OSError's own would call __init__ with (errno, strerror): keep `kind` across pickling
        # (a process pool's worker raising it).
        return type(self), (self.kind, self.filename)


# A symlink is refused by the kernel (O_NOFOLLOW); opening a FIFO for reading would wait
# for a writer, O_NONBLOCK returns at once so that `fstat` can refuse it before any read.
# Appending opens read-write, which never waits on a FIFO either, and creates the file.
_SAFE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_FLAGS = {
    "read": os.O_RDONLY | _SAFE_FLAGS,
    "append": os.O_RDWR | os.O_APPEND | os.O_CREAT | _SAFE_FLAGS,
}


def open_regular(path: str | os.PathLike[str], mode: Literal["read", "append"] = "read") -> int:
    """A blocking descriptor of the local file `path`, if it is a regular file: read-only,
    or with `mode="append"` read-write, appending, and created if absent (mode 0o666
    before the umask).

    Files in a run directory may be replaced by anyone who can write there: a symlink is
    never followed, and a FIFO, socket or device is refused without waiting, reading or
    writing. Raises `NotRegularFileError` for those, `FileNotFoundError` if nothing is
    there (when reading).

    Example:
        ```python
        fd = open_regular("/runs/exp1/artifex_owner.json")
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        ```
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, _FLAGS[mode], 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise NotRegularFileError("a symlink", name) from err
        raise
    try:
        found = os.fstat(fd).st_mode
        if not stat.S_ISREG(found):
            raise NotRegularFileError(file_kind(found), name)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    """The bytes of the local regular file `path` (as `open_regular` opens it): all of
    them, or with a `limit` at most `limit + 1`, so that a caller can tell a file larger
    than `limit`.

    Example:
        ```python
        data = read_regular("/runs/exp1/model-03-0.1234/metrics/metrics", 1 << 16)
        if len(data) > 1 << 16:
            raise ValueError("metrics file too large")
        ```
    """
    with os.fdopen(open_regular(path), "rb") as file:
        return file.read() if limit is None else file.read(limit + 1)


def require_writable(directory: epath.Path) -> None:
    """Fail now, not after an epoch, if `directory` can never be created or written.

    Locally: the nearest existing ancestor must be a writable directory (no I/O but
    stat). On an object store, permissions live on the server, so a probe object
    `.artifex-write-probe-<random>` is written under `directory` and deleted: two
    requests. (A manager does not call this on object stores: its lease, written at
    open, is that probe already; see `ownership.acquire`.) Raises `ConfigError` naming
    the directory and the reason.
    """
    if not is_local(directory):
        _probe(directory)
        return
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return
    reason = "is not a directory" if not existing.is_dir() else "is not writable"
    raise ConfigError(
        f"directory {os.fspath(directory)!r} is not writable: {os.fspath(existing)!r} {reason}"
    )


def _probe(directory: epath.Path) -> None:
    fs, root = filesystem(directory)
    probe = f"{root.rstrip('/')}/.artifex-write-probe-{uuid.uuid4().hex}"
    try:
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as err:
        raise ConfigError(
            f"directory {os.fspath(directory)!r} is not writable: writing and deleting a "
            f"probe object failed with {type(err).__name__}: {err}"
        ) from err


def tree_size(path: epath.Path) -> int:
    """Bytes of the files under `path` (or of `path` itself, if it is a file); 0 if absent.

    On an object store this is one listing (paged by the store), not a request per
    object. Locally it stats regular files only: symbolic links are not followed, and
    FIFOs, sockets and devices are never opened.

    Example:
        ```python
        size = tree_size(manager.step_path(manager.best_step()))
        ```
    """
    if not is_local(path):
        _, _, found = find_uncached(path)
        return sum(int(info.get("size") or 0) for info in found.values())
    top = os.fspath(path)
    try:
        top_stat = os.lstat(top)
    except FileNotFoundError:
        return 0
    if stat.S_ISREG(top_stat.st_mode):
        return top_stat.st_size
    total = 0
    for root, _, names in os.walk(top):
        for name in names:
            # A purge may remove files while we walk.
            with contextlib.suppress(FileNotFoundError):
                entry = os.lstat(os.path.join(root, name))
                if stat.S_ISREG(entry.st_mode):
                    total += entry.st_size
    return total


def filesystem(path: epath.Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system of an object-store URL and the path within it.

    fsspec is what `epath` itself uses for object stores; it is imported late, so that a
    process can still set `FSSPEC_*` variables after importing artifex_ckpt.

    Example:
        ```python
        fs, bucket_path = filesystem(epath.Path("gs://bucket/run"))
        ```
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(os.fspath(path))
    return fs, str(root)


def find_uncached(
    path: epath.Path,
) -> tuple[fsspec.AbstractFileSystem, str, dict[str, dict[str, Any]]]:
    """Every object under the object-store URL `path`, by full name with its listing
    details, from one listing that leaves gcsfs's cache as it was: it sees what
    tensorstore wrote behind gcsfs's back, and later listings see what it does not.
    Returns the file system and the path within it too, as `filesystem` does.

    Example:
        ```python
        fs, root, found = find_uncached(epath.Path("gs://bucket/run/model-03-0.1234"))
        sizes = {name: info["size"] for name, info in found.items()}
        ```
    """
    fs, root = filesystem(path)
    return fs, root, fs.find(root, detail=True, **_no_cache_update(fs))


def _no_cache_update(fs: fsspec.AbstractFileSystem) -> dict[str, Any]:
    # gcsfs would fill its listing cache from this walk, and later listings through
    # epath would miss objects that tensorstore writes behind gcsfs's back.
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return {"update_cache": False} if "gs" in protocols or "gcs" in protocols else {}


def write_atomic_text(path: epath.Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old content or the new, never half.

    Locally: a temporary file beside `path`, flushed to disk, then renamed over it.
    On an object store a single-object write is atomic already (and a rename would be
    copy + delete), so the object is written directly, in one request.

    Example:
        ```python
        write_atomic_text(epath.Path("gs://bucket/run/settings.json"), "{}")
        ```
    """
    write_atomic(path, text.encode())


def write_atomic(path: epath.Path, data: bytes) -> None:
    """`write_atomic_text` for bytes: the old content or the new, never half; one request
    on an object store.

    Example:
        ```python
        write_atomic(epath.Path("gs://bucket/run/history.jsonl"), b"{}\n")
        ```
    """
    if not is_local(path):
        fs, target = filesystem(path)
        fs.pipe_file(target, data)
        return
    target = os.fspath(path)
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def forget_listing(directory: epath.Path) -> None:
    """Drop `epath`'s cached listing of `directory` (no request): `epath` keeps its own
    fsspec instance, with its own listing cache, which writes through `filesystem`'s do
    not update, so an `epath` caller would go on seeing `directory` as listed before.

    Example:
        ```python
        forget_listing(epath.Path("gs://bucket/run"))
        ```
    """
    backend = getattr(directory, "_backend", None)
    fs = getattr(backend, "fs", None)
    if fs is not None:
        fs(os.fspath(directory)).invalidate_cache(os.fspath(directory))


def read_object(path: epath.Path) -> bytes | None:
    """The content of the object `path` on an object store, or None if there is none: one
    request (a download), where `epath`'s exists, is_file and read cost three to nine and
    may answer from a listing cache that other writers do not update.

    Only for object-store URLs; a local path raises `ValueError` (local readers must check
    for FIFOs before opening, which this cannot do).

    Example:
        ```python
        data = read_object(epath.Path("gs://bucket/run/artifex_ckpt.json"))
        ```
    """
    if is_local(path):
        raise ValueError(f"read_object({os.fspath(path)!r}): not an object-store URL")
    fs, target = filesystem(path)
    try:
        return bytes(fs.cat_file(target))
    except FileNotFoundError:
        return None


def remove_uncommitted(
    directory: epath.Path, committed: Collection[str], is_step: Callable[[str], bool]
) -> list[str]:
    """On an object store, remove the saves under `directory` that never committed; returns
    the names removed.

    Orbax saves to the final name there and marks the commit with `commit_success.txt`;
    its own start-up scan (`cleanup_tmp_directories`) asks every entry for that mark, two
    to four requests each, even for the checkpoints its listing has just found committed.
    This lists `directory` once and asks only the sub-prefixes named like a step
    (`is_step`) that are not in `committed` (the names of the steps the caller's listing
    found committed): with nothing unfinished, one request in all. Such a prefix without the
    mark is removed. Anything else is left alone: objects, the quarantine, prefixes of the
    user's own (Orbax's scan removed every prefix without the mark). Locally it does nothing
    (see `remove_unfinished`).

    Example:
        ```python
        removed = remove_uncommitted(epath.Path("gs://bucket/run"), {"1", "2"}, str.isdigit)
        ```
    """
    if is_local(directory):
        return []
    fs, root = filesystem(directory)
    root = root.rstrip("/")
    cached = _no_cache_update(fs) and root in fs.dircache
    try:
        entries = fs.ls(root, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    finally:
        if _no_cache_update(fs) and not cached:
            # Left in gcsfs's listing cache, this listing would answer later `epath` calls
            # about entries that Orbax and tensorstore add or delete behind gcsfs's back.
            fs.dircache.pop(root, None)
    removed = []
    for entry in entries:
        name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "directory" or name in committed or not is_step(name):
            continue
        try:
            fs.cat_file(f"{root}/{name}/{COMMIT_SUCCESS}")
            continue  # committed after all (the caller's listing did not know it)
        except FileNotFoundError:
            pass
        with contextlib.suppress(FileNotFoundError):
            fs.rm(f"{root}/{name}", recursive=True)
        removed.append(name)
    if removed:
        fs.invalidate_cache(root)
    return removed


def remove_unfinished(directory: epath.Path) -> None:
    """Remove saves that never committed: entries carrying Orbax's temporary suffix.

    Locally that is how every unfinished save looks; Orbax's own scan checks each entry
    through an event loop (~0.2 s per 1,000). On gs:// Orbax saves without the suffix
    and marks a commit with `commit_success.txt`; its own scan at start-up
    (`cleanup_tmp_directories`) removes those, and this removes suffixed leftovers
    (a legacy rename-based save, or a copied local directory), prefix and object alike.
    A symbolic link is removed itself; what it leads to is left alone.
    """
    if is_local(directory):
        _remove_unfinished_here(os.fspath(directory))
        return
    if not directory.exists():
        return
    for path in directory.iterdir():
        if step_lib.TMP_DIR_SUFFIX in path.name:
            path.rmtree(missing_ok=True)


def _remove_unfinished_here(root: str) -> None:
    # One scandir: the entry types come with the names, so a directory of thousands of
    # checkpoints costs one pass of string tests when nothing is unfinished (B5).
    try:
        entries = [e for e in os.scandir(root) if step_lib.TMP_DIR_SUFFIX in e.name]
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


class TrashPurger:
    """Empties `directory / TRASH` (the manager's housekeeping thread calls `finish` after
    each commit, beside the training loop).

    An evicted checkpoint that is a symbolic link (a checkpoint moved to another disk and
    linked back) loses its link only: what the link leads to lies outside the run directory
    and is left alone, and the purge says where it is, so that its space can be reclaimed.
    On gs:// there is no trash (Orbax deletes evicted steps itself there), and `finish`
    returns at once without a request.
    """

    def __init__(self, directory: epath.Path) -> None:
        self.trash = directory / TRASH
        self._active = not os.fspath(directory).startswith(_NO_TRASH_PREFIX)
        self._notes: list[str] = []

    def check(self) -> None:
        """Raise `ConfigError` if `TRASH` exists but is not a real directory (a file, a
        symbolic link, ...): evicted checkpoints are moved into it, then deleted.

        Example:
            ```python
            TrashPurger(epath.Path("/tmp/run")).check()
            ```
        """
        if not self._active or not is_local(self.trash):
            return
        name = os.fspath(self.trash)
        try:
            mode = os.lstat(name).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISDIR(mode):
            return
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a directory"
        raise ConfigError(
            f"{name} is {kind}; that name is reserved for the directory evicted checkpoints "
            "are moved into before they are deleted, and deleting through it could reach "
            "files outside the run. Move it out of the run directory"
        )

    def finish(self) -> list[str]:
        """Purge and remove the trash itself. Returns notes on links removed whose targets
        were left in place. Call only when no save is in flight."""
        if not self._active:
            return []
        self._purge(remove_trash=True)
        notes, self._notes = self._notes, []
        return notes

    def _purge(self, remove_trash: bool = False) -> None:
        local = is_local(self.trash)
        trash = os.fspath(self.trash)
        if local and (os.path.islink(trash) or not os.path.isdir(trash)):
            return  # absent, or foreign (refused by `check` at open): never delete through it
        with contextlib.suppress(FileNotFoundError):
            for entry in self.trash.iterdir():
                name = os.fspath(entry)
                if local and os.path.islink(name):
                    target = os.readlink(name)
                    os.unlink(name)
                    self._notes.append(
                        f"evicted checkpoint {entry.name} was a symbolic link to {target}: the "
                        f"link was removed and {target} was left in place; delete it to free "
                        "its space"
                    )
                elif entry.is_dir():
                    entry.rmtree(missing_ok=True)
                else:
                    entry.unlink(missing_ok=True)
        if remove_trash:
            with contextlib.suppress(OSError):  # gone already, or refilled meanwhile
                self.trash.rmdir()
