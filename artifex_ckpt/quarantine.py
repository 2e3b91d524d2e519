"""Moving a damaged checkpoint out of a run without deleting it: `quarantine`.

A checkpoint that fails `verify` or fails to restore stays where it is until someone acts:
every manager opened on the run lists it, `best_step` may pick it, and a resume tries it
first. `quarantine(run, name)` moves it to `run/.artifex-quarantine/name` (`name.1`,
`name.2`, ... if that is taken), where no manager looks, so the next resume continues from
the checkpoints that remain. Nothing is deleted: moving the directory back undoes it.

- Locally the move is one `rename`, atomic: a reader sees the checkpoint in the run or in the
  quarantine, never half of it.
- On an object store (`gs://`) there is no rename of a prefix, so it is a copy of every
  object (server side) followed by a delete of the originals: **not atomic**. The copy is
  checked (same objects, same sizes) before anything is deleted, and the original's commit
  marker goes first, so a crash midway leaves either the intact original plus a partial copy,
  or a complete copy plus an original that no manager lists as committed.

It refuses (with `ConfigError`) a name that is not a checkpoint directory of the run,
and a run whose writer is alive (its lease `artifex_owner.json`, see `artifex_ckpt.ownership`):
moving a checkpoint under a running manager would race its saves and evictions. The move is
recorded as a `quarantined` decision in the run's history (`artifex_history.jsonl`), best
effort: a history that cannot be written warns (`HistoryWarning`) and the move stands.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from typing import TYPE_CHECKING

import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.path import step as step_lib

from artifex_ckpt.directory import TRASH, absolute, file_kind, is_local, read_regular
from artifex_ckpt.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from artifex_ckpt.history import Decision, DecisionHistory
from artifex_ckpt.ownership import OwnershipError, read_owner
from artifex_ckpt.plan import plan_manager
from artifex_ckpt.settings import RetentionSettings

if TYPE_CHECKING:
    import fsspec

__all__ = ["QUARANTINE", "quarantine"]

QUARANTINE = ".artifex-quarantine"
# Orbax writes this file into every step directory it commits.
_STEP_MARKER = "_CHECKPOINT_METADATA"
# On object stores Orbax marks a committed step with this object; it is deleted first.
_COMMIT_MARKER = "commit_success.txt"
_METRICS = "metrics/metrics"
# A metrics file is a few hundred bytes; a larger one is not read for the history's score.
_MAX_METRICS_BYTES = 1 << 16
_MAX_SUFFIX = 1000


def quarantine(
    directory: str | os.PathLike[str] | epath.Path, name: str, *, reason: str = ""
) -> epath.Path:
    """Move checkpoint `name` of the run in `directory` into `directory/.artifex-quarantine`.

    Returns where it went: `.artifex-quarantine/name`, or `name.1`, `name.2`, ... when an
    earlier quarantine used that name. Locally an atomic rename; on an object store a copy,
    checked, then a delete (not atomic; see the module notes). Records a `quarantined`
    decision with `reason` in the run's history, best effort.

    Raises `ConfigError` when `name` is not a checkpoint directory of the run (a path
    rather than a name, missing, a file, a symlink, hidden, an unfinished save, or a directory
    that no manager lists and that has no `_CHECKPOINT_METADATA`), and `OwnershipError` when
    a live run owns the directory.

    Example:
        ```python
        moved = quarantine("/tmp/run", "model-03-0.1234", reason="checksum mismatch")
        assert moved.name == "model-03-0.1234" and moved.parent.name == ".artifex-quarantine"
        ```
    """
    root = absolute(directory)
    if not root.is_dir():
        raise CheckpointNotFoundError(
            f"run directory {os.fspath(root)!r} does not exist or is not a directory"
        )
    source, step, monitor = _checkpoint(root, name)
    _require_unowned(root, name)
    score = _score(source, monitor)
    target = _move_local(root, source) if is_local(root) else _move_remote(root, source)
    if step is not None:
        decision = Decision.quarantined(
            step, name, to=os.fspath(target), reason=reason, score=score
        )
        _record(root, decision)
    return target


def _checkpoint(root: epath.Path, name: object) -> tuple[epath.Path, int | None, str | None]:
    """The step directory `name` of `root`, its step (None if no manager lists it) and the
    run's monitor; raises `ConfigError` if `name` is not one."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or os.sep in name
        or "\0" in name
    ):
        raise ConfigError(
            f"{name!r} is not a checkpoint name: pass the name of a step directory directly "
            f"inside {os.fspath(root)}, such as 'model-03-0.1234', not a path"
        )
    if name.startswith("."):
        raise ConfigError(
            f"{name!r} in {os.fspath(root)} is hidden: checkpoints never start with '.', the "
            f"library's own directories ({TRASH}, {QUARANTINE}) do"
        )
    if step_lib.TMP_DIR_SUFFIX in name:
        raise ConfigError(
            f"{name!r} in {os.fspath(root)} is an unfinished save (Orbax's temporary suffix "
            f"{step_lib.TMP_DIR_SUFFIX!r}), not a checkpoint; the next writer removes it"
        )
    source = root / name
    settings, listed = _listed(root)
    _require_directory(root, source, sorted(listed))
    monitor = settings.monitor if settings is not None else None
    if name in listed:
        return source, listed[name], monitor
    if (source / _STEP_MARKER).exists():
        return source, int(name) if name.isdigit() else None, monitor
    raise ConfigError(
        f"{name!r} in {os.fspath(root)} is not a checkpoint directory: no manager lists it "
        f"and it has no {_STEP_MARKER}; checkpoints: {sorted(listed) or 'none'}"
    )


