"""Shared checks for settings given by users, each raising a `ConfigError` that names the field,
the bad value and what would be accepted.

Used by `CheckpointConfig`, `RetentionSettings`, `EarlyStoppingConfig` and `Trainer`, so the same
mistake gets the same message everywhere.

Example:
    ```python
    from artifex_ckpt.validation import require_int

    require_int("save_top_k", 3, minimum=-1, accepted="-1 (all), 0 or k > 0")
    ```
"""

from __future__ import annotations

import math
import os
from typing import Literal

from artifex_ckpt.errors import ConfigError, StepError

__all__ = [
    "Mode",
    "require_bool",
    "require_int",
    "require_mode",
    "require_monitor",
    "require_new_step",
    "require_number",
]

Mode = Literal["min", "max"]


def require_int(field: str, value: object, *, minimum: int, accepted: str) -> None:
    """Raise unless `value` is an int (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{field}={value!r} is not accepted; use {accepted}")


def require_bool(field: str, value: object) -> None:
    """Raise unless `value` is True or False."""
    if not isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} is not a bool; pass True or False")


def require_number(field: str, value: object, *, minimum: float, accepted: str) -> None:
    """Raise unless `value` is a finite real number (not a bool) >= `minimum`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < minimum
    ):
        raise ConfigError(f"{field}={value!r} is not accepted; use {accepted}")


def require_monitor(value: object, *, optional: bool = False) -> None:
    """Raise unless `value` names a metric (or is None, when `optional`)."""
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        hint = " (or None to rank by recency)" if optional else ""
        raise ConfigError(
            f"monitor={value!r} is empty; pass a metric name such as 'val_loss'{hint}"
        )


def require_mode(value: object) -> None:
    """Raise unless `value` is "min" or "max"."""
    if value not in ("min", "max"):
        raise ConfigError(f"mode={value!r} is not accepted; use 'min' or 'max'")


def require_new_step(step: object, latest: int | None, directory: str | os.PathLike[str]) -> None:
    """Raise `StepError` unless `step` is an int >= 0 newer than `latest`, the newest step
    of `directory`."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise StepError(f"step={step!r} is not accepted; use an integer >= 0")
    if latest is not None and step <= latest:
        raise StepError(
            f"step {step} is not newer than the newest checkpoint (step {latest}) in "
            f"{os.fspath(directory)}; continue from step {latest + 1} "
            "(Trainer.fit(resume=True)) or use a new directory"
        )
