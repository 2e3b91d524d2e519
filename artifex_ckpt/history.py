"""Why a checkpoint is (or is not) in a run directory: an append-only decision history.

Every retention decision is one JSON line in `artifex_history.jsonl` beside the
checkpoints. The history explains a run; nothing ever needs it to restore, so
reading it never fails and a failed write only warns.

| kind | `name` | `score` | `details` |
|---|---|---|---|
| `evaluated` | would-be name or None | monitored value | `eligible` (bool) |
| `saved` | directory name | monitored value | `rank` (1 = best), `k`, [`threshold`, `provisional`]|
| `not_saved` | would-be name or None | monitored value | `k`, `kth` (k-th best), [`threshold`] |
| `evicted` | evicted directory | its value | `by`, `by_step`, `by_score` (the newer one) |
| `skipped_corrupt` | directory | its value or None | `by` (who restored), `error` |
| `restored` | directory | its value or None | `by`: "resume", "load best", "load latest", ... |
| `quarantined` | directory | its value or None | `to` (where it went), `reason` |

`threshold` is present only when the value did not beat the run's `initial_value_threshold`:
such a checkpoint does not compete for the top k (a saved one is kept only as the newest).

NaN and infinities are written as the strings `"nan"`, `"inf"` and `"-inf"`, so every
line is standard JSON.

On a local disk each decision is one append of one line (~15 us). Object stores such as
`gs://` have no append: there the lines are buffered in memory and the whole object,
at most `max_bytes`, is rewritten at most every `flush_interval_s` seconds and on
`flush()`/`close()`. When the history outgrows `max_bytes` it is compacted to its
newest lines, at most half of `max_bytes`, by an atomic replace.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import threading
import types
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from time import monotonic
from time import time as _now
from typing import Any, Literal, get_args

from etils import epath
from rich.table import Table
from rich.text import Text

from artifex_ckpt.directory import (
    absolute,
    forget_listing,
    is_local,
    open_regular,
    read_object,
    read_regular,
    write_atomic,
)
from artifex_ckpt.errors import CheckpointWarning, ConfigError
from artifex_ckpt.validation import require_int

__all__ = [
    "DEFAULT_MAX_BYTES",
    "HISTORY_FILE",
    "KINDS",
    "MIN_MAX_BYTES",
    "Decision",
    "DecisionHistory",
    "HistoryWarning",
    "explain",
    "format_table",
    "from_json_line",
    "involves",
    "to_json_line",
]

HISTORY_FILE = "artifex_history.jsonl"
DEFAULT_MAX_BYTES = 1 << 20
# Room for a few dozen decisions, so that compaction never keeps nothing.
MIN_MAX_BYTES = 4096
# Error texts can be whole tracebacks; one line must stay far below the compaction budget.
MAX_TEXT = 500

Kind = Literal[
    "evaluated", "saved", "not_saved", "evicted", "skipped_corrupt", "restored", "quarantined"
]
KINDS: frozenset[str] = frozenset(get_args(Kind))
# Detail keys holding scores: non-finite values are written as strings and read back.
_FLOAT_DETAILS = frozenset(("kth", "by_score", "threshold"))
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_Scalar = str | int | float | bool | None


class HistoryWarning(CheckpointWarning):
    """The decision history could not be written; training goes on without it."""


@dataclass(frozen=True, kw_only=True)
class Decision:
    """One thing that happened to a checkpoint (or to an epoch's score).

    Build one with the constructor of its kind (`Decision.saved(...)`, ...), which
    documents the details that kind carries.

    Example:
        ```python
        decision = Decision.saved(3, "model-03-0.3000", 0.3, rank=1, k=3)
        assert decision.details["rank"] == 1
        ```

    Attributes:
        time: Unix time in seconds.
        kind: One of `KINDS`.
        step: The checkpoint's (or epoch's) step.
        name: The checkpoint directory's name, or None.
        score: The monitored value (NaN and inf allowed), or None.
        details: Kind-specific values (see the module table).
    """

    time: float = field(default_factory=_now)
    kind: Kind
    step: int
    name: str | None = None
    score: float | None = None
    details: Mapping[str, _Scalar] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind={self.kind!r} is not accepted; use one of {sorted(KINDS)}")
        require_int("step", self.step, minimum=0, accepted="an integer >= 0")
        if self.name is not None and not isinstance(self.name, str):
            raise ConfigError(f"name={self.name!r} is not accepted; use a str or None")
        object.__setattr__(self, "time", _real("time", self.time))
        if not math.isfinite(self.time):
            raise ConfigError(f"time={self.time!r} is not accepted; use finite unix seconds")
        if self.score is not None:
            object.__setattr__(self, "score", _real("score", self.score))
        details: dict[str, _Scalar] = {}
        for key, value in self.details.items():
            if not isinstance(key, str) or not isinstance(value, _Scalar):
                raise ConfigError(
                    f"details[{key!r}]={value!r} is not accepted; use str keys and "
                    "str, int, float, bool or None values"
                )
            details[key] = value
        object.__setattr__(self, "details", types.MappingProxyType(details))

    @classmethod
    def evaluated(
        cls,
        step: int,
        score: float,
        *,
        eligible: bool = True,
        name: str | None = None,
        at: float | None = None,
    ) -> Decision:
        """The monitored value seen at `step`, whether or not the step could be saved."""
        return cls._make("evaluated", step, name, score, at, eligible=eligible)

    @classmethod
    def saved(
        cls,
        step: int,
        name: str,
        score: float | None,
        *,
        rank: int | None,
        k: int,
        threshold: float | None = None,
        provisional: bool = False,
        at: float | None = None,
    ) -> Decision:
        """`name` was written; `rank` among the retained (1 = best) of the top `k`. A
        `threshold` is the `initial_value_threshold` that `score` did not beat: the
        checkpoint does not compete (it is kept only as the newest), so it has no rank. A
        `provisional` one (written mid-epoch, or unscored at a run's end) is kept only while
        it is the newest."""
        extra: dict[str, Any] = {} if threshold is None else {"threshold": threshold}
        if provisional:
            extra["provisional"] = True
        return cls._make("saved", step, name, score, at, rank=rank, k=k, **extra)

    @classmethod
    def not_saved(
        cls,
        step: int,
        score: float | None,
        *,
        k: int,
        kth: float | None,
        threshold: float | None = None,
        name: str | None = None,
        at: float | None = None,
    ) -> Decision:
        """`score` would not enter the top `k`, whose k-th best is `kth`; or, with a
        `threshold`, it did not beat that `initial_value_threshold`."""
        extra = {} if threshold is None else {"threshold": threshold}
        return cls._make("not_saved", step, name, score, at, k=k, kth=kth, **extra)

    @classmethod
    def evicted(
        cls,
        step: int,
        name: str,
        score: float | None,
        *,
        by: str,
        by_step: int,
        by_score: float | None,
        at: float | None = None,
    ) -> Decision:
        """`name` was deleted by retention when checkpoint `by` arrived."""
        return cls._make(
            "evicted", step, name, score, at, by=by, by_step=by_step, by_score=by_score
        )

    @classmethod
    def skipped_corrupt(
        cls,
        step: int,
        name: str,
        *,
        by: str,
        error: str,
        score: float | None = None,
        at: float | None = None,
    ) -> Decision:
        """`name` failed to restore during `by` ("resume", "load best", ...) and was passed."""
        return cls._make("skipped_corrupt", step, name, score, at, by=by, error=_short(error))

    @classmethod
    def restored(
        cls,
        step: int,
        name: str,
        *,
        by: str,
        score: float | None = None,
        at: float | None = None,
    ) -> Decision:
        """`name` was restored by `by`: "resume", "load best", "load latest", "load step"."""
        return cls._make("restored", step, name, score, at, by=by)

    @classmethod
    def quarantined(
        cls,
        step: int,
        name: str,
        *,
        to: str,
        reason: str,
        score: float | None = None,
        at: float | None = None,
    ) -> Decision:
        """`name` was moved out of the run to `to` because of `reason`."""
        return cls._make("quarantined", step, name, score, at, to=to, reason=_short(reason))

    @classmethod
    def _make(
        cls,
        kind: Kind,
        step: int,
        name: str | None,
        score: float | None,
        at: float | None,
        **details: _Scalar,
    ) -> Decision:
        return cls(
            time=_now() if at is None else at,
            kind=kind,
            step=step,
            name=name,
            score=score,
            details=details,
        )


def to_json_line(decision: Decision) -> str:
    """`decision` as one line of standard JSON (non-finite floats as strings), with "\\n"."""
    record = {
        "time": decision.time,
        "kind": decision.kind,
        "step": decision.step,
        "name": decision.name,
        "score": _encode(decision.score),
        "details": {key: _encode(value) for key, value in decision.details.items()},
    }
    return json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"


def from_json_line(line: str | bytes) -> Decision | None:
    """The decision on `line`, or None if the line is damaged or not a decision."""
    try:
        record = json.loads(line, parse_constant=_refuse)
        if not isinstance(record, dict):
            return None
        details = record.get("details", {})
        if not isinstance(details, dict):
            return None
        decoded = {
            key: _decode(value) if key in _FLOAT_DETAILS else value
            for key, value in details.items()
        }
        return Decision(
            time=record["time"],
            kind=record["kind"],
            step=record["step"],
            name=record.get("name"),
            score=_decode(record.get("score")),
            details=decoded,
        )
    except (ValueError, TypeError, KeyError):
        return None


class DecisionHistory:
    """The decision history of the run in `directory`.

    Only the process that writes checkpoints should `append`; any process may `read`.
    Constructing one and reading create nothing. A write that fails (full disk, the
    history path is a directory, ...) warns once with `HistoryWarning` and turns
    further appends off; training is never stopped by its history.

    Example:
        ```python
        history = DecisionHistory("/tmp/run")
        history.append(Decision.saved(3, "model-03-0.3000", 0.3, rank=1, k=3))
        history.close()
        print(explain("model-03-0.3000", history.why("model-03-0.3000"), monitor="val_loss"))
        ```

    Args:
        directory: The run directory (str, os.PathLike or `etils.epath.Path`).
        max_bytes: Size cap; beyond it the history keeps its newest lines, at most
            half of the cap [1 MiB].
        flush_interval_s: On object stores (`gs://`), the longest time buffered
            decisions wait before the object is rewritten [60]. Unused locally.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | epath.Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        flush_interval_s: float = 60.0,
    ) -> None:
        require_int("max_bytes", max_bytes, minimum=MIN_MAX_BYTES, accepted=f">= {MIN_MAX_BYTES}")
        if not isinstance(flush_interval_s, int | float) or not flush_interval_s >= 0:
            raise ConfigError(
                f"flush_interval_s={flush_interval_s!r} is not accepted; use seconds >= 0"
            )
        self.path = absolute(directory) / HISTORY_FILE
        self.max_bytes = max_bytes
        self.flush_interval_s = float(flush_interval_s)
        self._local = is_local(self.path)
        self._lock = threading.Lock()
        self._size: int | None = None  # bytes in the history, once this writer has begun
        self._stored = b""  # object stores: the object's bytes as last written
        self._pending: list[bytes] = []  # object stores: lines not yet written
        self._last_flush = monotonic()
        self._failed = False

    def append(self, decision: Decision) -> None:
        """Record `decision`: one line appended locally, buffered on object stores."""
        line = to_json_line(decision).encode()
        with self._lock:
            if self._failed:
                return
            try:
                if self._local:
                    self._append_local(line)
                else:
                    self._append_remote(line)
            except Exception as err:  # object-store clients raise their own types too
                self._fail(err)

    def flush(self) -> None:
        """Write buffered decisions now (object stores); a no-op locally."""
        with self._lock:
            if self._failed or not self._pending:
                return
            try:
                self._write_remote()
            except Exception as err:
                self._fail(err)

    def close(self) -> None:
        """`flush()`; the history can still be appended to afterwards."""
        self.flush()

    def __enter__(self) -> DecisionHistory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read(self) -> list[Decision]:
        """Every readable decision, oldest first (with this writer's unflushed ones).

        Damaged or truncated lines are skipped; an absent or unreadable history is [].
        """
        try:
            data = (read_regular(self.path) if self._local else read_object(self.path)) or b""
        except Exception:  # never needed to restore: any failure to read is an empty history
            data = b""
        with self._lock:
            pending = list(self._pending)
        lines = data.split(b"\n") + [line.rstrip(b"\n") for line in pending]
        return [d for line in lines if line.strip() and (d := from_json_line(line)) is not None]

    def why(self, name: str) -> list[Decision]:
        """Every decision about the checkpoint directory `name`, including its evictions
        of others, oldest first."""
        return [d for d in self.read() if involves(d, name)]

    def _append_local(self, line: bytes) -> None:
        if self._size is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # Opened for each decision, never through a link nor waiting on a FIFO: the file may
        # have been replaced since the last one (`directory.open_regular`).
        fd = open_regular(self.path, mode="append")
        try:
            if self._size is None:
                self._size = _end_with_newline(fd)
            _write_all(fd, line)
            self._size += len(line)
            if self._size > self.max_bytes:
                kept = _newest_lines(os.pread(fd, self._size, 0), self.max_bytes // 2)
                tmp = self.path.parent / f".{HISTORY_FILE}.{os.getpid()}.tmp"
                tmp.write_bytes(kept)
                tmp.replace(self.path)
                self._size = len(kept)
        finally:
            os.close(fd)

    def _append_remote(self, line: bytes) -> None:
        if self._size is None:
            self._stored = read_object(self.path) or b""
            if self._stored and not self._stored.endswith(b"\n"):
                self._stored += b"\n"
            self._size = len(self._stored)
        self._pending.append(line)
        self._size += len(line)
        if monotonic() - self._last_flush >= self.flush_interval_s:
            self._write_remote()

    def _write_remote(self) -> None:
        content = self._stored + b"".join(self._pending)
        if len(content) > self.max_bytes:
            content = _newest_lines(content, self.max_bytes // 2)
        # One upload (one request) replaces the whole object, so readers see the old or the
        # new history; an object store needs no parent directory.
        write_atomic(self.path, content)
        # As `epath`'s own write did: Orbax's later listings through `epath` see the run anew.
        forget_listing(self.path.parent)
        self._stored, self._pending, self._size = content, [], len(content)
        self._last_flush = monotonic()

    def _fail(self, err: Exception) -> None:
        self._failed = True
        warnings.warn(
            HistoryWarning(
                f"decision history {os.fspath(self.path)} cannot be written "
                f"({type(err).__name__}: {err}); no further decisions are recorded in this run, "
                "checkpointing is unaffected"
            ),
            stacklevel=3,
        )


def involves(decision: Decision, name: str) -> bool:
    """Whether `decision` is about checkpoint `name`, or is `name` evicting another."""
    return decision.name == name or (
        decision.kind == "evicted" and decision.details.get("by") == name
    )


def format_table(
    decisions: Iterable[Decision], *, monitor: str = "score", title: str | None = None
) -> Table:
    """A rich table of `decisions` in the order given (`read()` gives oldest first).

    Columns: time, kind, step, name, `monitor`, details. Names are shown verbatim,
    never read as rich markup.

    Example:
        ```python
        from rich.console import Console
        Console().print(format_table(DecisionHistory("/tmp/run").read(), monitor="val_loss"))
        ```
    """
    table = Table(title=None if title is None else Text(title))
    for column in ("time", "kind", "step", "name", monitor, "details"):
        table.add_column(Text(column), justify="right" if column == "step" else "left")
    for decision in decisions:
        table.add_row(
            *(
                Text(cell)
                for cell in (
                    _clock(decision.time, "%m-%d %H:%M:%S"),
                    decision.kind,
                    str(decision.step),
                    decision.name or "-",
                    _number(decision.score),
                    _details(decision, monitor),
                )
            )
        )
    return table


def explain(name: str, decisions: Sequence[Decision], *, monitor: str = "score") -> str:
    """One paragraph on what happened to checkpoint `name`, from `decisions`.

    Example:
        ```python
        text = explain("model-03-0.3000", history.why("model-03-0.3000"), monitor="val_loss")
        # "model-03-0.3000 was saved at 2025-01-01 12:00:00 (step 3) with val_loss 0.3
        #  (rank 1 of 3); evicted at 2025-01-01 12:07:00 by model-07-0.2000 (val_loss 0.2)."
        ```
    """
    events = [_sentence(d, name, monitor) for d in decisions if involves(d, name)]
    if not events:
        return (
            f"{name}: no decision about it is in the history (it may predate the history, "
            "or have been compacted away)."
        )
    return f"{name} was {'; '.join(events)}."


def _sentence(decision: Decision, name: str, monitor: str) -> str:
    at = f"at {_clock(decision.time, '%Y-%m-%d %H:%M:%S')} (step {decision.step})"
    value = f"{monitor} {_number(decision.score)}"
    details = decision.details
    match decision.kind:
        case "evicted" if decision.name != name:
            # The decision's step is the evicted checkpoint's; the evictor's is `by_step`.
            when = (
                f"at {_clock(decision.time, '%Y-%m-%d %H:%M:%S')} (step {details.get('by_step')})"
            )
            return f"the evictor, {when}, of {decision.name} ({value})"
        case "evicted":
            by_value = f"{monitor} {_number(_float(details.get('by_score')))}"
            return f"evicted {at} by {details.get('by')} ({by_value})"
        case "saved":
            return f"saved {at} with {value} ({_rank(decision)})"
        case "not_saved" if "threshold" in details:
            return (
                f"not saved {at}: {value} does not beat initial_value_threshold "
                f"{_number(_float(details.get('threshold')))}"
            )
        case "not_saved":
            return (
                f"not saved {at}: {value} would not enter the top {details.get('k')} "
                f"(k-th best {_number(_float(details.get('kth')))})"
            )
        case "evaluated":
            return f"evaluated {at} with {value}"
        case "skipped_corrupt":
            return f"skipped as corrupt {at} during {details.get('by')}: {details.get('error')}"
        case "restored":
            return f"restored {at} by {details.get('by')}"
        case _:
            return f"quarantined {at} to {details.get('to')}: {details.get('reason')}"


def _details(decision: Decision, monitor: str) -> str:
    details = decision.details
    match decision.kind:
        case "saved":
            return _rank(decision)
        case "not_saved" if "threshold" in details:
            return f"does not beat initial_value_threshold {_number(_float(details['threshold']))}"
        case "not_saved":
            return f"top {details.get('k')} full; k-th best {_number(_float(details.get('kth')))}"
        case "evicted":
            by_score = _number(_float(details.get("by_score")))
            return f"by {details.get('by')} (step {details.get('by_step')}, {monitor} {by_score})"
        case "evaluated":
            return "eligible" if details.get("eligible", True) else "not eligible"
        case "skipped_corrupt":
            return f"during {details.get('by')}: {details.get('error')}"
        case "restored":
            return f"by {details.get('by')}"
        case _:
            return f"to {details.get('to')}: {details.get('reason')}"


def _rank(decision: Decision) -> str:
    details = decision.details
    rank, k = details.get("rank"), details.get("k")
    if "threshold" in details:
        return (
            f"does not beat initial_value_threshold {_number(_float(details['threshold']))}: "
            "unranked, kept as the newest"
        )
    if decision.score is None and details.get("provisional"):
        return "unscored: never the best, kept only while it is the newest"
    if decision.score is None:
        return "unscored: never the best, never evicted by rank"
    if rank is None:
        return "unranked"
    if k == -1:
        return f"rank {rank}, all kept"
    if isinstance(rank, int) and isinstance(k, int) and rank > k:
        return f"rank {rank}, outside the top {k}: kept as the newest"
    return f"rank {rank} of {k}"


def _end_with_newline(fd: int) -> int:
    """The size of the history open at `fd`, after ending it with a newline: a crash may
    have cut the last line short, and the next decision would be glued to it and lost."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        _write_all(fd, b"\n")
        size += 1
    return size


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _newest_lines(data: bytes, budget: int) -> bytes:
    """The longest tail of whole lines of `data` within `budget` bytes."""
    if len(data) <= budget:
        return data
    start = len(data) - budget
    if data[start - 1 : start] == b"\n":
        return data[start:]
    newline = data.find(b"\n", start)
    return b"" if newline == -1 else data[newline + 1 :]


def _real(field_name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{field_name}={value!r} is not accepted; use a real number")
    return float(value)


def _short(text: str) -> str:
    text = str(text)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _encode(value: _Scalar) -> _Scalar:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _decode(value: object) -> float | None:
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return None if value is None else float(value)
    raise ValueError(f"score {value!r} is not a number")


def _float(value: _Scalar) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _clock(seconds: float, fmt: str) -> str:
    try:
        return datetime.datetime.fromtimestamp(seconds).strftime(fmt)
    except (OverflowError, OSError, ValueError):
        return f"{seconds:.0f}"


def _refuse(constant: str) -> float:
    raise ValueError(f"{constant} is not standard JSON")