def _require_directory(root: epath.Path, source: epath.Path, listed: list[str]) -> None:
    where = f"{source.name!r} in {os.fspath(root)}"
    missing = f"{where} does not exist; checkpoints: {listed or 'none'}"
    if not is_local(root):
        if source.is_dir():
            return
        if source.exists():
            raise ConfigError(f"{where} is an object, not a checkpoint directory")
        raise CheckpointNotFoundError(missing)
    try:
        mode = os.lstat(os.fspath(source)).st_mode
    except FileNotFoundError:
        raise CheckpointNotFoundError(missing) from None
    if stat.S_ISLNK(mode):
        raise ConfigError(
            f"{where} is a symbolic link, not a checkpoint directory; remove the link itself "
            "(what it points to is not part of the run)"
        )
    if not stat.S_ISDIR(mode):
        raise ConfigError(f"{where} is {file_kind(mode)}, not a checkpoint directory")


def _listed(root: epath.Path) -> tuple[RetentionSettings | None, dict[str, int]]:
    """The run's settings and the checkpoints a manager opened on it would list, by name.

    Damaged settings list nothing (a checkpoint is then recognised by its marker file)."""
    try:
        settings = RetentionSettings.load(root)
    except CheckpointError:
        return None, {}
    try:
        plan = plan_manager(root, settings, {}, ocp.CheckpointManagerOptions(read_only=True))
        return settings, {m.path.name: m.step for m in plan.step_names.find_all(root)}
    except CheckpointError:
        return settings, {}


def _require_unowned(root: epath.Path, name: str) -> None:
    try:
        owner = read_owner(root)
    except OwnershipError as err:
        raise OwnershipError(
            f"cannot tell whether a run writes {os.fspath(root)}, so {name!r} stays where it "
            f"is: {err}",
            err.owner,
        ) from err
    if owner is None:
        return
    stale = owner.stale_reason()
    if stale is None:
        raise OwnershipError(
            f"{os.fspath(root)} is written by a live run ({owner.describe()}); moving {name!r} "
            "now could race its saves and evictions. Stop that run first, then quarantine",
            owner,
        )


