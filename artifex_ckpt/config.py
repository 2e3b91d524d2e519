"""`CheckpointConfig`: the eight settings of `ModelCheckpoint`, validated on construction."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from artifex_ckpt.errors import ConfigError
from artifex_ckpt.settings import RetentionSettings
from artifex_ckpt.validation import Mode, require_bool, require_int

__all__ = ["CheckpointConfig"]


@dataclass(slots=True)
class CheckpointConfig:
    """Configuration for `ModelCheckpoint`.

    Every field is checked when the config is built; a bad value raises
    `ConfigError` naming the field, the value and what is accepted.

    Example:
        ```python
        config = CheckpointConfig(dirpath="./checkpoints", monitor="val_loss", save_top_k=3)
        ```

    Attributes:
        dirpath: Directory holding one sub-directory per checkpoint.
        filename: Template of each checkpoint's directory name. `{epoch}` is required;
            `{step}` is the global step; any other placeholder is a metric from the
            epoch's logs, with an optional format spec (`{val_loss:.4f}`).
        monitor: Metric that ranks checkpoints.
        mode: `"min"` if lower is better, `"max"` if higher is better.
        save_top_k: Checkpoints kept by score: `k > 0` the k best, `-1` all, `0` none.
        save_last: Also keep (and always write) the newest checkpoint, the resume point.
        every_n_epochs: Epochs `n-1, 2n-1, ...` (0-based) are eligible for saving.
        save_weights_only: Write only the model's `nnx.Param` state.
    """

    dirpath: str | os.PathLike[str] = "checkpoints"
    filename: str = "model-{epoch:02d}-{val_loss:.4f}"
    monitor: str = "val_loss"
    mode: Mode = "min"
    save_top_k: int = 3
    save_last: bool = True
    every_n_epochs: int = 1
    save_weights_only: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.dirpath, str | os.PathLike) or not os.fspath(self.dirpath):
            raise ConfigError(
                f"dirpath={self.dirpath!r} is not a path; pass a non-empty str or os.PathLike"
            )
        if Path(os.fspath(self.dirpath)).is_file():
            raise ConfigError(
                f"dirpath={os.fspath(self.dirpath)!r} is an existing file; "
                "pass a directory path (it is created if missing)"
            )
        require_bool("save_last", self.save_last)
        require_bool("save_weights_only", self.save_weights_only)
        require_int("every_n_epochs", self.every_n_epochs, minimum=1, accepted="an integer >= 1")
        if self.filename is None:
            raise ConfigError("filename=None is not a template; pass e.g. 'model-{epoch:02d}'")
        self.retention()

    def retention(self) -> RetentionSettings:
        """The manager-level settings this config implies (validated)."""
        return RetentionSettings(
            monitor=self.monitor,
            mode=self.mode,
            save_top_k=self.save_top_k,
            keep_last=self.save_last,
            filename=self.filename,
        )
