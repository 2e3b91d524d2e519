"""`CheckpointConfig`: the settings of `ModelCheckpoint`, validated on construction.

The first eight fields are the seed's, with its defaults; the rest are Lightning's and Keras's
options, off by default.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Literal

from etils import epath

from artifex_ckpt.directory import absolute, is_local
from artifex_ckpt.errors import ConfigError
from artifex_ckpt.settings import RetentionSettings
from artifex_ckpt.validation import Mode, require_bool, require_int, require_number

__all__ = ["CheckpointConfig"]


@dataclass(slots=True)
class CheckpointConfig:
    """Configuration for `ModelCheckpoint`.

    Every field is checked when the config is built; a bad value raises
    `ConfigError` naming the field, the value and what is accepted.

    Example:
        ```python
        config = CheckpointConfig(dirpath="./checkpoints", monitor="val_loss", save_top_k=3)
        steps = CheckpointConfig(
            filename="model-{step:06d}-{loss:.4f}", monitor="loss", every_n_train_steps=500
        )
        ```

    Attributes:
        dirpath: Directory holding one sub-directory per checkpoint: a local path (`~`
            expanded) or a URL such as `gs://bucket/run`.
        filename: Template of each checkpoint's directory name. `{epoch}` is the epoch and
            `{step}` the global step; the one that numbers checkpoints (`{epoch}`, or
            `{step}` with a step or time cadence) is required. Any other placeholder is a
            metric from the logs, with an optional format spec (`{val_loss:.4f}`).
        monitor: Metric that ranks checkpoints; None keeps the newest `save_top_k`.
        mode: `"min"` if lower is better, `"max"` if higher is better.
        save_top_k: Checkpoints kept by score: `k > 0` the k best, `-1` all, `0` none.
        save_last: Also keep (and always write) the newest checkpoint, the resume point.
        every_n_epochs: Epochs `n-1, 2n-1, ...` (0-based) are eligible for saving.
        save_weights_only: Write only the model's `nnx.Param` state.
        every_n_train_steps: Save after every n-th training batch (global steps n, 2n, ...)
            instead of at epoch ends.
        train_time_interval: Save after the first batch that ends at least this long
            (seconds or a `timedelta`) after the previous save, instead of at epoch ends.
        save_on_exception: When training raises, save the state at the failing step (its
            directory name ends in `-exception`) before the error propagates.
        initial_value_threshold: A checkpoint counts for the top k only once its score is
            strictly better than this (Keras).
        verbose: Log one line per decision (saved, not saved, evicted) to the
            `artifex_ckpt` logger.
    """

    dirpath: str | os.PathLike[str] = "checkpoints"
    filename: str = "model-{epoch:02d}-{val_loss:.4f}"
    monitor: str | None = "val_loss"
    mode: Mode = "min"
    save_top_k: int = 3
    save_last: bool = True
    every_n_epochs: int = 1
    save_weights_only: bool = False
    every_n_train_steps: int | None = None
    train_time_interval: float | datetime.timedelta | None = None
    save_on_exception: bool = False
    initial_value_threshold: float | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.dirpath, str | os.PathLike) or not os.fspath(self.dirpath):
            raise ConfigError(
                f"dirpath={self.dirpath!r} is not a path; pass a non-empty str or os.PathLike"
            )
        where = absolute(self.dirpath)
        if is_local(where) and where.is_file():
            raise ConfigError(
                f"dirpath={os.fspath(self.dirpath)!r} is an existing file; "
                "pass a directory path (it is created if missing)"
            )
        for name in ("save_last", "save_weights_only", "save_on_exception", "verbose"):
            require_bool(name, getattr(self, name))
        require_int("every_n_epochs", self.every_n_epochs, minimum=1, accepted="an integer >= 1")
        if self.every_n_train_steps is not None:
            require_int(
                "every_n_train_steps",
                self.every_n_train_steps,
                minimum=1,
                accepted="None or an integer >= 1",
            )
        if self.train_time_interval is not None:
            require_number(
                "train_time_interval",
                self.interval_seconds,
                minimum=math.ulp(0.0),
                accepted="None, seconds > 0 or a positive datetime.timedelta",
            )
        cadences = [
            f"{name}={getattr(self, name)!r}"
            for name, unset in (
                ("every_n_epochs", 1),
                ("every_n_train_steps", None),
                ("train_time_interval", None),
            )
            if getattr(self, name) != unset
        ]
        if len(cadences) > 1:
            raise ConfigError(
                f"{' and '.join(cadences)} are both set; choose one cadence (as in Lightning: "
                "every_n_epochs, every_n_train_steps or train_time_interval)"
            )
        if self.filename is None:
            raise ConfigError("filename=None is not a template; pass e.g. 'model-{epoch:02d}'")
        self.retention()

    @property
    def step_unit(self) -> Literal["epoch", "step"]:
        """What numbers the checkpoints: epochs, or global steps with a step or time cadence."""
        if self.every_n_train_steps is None and self.train_time_interval is None:
            return "epoch"
        return "step"

    @property
    def interval_seconds(self) -> float | None:
        """`train_time_interval` in seconds."""
        interval = self.train_time_interval
        if isinstance(interval, datetime.timedelta):
            return interval.total_seconds()
        return interval

    @property
    def directory(self) -> epath.Path:
        """`dirpath` resolved: absolute, `~` expanded, URLs kept."""
        return absolute(self.dirpath)

    def retention(self) -> RetentionSettings:
        """The manager-level settings this config implies (validated)."""
        return RetentionSettings(
            monitor=self.monitor,
            mode=self.mode,
            save_top_k=self.save_top_k,
            keep_last=self.save_last,
            filename=self.filename,
            initial_value_threshold=self.initial_value_threshold,
            key=self.step_unit,
        )