def _targets(root: epath.Path, name: str) -> list[epath.Path]:
    pen = root / QUARANTINE
    return [pen / (name if n == 0 else f"{name}.{n}") for n in range(_MAX_SUFFIX)]


def _full(root: epath.Path, name: str) -> ConfigError:
    return ConfigError(
        f"{os.fspath(root / QUARANTINE)} already holds {_MAX_SUFFIX} copies of {name!r}; "
        "delete the ones you do not need"
    )


def _move_local(root: epath.Path, source: epath.Path) -> epath.Path:
    pen = os.fspath(root / QUARANTINE)
    os.makedirs(pen, exist_ok=True)
    for target in _targets(root, source.name):
        # mkdir claims the name (it fails if the name is taken, even by a concurrent
        # quarantine); renaming a directory over an empty directory then replaces it.
        try:
            os.mkdir(os.fspath(target))
        except FileExistsError:
            continue
        try:
            os.rename(os.fspath(source), os.fspath(target))
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(os.fspath(target))
            raise
        for changed in (os.fspath(root), pen):
            _fsync_directory(changed)
        return target
    raise _full(root, source.name)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_remote(root: epath.Path, source: epath.Path) -> epath.Path:
    import fsspec

    fs, source_key = fsspec.core.url_to_fs(os.fspath(source))
    target = next((t for t in _targets(root, source.name) if not t.exists()), None)
    if target is None:
        raise _full(root, source.name)
    _, target_key = fsspec.core.url_to_fs(os.fspath(target))
    objects = _objects(fs, source_key)
    if not objects:
        raise CheckpointNotFoundError(f"{os.fspath(source)} holds no objects")
    # Lists of paths: one server-side copy request per object, issued concurrently.
    fs.copy(
        [f"{source_key}/{relative}" for relative in objects],
        [f"{target_key}/{relative}" for relative in objects],
    )
    fs.invalidate_cache()
    copied = _objects(fs, target_key)
    if copied != objects:
        raise ConfigError(
            f"copying {os.fspath(source)} to {os.fspath(target)} did not reproduce it "
            f"({len(copied)} of {len(objects)} objects, or sizes differ); the original is "
            "untouched, the partial copy is left in the quarantine"
        )
    # Without its commit marker the original no longer reads as committed, so a crash
    # during the delete leaves nothing a manager would list.
    if _COMMIT_MARKER in objects:
        fs.rm_file(f"{source_key}/{_COMMIT_MARKER}")
    fs.rm(source_key, recursive=True)
    fs.invalidate_cache()
    return target


def _objects(fs: fsspec.AbstractFileSystem, key: str) -> dict[str, int]:
    """Every object under `key`, by path relative to it, with its size."""
    prefix = key.rstrip("/") + "/"
    found = fs.find(key, detail=True)
    return {
        path[len(prefix) :]: int(info.get("size") or 0)
        for path, info in found.items()
        if path.startswith(prefix) and info.get("type") != "directory"
    }


def _score(source: epath.Path, monitor: str | None) -> float | None:
    """The monitored value in the checkpoint's metrics, or None if it cannot be read."""
    if monitor is None:
        return None
    try:
        data = _read_small(source / _METRICS)
        value = json.loads(data).get(monitor)
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _read_small(path: epath.Path) -> bytes:
    """A small regular file's bytes. Locally a FIFO or device is refused before any read
    (opening a FIFO for reading would wait for a writer); a larger file is refused too."""
    if not is_local(path):
        data = path.read_bytes()
    else:
        data = read_regular(os.fspath(path), _MAX_METRICS_BYTES)
    if len(data) > _MAX_METRICS_BYTES:
        raise ValueError(f"{os.fspath(path)} is larger than {_MAX_METRICS_BYTES} bytes")
    return data


def _record(root: epath.Path, decision: Decision) -> None:
    # A history that is a FIFO or a link is refused by the append itself (HistoryWarning).
    with DecisionHistory(root) as writer:
        writer.append(decision)
