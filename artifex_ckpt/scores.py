"""Reading a checkpoint's stored score so that a damaged or missing metrics file never gets the
checkpoint evicted.

Orbax keeps each step's metrics in `<step>/metrics/metrics` (JSON). When that file cannot be
read, is malformed, or is gone although the checkpoint was saved with metrics, the score is
recovered from the directory name when the template holds the monitor (`model-03-0.1234`).
Otherwise the checkpoint is *unscored*, which retention never evicts. Either way a
`CorruptCheckpointWarning` names the checkpoint, once. A checkpoint saved without metrics
is unscored quietly.

Example:
    ```python
    assert malformed({"val_loss": "x"}, "val_loss") == "hold val_loss='x', not a number"
    assert malformed({"val_loss": "nan"}, "val_loss") is None
    ```
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from typing import Any

from etils import epath

from artifex_ckpt.directory import is_local, read_object
from artifex_ckpt.errors import CorruptCheckpointWarning
from artifex_ckpt.listing import irregular
from artifex_ckpt.manifest import DamagedManifestError, read_manifest
from artifex_ckpt.plan import ManagerPlan

__all__ = ["METRICS_FILE", "StoredScores", "malformed"]

# Where Orbax stores a step's metrics, relative to its directory.
METRICS_FILE = "metrics/metrics"
_READ_ERRORS = (ValueError, TypeError, OSError)


class StoredScores:
    """The metrics of a manager's checkpoints, read through Orbax, recovered when damaged."""

    def __init__(self, plan: ManagerPlan) -> None:
        self._plan = plan
        self._warned: set[int] = set()
        # Text, not path objects: Orbax asks for every step when a directory opens (B5).
        self._root = os.fspath(plan.directory)

    def read(self, step: int, orbax_metrics: Callable[[int], Any]) -> Any:
        """The metrics of `step`; `orbax_metrics` is Orbax's own reader."""
        name = self._plan.step_name(step)
        problem = irregular(os.path.join(self._root, name, METRICS_FILE))
        if problem is not None:
            return self._from_name(step, f"cannot be read ({METRICS_FILE} {problem})")
        try:
            found = orbax_metrics(step)
        except _READ_ERRORS as err:
            return self._from_name(step, f"cannot be read ({err})")
        if found is None:
            unscored = not _had(self._plan.directory / name)
            return self._from_name(step, "are missing", quiet_if_unscored=unscored)
        problem = malformed(found, self._plan.settings.monitor)
        if problem is not None:
            return self._from_name(step, problem)
        return found

    def readable(
        self, step_dir: epath.Path, step: int, orbax_metrics: Callable[[int], Any]
    ) -> str | None:
        """Why the metrics of `step` cannot be read, or None."""
        if not is_local(step_dir):
            # One download, where Orbax's reader asks whether the file exists first (B7).
            try:
                data = read_object(step_dir / METRICS_FILE)
                if data is not None:
                    json.loads(data)
            except _READ_ERRORS as err:
                return f"{METRICS_FILE} cannot be read ({err})"
            return None
        problem = irregular(step_dir / METRICS_FILE)
        if problem is not None:
            return f"{METRICS_FILE} {problem}"
        try:
            orbax_metrics(step)
        except _READ_ERRORS as err:
            return f"{METRICS_FILE} cannot be read ({err})"
        return None

    def _from_name(
        self, step: int, problem: str, *, quiet_if_unscored: bool = False
    ) -> dict[str, float] | None:
        plan = self._plan
        monitor = plan.settings.monitor
        name = plan.step_name(step)
        parsed = plan.name_format.template.parse(name) if plan.name_format else None
        recovered = (
            {monitor: parsed[monitor]}
            if parsed is not None and monitor is not None and monitor in parsed
            else None
        )
        if recovered is None and quiet_if_unscored:
            return None
        if step not in self._warned:
            self._warned.add(step)
            outcome = (
                f"its {monitor} ({next(iter(recovered.values()))}) is read from its name"
                if recovered
                else "it is treated as unscored and kept"
            )
            warnings.warn(
                CorruptCheckpointWarning(
                    f"metrics of checkpoint {plan.directory / name} {problem}; {outcome}"
                ),
                stacklevel=4,
            )
        return recovered


def malformed(found: object, monitor: str | None) -> str | None:
    """What is wrong with stored metrics that parsed as JSON, or None."""
    if not isinstance(found, dict):
        return f"hold {type(found).__name__} {found!r:.60}, not an object"
    if monitor is None or monitor not in found:
        return None
    value = found[monitor]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number or value in ("nan", "inf", "-inf"):
        return None
    return f"hold {monitor}={value!r:.60}, not a number"


def _had(step_dir: epath.Path) -> bool:
    """Whether `step_dir` was saved with metrics: its metrics item or its manifest says so."""
    if (step_dir / "metrics").exists():
        return True
    try:
        manifest = read_manifest(step_dir)
    except (DamagedManifestError, OSError):
        return False
    return manifest is not None and any(e.path == METRICS_FILE for e in manifest.entries)
