"""Who holds a checkpoint directory's lease, and whether that owner may still be writing.

An `OwnerInfo` is the content of the lease file `artifex_owner.json`:

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

An owner is gone, and its lease stale (`OwnerInfo.stale_reason`), when

- it wrote the lease on this machine (same host name and `pid_scope`) and its process is
  gone: no such pid, a zombie, or a pid whose start time differs; or
- its `refreshed` time is older than `stale_after_s` (any host: the only sign of life a
  process on another machine gives). Clocks of different hosts must agree to well within
  `stale_after_s` (NTP does).

Example:
    ```python
    import os

    me = new_owner()
    assert me.pid == os.getpid() and me.on_this_machine() and me.stale_reason() is None
    assert OwnerInfo.from_json(me.to_json().encode(), epath.Path("/tmp/run")) == me
    ```
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from etils import epath

from artifex_ckpt.errors import CheckpointError

__all__ = [
    "STALE_AFTER_S",
    "OwnerInfo",
    "OwnershipError",
    "ago",
    "damaged",
    "new_owner",
    "process_start",
    "when",
]

STALE_AFTER_S = 300.0
_COMMAND_CHARS = 200


class OwnershipError(CheckpointError, RuntimeError):
    """Another run (or another manager in this process) writes this directory, or its
    lease file is damaged. `owner` is the owner found, when there is one."""

    def __init__(self, message: str, owner: OwnerInfo | None = None) -> None:
        super().__init__(message)
        self.owner = owner


@dataclass(frozen=True)
class OwnerInfo:
    """Who holds a lease, as stored in its file.

    Example:
        ```python
        from artifex_ckpt.ownership import acquire, read_owner

        with acquire("/tmp/run"):
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
            f"since {when(self.created)}, last refresh {when(self.refreshed)} "
            f"({ago(now - self.refreshed)})"
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
            raise damaged(path, problem) from err
        if not isinstance(raw, dict):
            raise damaged(path, f"holds {type(raw).__name__} {_short(raw)}, not an object")
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
                raise damaged(path, f"lacks the field {name!r}")
            value = raw[name]
            if isinstance(value, bool) or not isinstance(value, types):
                accepted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise damaged(path, f"has {name}={_short(value)}; expected {accepted}")
        if raw["pid"] < 1:
            raise damaged(path, f"has pid={raw['pid']}; expected an int >= 1")
        for name in ("host", "token"):
            if not raw[name]:
                raise damaged(path, f"has {name}=''; expected a non-empty str")
        for name in ("created", "refreshed"):
            if not math.isfinite(raw[name]):
                raise damaged(path, f"has {name}={raw[name]}; expected a finite number")
        return cls(**{name: raw[name] for name in fields})


def new_owner() -> OwnerInfo:
    """This process as the owner of a new lease: a fresh token, refreshed now.

    Example:
        ```python
        first, second = new_owner(), new_owner()
        assert first.pid == second.pid and first.token != second.token
        ```
    """
    now = time.time()
    command = " ".join(sys.argv)
    if len(command) > _COMMAND_CHARS:
        command = command[: _COMMAND_CHARS - 3] + "..."
    return OwnerInfo(
        host=_HOST,
        pid=os.getpid(),
        process_start=process_start(os.getpid()),
        pid_scope=_PID_SCOPE,
        token=uuid.uuid4().hex,
        created=now,
        refreshed=now,
        command=command,
    )


def process_start(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (Linux /proc), None if unknown."""
    found = _proc_stat(pid)
    return None if found is None else found[1]


def damaged(path: epath.Path, problem: str) -> OwnershipError:
    """The error for a lease file at `path` that is not a lease: `problem` says why."""
    return OwnershipError(
        f"lease file {path} {problem}. It records which run writes this directory, so it "
        f"is not overwritten blindly; if no other run writes to {path.parent}, delete {path} "
        "and open the directory again"
    )


def when(t: float) -> str:
    """Unix time `t` as an ISO 8601 UTC time to the second."""
    return datetime.datetime.fromtimestamp(t, tz=datetime.UTC).isoformat(timespec="seconds")


def ago(seconds: float) -> str:
    """An age in words: `12 s ago`, or `3 s in the future` for a clock that runs ahead."""
    return f"{seconds:.0f} s ago" if seconds >= 0 else f"{-seconds:.0f} s in the future"


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


def _pid_scope() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        return f"{boot}|{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_HOST = socket.gethostname()
# Fixed for the life of the process (a fork stays in its parent's namespace).
_PID_SCOPE = _pid_scope()
