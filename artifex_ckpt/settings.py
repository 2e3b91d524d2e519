"""Retention settings, validated, and stored beside the checkpoints they govern.

A manager opened on a directory without settings adopts the stored ones, so
`setup_checkpoint_manager(dir)` finds every checkpoint of a templated run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Literal

from etils import epath

from artifex_ckpt.errors import ConfigError, SettingsMismatchError
from artifex_ckpt.naming import FilenameTemplate

__all__ = ["SETTINGS_FILE", "RetentionSettings"]

SETTINGS_FILE = "artifex_ckpt.json"


@dataclass(frozen=True)
class RetentionSettings:
    """What a `MetricCheckpointManager` ranks by, keeps, and names its directories by.

    Attributes:
        monitor: Metric that ranks checkpoints.
        mode: `"min"` or `"max"`.
        save_top_k: `k > 0` keeps the k best, `-1` all, `0` none by score.
        keep_last: Also keep the newest checkpoint.
        filename: Directory-name template, or None for Orbax's numeric step names.
    """

    monitor: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    save_top_k: int = 3
    keep_last: bool = True
    filename: str | None = None

    def __post_init__(self) -> None:
        require_monitor_and_mode(self.monitor, self.mode)
        require_int("save_top_k", self.save_top_k, minimum=-1, accepted="-1 (all), 0 or k > 0")
        if not isinstance(self.keep_last, bool):
            raise ConfigError(f"keep_last={self.keep_last!r} is not a bool; pass True or False")
        if self.filename is not None:
            FilenameTemplate(self.filename)

    @classmethod
    def resolve(cls, directory: epath.Path, **explicit: Any) -> RetentionSettings:
        """Explicit values (those not None) over the stored ones, over the defaults.

        Raises `SettingsMismatchError` if an explicit template, monitor or mode differs
        from the stored one: the stored checkpoints are named and ranked by them.
        """
        stored = cls.load(directory)
        given = {name: value for name, value in explicit.items() if value is not None}
        if stored is None:
            return cls(**given)
        if "filename" in given and given["filename"] != stored.filename:
            raise SettingsMismatchError(
                f"filename template {given['filename']!r} differs from the template "
                f"{stored.filename!r} stored in {directory / SETTINGS_FILE}; its checkpoints "
                "would not be found. Use the stored template, omit filename, or pick a new "
                "directory"
            )
        for name in ("monitor", "mode"):
            if name in given and given[name] != getattr(stored, name):
                raise SettingsMismatchError(
                    f"{name}={given[name]!r} differs from {name}={getattr(stored, name)!r} "
                    f"stored in {directory / SETTINGS_FILE}: the checkpoints there are ranked "
                    f"by it, and re-ranking could evict the best of them. Use the stored "
                    f"{name}, omit it, or pick a new directory"
                )
        return dataclasses.replace(stored, **given)

    @classmethod
    def load(cls, directory: epath.Path) -> RetentionSettings | None:
        path = directory / SETTINGS_FILE
        if not path.exists():
            return None
        try:
            stored = json.loads(path.read_text())
            fields = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in stored.items() if k in fields})
        except (ValueError, TypeError) as err:
            raise ConfigError(f"stored settings {path} cannot be read: {err}") from err

    def store(self, directory: epath.Path) -> None:
        """Write the settings atomically, so a reader never sees half a file."""
        path = directory / SETTINGS_FILE
        tmp = directory / f".{SETTINGS_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        tmp.replace(path)


def require_int(field: str, value: object, *, minimum: int, accepted: str) -> None:
    """Raise `ConfigError` unless `value` is an int (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{field}={value!r} is not accepted; use {accepted}")


def require_monitor_and_mode(monitor: object, mode: object) -> None:
    """Raise `ConfigError` unless `monitor` names a metric and `mode` is min or max."""
    if not isinstance(monitor, str) or not monitor.strip():
        raise ConfigError(f"monitor={monitor!r} is empty; pass a metric name such as 'val_loss'")
    if mode not in ("min", "max"):
        raise ConfigError(f"mode={mode!r} is not accepted; use 'min' or 'max'")
