"""Hosts that never disagree: the primary host's values decide for every host.

In a multi-process run every process calls `save` with the metrics it computed. If they
differ even slightly (a local validation shard, a different reduction order), processes
would render different directory names or answer "keep?" differently, and then wait for
each other forever at Orbax's barriers. So before deciding anything, the metrics are sent
from the primary host to all others (one small collective per save); every decision that
depends on them is then the same everywhere. Other per-host inputs to a decision (a clock
reading, an early-stopping verdict) are shared the same way with `primary_value`.

With `primary_host=None` (every host writes its own local directory), or when this process
is the only one taking part (`processes={jax.process_index()}`, Orbax's
`active_processes`), each host decides for itself and nothing is exchanged.

Example:
    ```python
    assert shared_metrics({"val_loss": 0.5}, primary_host=0) == {"val_loss": 0.5}
    assert primary_value(True, primary_host=0) is True
    ```
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Set
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from artifex_ckpt.errors import ConfigError, MetricError

__all__ = ["MAX_METRICS_BYTES", "primary_value", "shared_metrics"]

logger = logging.getLogger("artifex_ckpt")

# Values travel as JSON in a fixed-size buffer: every process must send the same shape.
MAX_METRICS_BYTES = 8192

# The length field's value that says "the source's value was too large": every process
# raises, rather than the source alone while the others wait in the collective.
_TOO_LARGE = 0xFFFFFFFF

T = TypeVar("T", bound=bool | int | float | str | None)


def shared_metrics(
    metrics: Mapping[str, float] | None,
    *,
    primary_host: int | None,
    processes: Set[int] | None = None,
) -> dict[str, float] | None:
    """The primary host's `metrics`, on every process (this process's own in a one-process
    run, when every host is primary, or when only this process takes part). Logs at INFO on
    a host whose own values differed.

    Every process taking part must call it, in the same order as its other collectives.
    Raises `MetricError` if the metrics take more than `MAX_METRICS_BYTES` as JSON, and
    `ConfigError` for `processes` that are some but not all of several processes.
    """
    own = None if metrics is None else dict(metrics)
    if _alone(primary_host, processes):
        return own
    is_source = jax.process_index() == primary_host
    text = json.dumps(None if own is None else {k: _jsonable(v) for k, v in own.items()})
    decoded = json.loads(_broadcast(text if is_source else "", is_source=is_source, what="metrics"))
    shared = None if decoded is None else {k: float(v) for k, v in decoded.items()}
    if not _same(shared, own):
        logger.info(
            "process %d: metrics %s differ from the primary host's %s; the primary's decide",
            jax.process_index(),
            own,
            shared,
        )
    return shared


def primary_value(
    value: T, *, primary_host: int | None = 0, processes: Set[int] | None = None
) -> T:
    """The primary host's `value` (a bool, number, string or None), on every process.

    For a decision that depends on something each host sees differently: whether a save
    interval has passed by the host's clock, whether early stopping should stop. Every
    process taking part must call it at the same point.

    Example:
        ```python
        import time

        last_save, interval_s = time.monotonic(), 60.0
        due = primary_value(time.monotonic() - last_save >= interval_s, primary_host=0)
        assert due is False
        ```
    """
    if _alone(primary_host, processes):
        return value
    is_source = jax.process_index() == primary_host
    text = json.dumps(value) if is_source else ""
    shared: T = json.loads(_broadcast(text, is_source=is_source, what="value"))
    return shared


def _alone(primary_host: int | None, processes: Set[int] | None) -> bool:
    """Whether this process decides by itself (nothing to exchange)."""
    if primary_host is None or jax.process_count() == 1:
        return True
    if processes is None:
        return False
    everyone = set(range(jax.process_count()))
    if set(processes) >= everyone:
        return False
    if set(processes) == {jax.process_index()}:
        return True
    raise ConfigError(
        f"active_processes={sorted(processes)} with primary_host={primary_host} is not "
        f"supported: the primary host's metrics are shared with all {len(everyone)} "
        "processes, so every process must save; use active_processes=None, or "
        "primary_host=None with active_processes={jax.process_index()} (each host its own "
        "directory)"
    )


def _broadcast(text: str, *, is_source: bool, what: str) -> str:
    payload = np.zeros(MAX_METRICS_BYTES + 4, np.uint8)
    data = text.encode()
    if is_source:
        size = len(data) if len(data) <= MAX_METRICS_BYTES else _TOO_LARGE
        payload[:4] = np.frombuffer(np.uint32(size).tobytes(), np.uint8)
        if size != _TOO_LARGE:
            payload[4 : 4 + size] = np.frombuffer(data, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(payload, is_source=is_source))
    size = int(np.frombuffer(received[:4].tobytes(), np.uint32)[0])
    if size == _TOO_LARGE:
        shown = f"{len(data)} bytes" if is_source else "more bytes"
        raise MetricError(
            f"the primary host's {what} take {shown} as JSON; at most {MAX_METRICS_BYTES} "
            "can be shared between hosts: pass fewer metrics to save()"
        )
    return received[4 : 4 + size].tobytes().decode()


def _jsonable(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _same(a: Mapping[str, float] | None, b: Mapping[str, float] | None) -> bool:
    if a is None or b is None or a.keys() != b.keys():
        return a is b
    return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in ((a[k], b[k]) for k in a))
