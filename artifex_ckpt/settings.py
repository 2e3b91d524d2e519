"""Retention settings, validated, and stored beside the checkpoints they govern.

A manager opened on a directory without settings adopts the stored ones, so
`setup_checkpoint_manager(dir)` finds every checkpoint of a templated run. The stored file
carries a checksum of its content: a hand-edited or half-written file is refused rather than
adopted, since a flipped `mode` would evict the true best at the next save.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from etils import epath

from artifex_ckpt.directory import NotRegularFileError, is_local, read_object, read_regular
from artifex_ckpt.errors import ConfigError, SettingsMismatchError
from artifex_ckpt.naming import FilenameTemplate
from artifex_ckpt.validation import (
    Mode,
    require_bool,
    require_int,
    require_mode,
    require_monitor,
)

__all__ = ["SETTINGS_FILE", "RetentionSettings"]

SETTINGS_FILE = "artifex_ckpt.json"
_CHECKSUM = "checksum"
# A few hundred bytes; a larger file is not settings, and is not read whole.
_MAX_BYTES = 1 << 16
# Re-ranking by another metric or direction could evict the best of the stored checkpoints.
_FIXED = ("monitor", "mode", "key")


@dataclass(frozen=True)
class RetentionSettings:
    """What a `MetricCheckpointManager` ranks by, keeps, and names its directories by.

    Example:
        ```python
        settings = RetentionSettings(monitor="val_acc", mode="max", save_top_k=1)
        assert settings.keep_last
        ```

    Attributes:
        monitor: Metric that ranks checkpoints; None keeps the newest `save_top_k`.
        mode: `"min"` or `"max"`.
        save_top_k: `k > 0` keeps the k best, `-1` all, `0` none by score.
        keep_last: Also keep the newest checkpoint.
        filename: Directory-name template, or None for Orbax's numeric step names.
        initial_value_threshold: A checkpoint counts for the top k only once its score beats
            this (Keras's option); None: no threshold.
        key: The template placeholder that numbers checkpoints (the manager's step):
            `"epoch"`, or `"step"` (the global step) for step and time cadences.
    """

    monitor: str | None = "val_loss"
    mode: Mode = "min"
    save_top_k: int = 3
    keep_last: bool = True
    filename: str | None = None
    initial_value_threshold: float | None = None
    key: Literal["epoch", "step"] = "epoch"

    def __post_init__(self) -> None:
        require_monitor(self.monitor, optional=True)
        require_mode(self.mode)
        require_int("save_top_k", self.save_top_k, minimum=-1, accepted="-1 (all), 0 or k > 0")
        require_bool("keep_last", self.keep_last)
        threshold = self.initial_value_threshold
        if threshold is not None and (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or math.isnan(threshold)
        ):
            raise ConfigError(
                f"initial_value_threshold={threshold!r} is not accepted; use a number or None"
            )
        if threshold is not None and self.monitor is None:
            raise ConfigError(
                f"initial_value_threshold={threshold!r} needs a monitor; monitor is None"
            )
        if self.key not in ("epoch", "step"):
            raise ConfigError(f"key={self.key!r} is not accepted; use 'epoch' or 'step'")
        if self.filename is not None:
            FilenameTemplate(self.filename, key=self.key)

    def resolve(self, **explicit: Any) -> RetentionSettings:
        """These stored settings with the explicit values (those not None) put over them.

        Raises `SettingsMismatchError` if an explicit template, monitor or mode differs
        from the stored one: the stored checkpoints are named and ranked by them.
        """
        given = {name: value for name, value in explicit.items() if value is not None}
        if "filename" in given and given["filename"] != self.filename:
            raise SettingsMismatchError(
                f"filename template {given['filename']!r} differs from the template "
                f"{self.filename!r} stored in {SETTINGS_FILE}; its checkpoints would not be "
                "found. Use the stored template, omit filename, or pick a new directory"
            )
        for name in _FIXED:
            if name in given and given[name] != getattr(self, name):
                raise SettingsMismatchError(
                    f"{name}={given[name]!r} differs from {name}={getattr(self, name)!r} "
                    f"stored in {SETTINGS_FILE}: the checkpoints there are ranked by it, and "
                    f"re-ranking could evict the best of them. Use the stored {name}, omit "
                    "it, or pick a new directory"
                )
        return dataclasses.replace(self, **given)

    @classmethod
    def load(cls, directory: epath.Path) -> RetentionSettings | None:
        """The settings stored in `directory`, or None if there are none.

        Raises `ConfigError` naming the file when it is not a regular file, does not parse,
        or does not match its checksum.
        """
        path = directory / SETTINGS_FILE
        try:
            # Locally never through a link nor waiting on a FIFO; on an object store one
            # request, where exists, is_file and read through `epath` cost about nine.
            data = read_regular(path, _MAX_BYTES) if is_local(path) else read_object(path)
            if data is None:
                return None
            if len(data) > _MAX_BYTES:
                raise ValueError(f"larger than {_MAX_BYTES} bytes")
            stored = json.loads(data)
        except (FileNotFoundError, NotADirectoryError):
            return None  # a directory that is a file is refused where it is opened
        except NotRegularFileError as err:
            raise ConfigError(f"stored settings {path} {err.strerror}; move it away") from err
        except (OSError, ValueError) as err:
            raise ConfigError(f"stored settings {path} cannot be read: {err}") from err
        if not isinstance(stored, dict):
            raise ConfigError(
                f"stored settings {path} hold {type(stored).__name__} {stored!r}, not an object"
            )
        checksum = stored.pop(_CHECKSUM, None)
        if checksum is not None and checksum != _checksum(stored):
            raise ConfigError(
                f"stored settings {path} do not match their checksum: the file was edited or "
                "half written. Restore it, or delete it and pass every setting explicitly"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in stored.items() if k in known})
        except (ConfigError, TypeError) as err:
            raise ConfigError(f"stored settings {path} are not valid: {err}") from err

    def to_json(self) -> str:
        """The stored form: the fields and a checksum of them."""
        fields = dataclasses.asdict(self)
        return json.dumps({**fields, _CHECKSUM: _checksum(fields)}, indent=2) + "\n"


def _checksum(fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
