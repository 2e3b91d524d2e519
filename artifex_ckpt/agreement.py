"""Hosts that never disagree: the primary host's metrics decide for every host.

In a multi-process run every process calls `save` with the metrics it computed. If they
differ even slightly (a local validation shard, a different reduction order), processes
would render different directory names or answer "keep?" differently, and then wait for
each other forever at Orbax's barriers. So before deciding anything, the metrics are sent
from the primary host to all others (one small collective per save); every decision that
depends on them is then the same everywhere. With `primary_host=None` (every host writes
its own local directory) each host decides for itself, and nothing is exchanged.

Example:
    ```python
    assert shared_metrics({"val_loss": 0.5}, primary_host=0) == {"val_loss": 0.5}
    ```
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from artifex_ckpt.errors import MetricError

__all__ = ["MAX_METRICS_BYTES", "shared_metrics"]

logger = logging.getLogger("artifex_ckpt")

# The metrics travel as JSON in a fixed-size buffer: every process must send the same shape.
MAX_METRICS_BYTES = 8192


def shared_metrics(
    metrics: Mapping[str, float] | None, *, primary_host: int | None
) -> dict[str, float] | None:
    """The primary host's `metrics`, on every process (this process's own in a one-process
    run, or when every host is primary). Logs at INFO on a host whose own values differed."""
    own = None if metrics is None else dict(metrics)
    if primary_host is None or jax.process_count() == 1:
        return own
    is_source = jax.process_index() == primary_host
    payload = np.zeros(MAX_METRICS_BYTES + 4, np.uint8)
    if is_source:
        text = json.dumps(None if own is None else {k: _jsonable(v) for k, v in own.items()})
        data = text.encode()
        if len(data) > MAX_METRICS_BYTES:
            raise MetricError(
                f"metrics take {len(data)} bytes as JSON; at most {MAX_METRICS_BYTES} can be "
                "shared between hosts: pass fewer metrics to save()"
            )
        payload[:4] = np.frombuffer(np.uint32(len(data)).tobytes(), np.uint8)
        payload[4 : 4 + len(data)] = np.frombuffer(data, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(payload, is_source=is_source))
    size = int(np.frombuffer(received[:4].tobytes(), np.uint32)[0])
    decoded = json.loads(received[4 : 4 + size].tobytes().decode())
    shared = None if decoded is None else {k: float(v) for k, v in decoded.items()}
    if shared != own and not _same(shared, own):
        logger.info(
            "process %d: metrics %s differ from the primary host's %s; the primary's decide",
            jax.process_index(),
            own,
            shared,
        )
    return shared


def _jsonable(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _same(a: Mapping[str, float] | None, b: Mapping[str, float] | None) -> bool:
    if a is None or b is None or a.keys() != b.keys():
        return a is b
    return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in ((a[k], b[k]) for k in a))
