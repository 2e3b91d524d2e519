"""`EarlyStopping`: stop training when a monitored metric stops improving."""

from __future__ import annotations

import math
from dataclasses import dataclass

from artifex_ckpt.agreement import primary_value
from artifex_ckpt.callbacks.base import BaseCallback, Logs, TrainerLike
from artifex_ckpt.errors import ConfigError, MetricError
from artifex_ckpt.metrics import to_float
from artifex_ckpt.validation import Mode, require_int, require_mode, require_monitor

__all__ = ["EarlyStopping", "EarlyStoppingConfig"]


@dataclass(frozen=True, slots=True)
class EarlyStoppingConfig:
    """When to stop (Lightning's `EarlyStopping` semantics).

    Attributes:
        monitor: Metric to watch.
        mode: `"min"` or `"max"`.
        patience: Epochs without improvement before stopping.
        min_delta: An improvement must beat the best by more than this.
        check_finite: Stop as soon as the metric is NaN or infinite.
        stopping_threshold: Stop once the metric is better than this.
        divergence_threshold: Stop once the metric is worse than this.
    """

    monitor: str = "val_loss"
    mode: Mode = "min"
    patience: int = 10
    min_delta: float = 0.0
    check_finite: bool = True
    stopping_threshold: float | None = None
    divergence_threshold: float | None = None

    def __post_init__(self) -> None:
        require_monitor(self.monitor)
        require_mode(self.mode)
        require_int("patience", self.patience, minimum=0, accepted="an integer >= 0")
        if not isinstance(self.min_delta, int | float) or not self.min_delta >= 0:
            raise ConfigError(f"min_delta={self.min_delta!r} is not accepted; use a number >= 0")


class EarlyStopping(BaseCallback):
    """Set `trainer.stop_training` when the monitored metric stops improving.

    Example:
        ```python
        stopper = EarlyStopping(EarlyStoppingConfig(monitor="val_loss", patience=3))
        trainer.fit(callbacks=[stopper])
        print(stopper.stopped_epoch, stopper.stop_reason)
        ```
    """

    __slots__ = ("best_score", "config", "stop_reason", "stopped_epoch", "wait_count")

    def __init__(self, config: EarlyStoppingConfig) -> None:
        self.config = config
        self.best_score: float | None = None
        self.wait_count = 0
        self.stopped_epoch: int | None = None
        self.stop_reason: str | None = None

    def on_train_begin(self, trainer: TrainerLike) -> None:
        self.best_score = None
        self.wait_count = 0
        self.stopped_epoch = None
        self.stop_reason = None

    def on_epoch_end(self, trainer: TrainerLike, epoch: int, logs: Logs) -> None:
        monitor = self.config.monitor
        if monitor not in logs:
            raise MetricError(
                f"EarlyStopping: monitored metric {monitor!r} is missing; logs have: {sorted(logs)}"
            )
        # Every host must stop at the same epoch: process 0's value decides for all.
        value = primary_value(to_float(monitor, logs[monitor]), primary_host=0)
        reason = self._reason_to_stop(value)
        if reason is not None:
            self.stopped_epoch = epoch
            self.stop_reason = reason
            trainer.stop_training = True

    def _better(self, value: float, reference: float, margin: float = 0.0) -> bool:
        if self.config.mode == "min":
            return value < reference - margin
        return value > reference + margin

    def _reason_to_stop(self, value: float) -> str | None:
        config = self.config
        if config.check_finite and not math.isfinite(value):
            return f"{config.monitor} = {value} is not finite"
        if config.stopping_threshold is not None and self._better(value, config.stopping_threshold):
            return (
                f"{config.monitor} = {value} reached stopping_threshold {config.stopping_threshold}"
            )
        if config.divergence_threshold is not None and self._better(
            config.divergence_threshold, value
        ):
            return f"{config.monitor} = {value} diverged past {config.divergence_threshold}"
        if self.best_score is None or self._better(value, self.best_score, config.min_delta):
            self.best_score = value
            self.wait_count = 0
            return None
        self.wait_count += 1
        if self.wait_count >= config.patience:
            return (
                f"{config.monitor} did not improve by more than {config.min_delta} "
                f"for {self.wait_count} epochs (best {self.best_score})"
            )
        return None
