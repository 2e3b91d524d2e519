"""A manifest of every file of a committed checkpoint, to detect silent corruption.

Orbax checks no file content when it restores: a flipped bit in an uncompressed array
file restores as a wrong weight, without an error. `write_manifest` records the size and
CRC-32C of each file of a step directory once its save has committed, in
`artifex_manifest.json` inside that directory; `verify` compares the directory with it,
by sizes only (`deep=False`, a stat per file) or by checksums too (`deep=True`, one read
of every byte).

CRC-32C (Castagnoli) is the checksum: `google_crc32c` computes it with the CPU's CRC
instruction, 2.4x faster than `zlib.crc32` in memory (16.7 against 6.9 GB/s on the 2-core
development machine, `benchmarks/bench_manifest.py`); like any CRC-32 it detects every
single-bit error and every error burst up to 32 bits long; and it is the checksum Google
Cloud Storage keeps per object and reports in its listings.

On an object store (`gs://`, `s3://`, ...) requests cost more than bytes, so both
functions work from one listing of the step's objects (one request per 1,000 objects),
which gives each object's size and, on GCS, its CRC-32C: `write_manifest` costs that
listing and one write, `verify` that listing and one read of the manifest, deep or not,
however large the checkpoint. Deep verification there compares the checksums the store
holds, which is what a restore reads: a truncated, replaced, rewritten or deleted object
is caught; bit rot inside the store is the store's to detect (GCS checks its own data).
An object whose listing has no CRC-32C (S3, or a store that reports none) is downloaded
and checksummed instead. The stored manifest is the same either way, so a run copied
from a bucket to a disk, or back, still verifies.

Only regular files are recorded. Orbax writes no symlinks, FIFOs or devices; one found in
a step directory is foreign, so it is left out rather than followed (a symlink may lead
outside the checkpoint) or opened (opening a FIFO blocks). A recorded file that later
became one of those is reported, never opened. Files present but not recorded are listed
in `ManifestCheck.unlisted` and are not a problem: no reader of the checkpoint looks at a
file its metadata does not name, so an extra file cannot change what restores.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import google_crc32c
from etils import epath

from artifex_ckpt.directory import (
    NotRegularFileError,
    file_kind,
    find_uncached,
    is_local,
    open_regular,
    read_object,
    write_atomic_text,
)
from artifex_ckpt.errors import CheckpointError, CheckpointNotFoundError

if TYPE_CHECKING:
    import fsspec

__all__ = [
    "ALGORITHM",
    "MANIFEST_FILE",
    "DamagedManifestError",
    "Manifest",
    "ManifestCheck",
    "ManifestEntry",
    "read_manifest",
    "verify",
    "write_manifest",
]

MANIFEST_FILE = "artifex_manifest.json"
ALGORITHM = "crc32c"
FORMAT_VERSION = 1
# Reads of 4 MiB: per-call overhead vanishes (1 MiB measures the same), and an object
# downloaded for want of a listed checksum takes few, large range requests.
CHUNK_BYTES = 4 * 2**20
_TEMPORARY = MANIFEST_FILE + ".tmp"
_OWN_FILES = frozenset({MANIFEST_FILE, _TEMPORARY})
_CHECKSUM = "checksum"
_TOP_KEYS = frozenset({"version", "algorithm", "files", _CHECKSUM})
_ENTRY_KEYS = frozenset({"path", "size", ALGORITHM})

Status = Literal["ok", "unverified", "mismatch"]
PathLike: TypeAlias = str | os.PathLike[str] | epath.Path


class DamagedManifestError(CheckpointError, ValueError):
    """A manifest does not parse, or does not match its own checksum."""


@dataclass(frozen=True)
class ManifestEntry:
    """One file of a checkpoint: its path relative to the step directory, size, CRC-32C.

    Example:
        ```python
        entry = ManifestEntry("model/_METADATA", size=1727, crc32c=0x1234ABCD)
        assert entry.crc32c_hex == "1234abcd"
        ```
    """

    path: str
    size: int
    crc32c: int

    @property
    def crc32c_hex(self) -> str:
        return f"{self.crc32c:08x}"


@dataclass(frozen=True)
class Manifest:
    """The files of a committed checkpoint, sorted by path.

    Example:
        ```python
        manifest = write_manifest("/tmp/run/model-03-0.1234")
        print(len(manifest.entries), "files,", manifest.total_bytes, "bytes")
        ```
    """

    entries: tuple[ManifestEntry, ...]
    algorithm: str = ALGORITHM

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.entries)

    def to_json(self) -> str:
        """The stored form: the entries and a checksum of them."""
        body = {
            "version": FORMAT_VERSION,
            "algorithm": self.algorithm,
            "files": [
                {"path": e.path, "size": e.size, ALGORITHM: e.crc32c_hex} for e in self.entries
            ],
        }
        return json.dumps({**body, _CHECKSUM: _body_checksum(body)}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: bytes | str) -> Manifest:
        """Parse the stored form; raises `DamagedManifestError` saying what is wrong."""
        try:
            stored = json.loads(text)
        except ValueError as err:  # UnicodeDecodeError included
            raise DamagedManifestError(f"it is not JSON ({err})") from err
        if not isinstance(stored, dict) or set(stored) != _TOP_KEYS:
            keys = sorted(stored) if isinstance(stored, dict) else type(stored).__name__
            raise DamagedManifestError(f"it holds {keys}, not the keys {sorted(_TOP_KEYS)}")
        checksum = stored.pop(_CHECKSUM)
        if checksum != _body_checksum(stored):
            raise DamagedManifestError(
                f"its content does not match its checksum {checksum!r}: it was changed "
                "after it was written"
            )
        if stored["version"] != FORMAT_VERSION or stored["algorithm"] != ALGORITHM:
            raise DamagedManifestError(
                f"version {stored['version']!r} with algorithm {stored['algorithm']!r} is not "
                f"readable; this artifex_ckpt reads version {FORMAT_VERSION} with {ALGORITHM!r}"
            )
        if not isinstance(stored["files"], list):
            raise DamagedManifestError(f"'files' is {stored['files']!r}, not a list")
        entries = tuple(_entry(item) for item in stored["files"])
        paths = [entry.path for entry in entries]
        if paths != sorted(set(paths)):
            raise DamagedManifestError("its file paths are not sorted and unique")
        return cls(entries)


@dataclass(frozen=True)
class ManifestCheck:
    """What `verify` found in a step directory.

    `status` is "ok" (every recorded file is there, same size, and with `deep=True` same
    checksum), "unverified" (no manifest: written before manifests existed) or "mismatch"
    (see `problems`; a damaged manifest is one too, since it is a file of the checkpoint
    that changed). Each problem names a file, relative to `directory`, and what is wrong.
    `unlisted` names files present but not recorded; they are no problem. `manifest` is
    the manifest compared with (None without one), so that a caller can tell which files
    the check covered without reading it again.

    Example:
        ```python
        check = verify("/tmp/run/model-03-0.1234")
        if check.status == "mismatch":
            print("\\n".join(check.problems))
        ```
    """

    directory: str
    status: Status
    problems: tuple[str, ...] = ()
    unlisted: tuple[str, ...] = ()
    manifest: Manifest | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def write_manifest(step_dir: PathLike) -> Manifest:
    """Record every regular file of a committed `step_dir` in its `MANIFEST_FILE`.

    Call it once the save committed (after `wait_until_finished`) and on one process
    only. The manifest does not list itself. Locally every file is read once, and the
    manifest is written to a temporary file, fsynced and renamed into place. On an object
    store sizes and checksums come from one listing (an object listed without a CRC-32C
    is downloaded), and the manifest is one object write, which is atomic already: two
    requests on GCS. Raises `CheckpointNotFoundError` if `step_dir` is not a directory
    (holds no object), `OSError` naming the file if one cannot be read.

    Example:
        ```python
        import tempfile
        import orbax.checkpoint as ocp

        run = tempfile.mkdtemp()
        with ocp.CheckpointManager(run) as manager:
            state = ocp.args.StandardSave({"w": [1.0, 2.0]})
            manager.save(0, args=ocp.args.Composite(state=state))
            manager.wait_until_finished()  # committed: the files are final
        manifest = write_manifest(f"{run}/0")
        assert verify(f"{run}/0").ok
        ```
    """
    directory = epath.Path(step_dir)
    if not is_local(directory):
        fs, listed = _listing(directory)
        manifest = Manifest(
            tuple(
                _listed_entry(fs, relative, found)
                for relative, found in sorted(listed.items())
                if relative not in _OWN_FILES
            )
        )
        write_atomic_text(directory / MANIFEST_FILE, manifest.to_json())
        return manifest
    base = os.fspath(_step_dir(directory))
    entries = []
    for relative in _regular_files(base):
        size, crc = _checksum_file(base, relative)
        entries.append(ManifestEntry(relative, size, crc))
    manifest = Manifest(tuple(sorted(entries, key=lambda e: e.path)))
    _write(base, manifest.to_json().encode())
    return manifest


def read_manifest(step_dir: PathLike) -> Manifest | None:
    """The manifest of `step_dir`; None if it has none (written before manifests existed).

    Raises `DamagedManifestError` naming the file if it cannot be read or parsed, or does
    not match its own checksum.

    Example:
        ```python
        manifest = read_manifest("/tmp/run/model-03-0.1234")
        sizes = {e.path: e.size for e in manifest.entries} if manifest else {}
        ```
    """
    path = epath.Path(step_dir) / MANIFEST_FILE
    try:
        return _load(epath.Path(step_dir))
    except DamagedManifestError as err:
        raise DamagedManifestError(f"manifest {path} is damaged: {err}") from err


def verify(step_dir: PathLike, *, deep: bool = True) -> ManifestCheck:
    """Compare `step_dir` with its manifest: sizes, and with `deep=True` checksums too.

    A damaged checkpoint is reported in the result, never raised. Raises
    `CheckpointNotFoundError` only if `step_dir` is not a directory at all.

    Locally `deep=True` reads every byte. On an object store both depths cost one listing
    and one read of the manifest: the checksums compared are those the store lists for
    its objects (see the module's notes); an object listed without one is downloaded.

    Example:
        ```python
        assert verify("/tmp/run/model-03-0.1234", deep=False).ok  # stats only
        check = verify("/tmp/run/model-03-0.1234")  # reads every byte
        ```
    """
    directory = epath.Path(step_dir)
    if not is_local(directory):
        return _verify_listed(directory, deep)
    # The step as text, once: path objects built per file cost more than the lstat (B6).
    name = os.fspath(_step_dir(directory))
    try:
        manifest = _load(directory)
    except DamagedManifestError as err:
        return ManifestCheck(name, "mismatch", (f"{MANIFEST_FILE}: damaged manifest: {err}",))
    if manifest is None:
        return ManifestCheck(name, "unverified")
    problems = [p for e in manifest.entries if (p := _problem(name, e, deep)) is not None]
    listed = {entry.path for entry in manifest.entries}
    unlisted = tuple(sorted(set(_all_files(name)) - listed - _OWN_FILES))
    status: Status = "mismatch" if problems else "ok"
    return ManifestCheck(name, status, tuple(problems), unlisted, manifest)


def _step_dir(directory: epath.Path) -> epath.Path:
    if not directory.is_dir():
        raise _not_found(directory)
    return directory


def _not_found(directory: epath.Path) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(
        f"checkpoint directory {os.fspath(directory)!r} does not exist or is not a "
        "directory; pass a step directory such as <run>/model-03-0.1234"
    )


def _load(directory: epath.Path) -> Manifest | None:
    try:
        if is_local(directory):
            text: bytes | None = b"".join(_chunks(os.fspath(directory), MANIFEST_FILE))
        else:
            text = read_object(directory / MANIFEST_FILE)
    except FileNotFoundError:
        return None
    except NotRegularFileError as err:
        raise DamagedManifestError(f"it is {err.kind}, not a regular file") from err
    except OSError as err:
        raise DamagedManifestError(f"it cannot be read: {err}") from err
    return None if text is None else Manifest.from_json(text)


def _body_checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _entry(item: object) -> ManifestEntry:
    if not isinstance(item, dict) or set(item) != _ENTRY_KEYS:
        raise DamagedManifestError(f"entry {item!r} lacks the keys {sorted(_ENTRY_KEYS)}")
    path, size, crc = item["path"], item["size"], item[ALGORITHM]
    parts = path.split("/") if isinstance(path, str) else []
    if not parts or any(part in ("", ".", "..") for part in parts):
        raise DamagedManifestError(f"entry path {path!r} is not a relative path inside the step")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise DamagedManifestError(f"entry {path!r} has size {size!r}, not an integer >= 0")
    if not isinstance(crc, str) or len(crc) != 8 or crc.strip("0123456789abcdef"):
        raise DamagedManifestError(f"entry {path!r} has {ALGORITHM} {crc!r}, not 8 hex digits")
    return ManifestEntry(path, size, int(crc, 16))


def _all_files(base: str, *, complete: bool = False) -> Iterator[str]:
    """Relative paths of every non-directory entry under the local directory `base`, of any
    kind, without following links.

    With `complete`, a sub-directory that cannot be listed raises instead of being
    skipped, so that a manifest never silently leaves out part of a checkpoint.
    """
    top = base.rstrip("/")
    for root, dirs, files in os.walk(top, onerror=_reraise if complete else None):
        inner = root[len(top) :].strip("/")
        # os.walk lists a link to a directory with the directories (and does not follow it).
        links = [name for name in dirs if os.path.islink(os.path.join(root, name))]
        for file in (*files, *links):
            yield f"{inner}/{file}" if inner else file


def _reraise(err: OSError) -> None:
    raise err


def _regular_files(base: str) -> Iterator[str]:
    for relative in _all_files(base, complete=True):
        if relative in _OWN_FILES:
            continue
        if stat.S_ISREG(os.lstat(_local(base, relative)).st_mode):
            yield relative


def _local(base: str, relative: str) -> str:
    """The local path of `relative` (a manifest's `/`-separated path) under `base`."""
    return os.path.join(base, *relative.split("/"))


def _checksum_file(base: str, relative: str) -> tuple[int, int]:
    """Size and CRC-32C of one file, from one read of it."""
    size, crc = 0, 0
    for chunk in _chunks(base, relative):
        size += len(chunk)
        crc = google_crc32c.extend(crc, chunk)
    return size, crc


def _chunks(base: str, relative: str) -> Iterator[bytes]:
    fd = open_regular(_local(base, relative))
    try:
        while chunk := os.read(fd, CHUNK_BYTES):
            yield chunk
    finally:
        os.close(fd)


def _problem(base: str, entry: ManifestEntry, deep: bool) -> str | None:
    """What is wrong with one recorded file, or None."""
    try:
        size = _size(base, entry.path)
    except FileNotFoundError:
        return f"{entry.path}: missing (expected {entry.size} bytes)"
    except OSError as err:
        return f"{entry.path}: cannot be examined: {err.strerror or err}"
    if isinstance(size, str):
        return f"{entry.path}: is {size} now, not a regular file"
    if size != entry.size:
        return f"{entry.path}: size differs: expected {entry.size} bytes, found {size}"
    if not deep:
        return None
    try:
        read_size, crc = _checksum_file(base, entry.path)
    except OSError as err:
        return f"{entry.path}: cannot be read: {err.strerror or err}"
    if read_size != entry.size:
        return f"{entry.path}: size differs: expected {entry.size} bytes, read {read_size}"
    return _checksum_problem(entry, crc)


def _size(base: str, relative: str) -> int | str:
    """The size of a regular file, or the kind of what is there instead."""
    info = os.lstat(_local(base, relative))
    return info.st_size if stat.S_ISREG(info.st_mode) else file_kind(info.st_mode)


def _write(base: str, data: bytes) -> None:
    final = _local(base, MANIFEST_FILE)
    temporary = _local(base, _TEMPORARY)
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    # The rename is durable only once the directory entry is.
    fd = os.open(base, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Listed:
    """One object of an object-store listing: its path in the store, its size, and its
    CRC-32C if the listing gives one."""

    name: str
    size: int
    crc32c: int | None


def _listing(directory: epath.Path) -> tuple[fsspec.AbstractFileSystem, dict[str, _Listed]]:
    """Every object under `directory` by its relative path, from one listing.

    The listing bypasses gcsfs's cache and leaves it as it was, so that it sees what
    tensorstore wrote behind gcsfs's back and later listings see what it does not.
    Folder placeholders (names ending in "/") prove that the directory exists but are no
    files. Raises `CheckpointNotFoundError` if nothing lies under `directory`.
    """
    fs, root, found = find_uncached(directory)
    prefix = root.rstrip("/") + "/"
    inside = {name[len(prefix) :]: info for name, info in found.items() if name.startswith(prefix)}
    if not inside:
        raise _not_found(directory)
    return fs, {
        relative: _Listed(prefix + relative, int(info.get("size") or 0), _listed_crc32c(info))
        for relative, info in inside.items()
        if relative and not relative.endswith("/") and info.get("type", "file") == "file"
    }


def _listed_crc32c(info: dict[str, Any]) -> int | None:
    """The CRC-32C of a GCS listing entry (base64 of 4 big-endian bytes), or None."""
    text = info.get(ALGORITHM)
    if not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        return None
    return int.from_bytes(raw, "big") if len(raw) == 4 else None


def _listed_entry(fs: fsspec.AbstractFileSystem, relative: str, found: _Listed) -> ManifestEntry:
    if found.crc32c is not None:
        return ManifestEntry(relative, found.size, found.crc32c)
    size, crc = _download_checksum(fs, found.name)
    return ManifestEntry(relative, size, crc)


def _download_checksum(fs: fsspec.AbstractFileSystem, name: str) -> tuple[int, int]:
    """Size and CRC-32C of one object, from one download of it."""
    size, crc = 0, 0
    with fs.open(name, "rb", block_size=CHUNK_BYTES) as remote:
        while chunk := remote.read(CHUNK_BYTES):
            size += len(chunk)
            crc = google_crc32c.extend(crc, chunk)
    return size, crc


def _verify_listed(directory: epath.Path, deep: bool) -> ManifestCheck:
    """`verify` on an object store: one listing, one read of the manifest."""
    name = os.fspath(directory)
    fs, listed = _listing(directory)
    if MANIFEST_FILE not in listed:
        return ManifestCheck(name, "unverified")
    try:
        manifest = _load(directory)
    except DamagedManifestError as err:
        return ManifestCheck(name, "mismatch", (f"{MANIFEST_FILE}: damaged manifest: {err}",))
    if manifest is None:  # deleted since the listing
        return ManifestCheck(name, "unverified")
    folders = {
        "/".join(parts[:depth])
        for parts in (relative.split("/") for relative in listed)
        for depth in range(1, len(parts))
    }
    problems = [
        problem
        for entry in manifest.entries
        if (problem := _listed_problem(fs, entry, listed.get(entry.path), folders, deep))
        is not None
    ]
    recorded = {entry.path for entry in manifest.entries}
    unlisted = tuple(sorted(set(listed) - recorded - _OWN_FILES))
    status: Status = "mismatch" if problems else "ok"
    return ManifestCheck(name, status, tuple(problems), unlisted, manifest)


def _listed_problem(
    fs: fsspec.AbstractFileSystem,
    entry: ManifestEntry,
    found: _Listed | None,
    folders: set[str],
    deep: bool,
) -> str | None:
    """What is wrong with one recorded object, judged by its listing entry, or None."""
    if found is None:
        if entry.path in folders:
            return f"{entry.path}: is a directory now, not a regular file"
        return f"{entry.path}: missing (expected {entry.size} bytes)"
    if found.size != entry.size:
        return f"{entry.path}: size differs: expected {entry.size} bytes, found {found.size}"
    if not deep:
        return None
    crc = found.crc32c
    if crc is None:
        try:
            read_size, crc = _download_checksum(fs, found.name)
        except OSError as err:
            return f"{entry.path}: cannot be read: {err.strerror or err}"
        if read_size != entry.size:
            return f"{entry.path}: size differs: expected {entry.size} bytes, read {read_size}"
    return _checksum_problem(entry, crc)


def _checksum_problem(entry: ManifestEntry, crc: int) -> str | None:
    if crc == entry.crc32c:
        return None
    return (
        f"{entry.path}: checksum differs: expected {ALGORITHM} {entry.crc32c_hex}, found {crc:08x}"
    )
