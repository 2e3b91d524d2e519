"""`BaseCallback`, `CallbackList` and the `TrainerLike` protocol they are called with."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

from flax import nnx

__all__ = ["BaseCallback", "CallbackList", "TrainerLike"]

Logs = Mapping[str, Any]


@runtime_checkable
class TrainerLike(Protocol):
    """What a callback may rely on. `Trainer` also has `optimizer`, `step`, `epoch`,
    `initial_epoch`, `num_batches` and a writable `stop_training`; callbacks read
    those with `getattr(trainer, name, default)`."""

    model: nnx.Module


class BaseCallback:
    """Callback with no-op hooks; override the ones you need. Epochs are 0-based.

    Example:
        ```python
        class PrintLoss(BaseCallback):
            def on_epoch_end(self, trainer, epoch, logs):
                print(epoch, float(logs["loss"]))
        ```
    """

    __slots__ = ()

    def on_train_begin(self, trainer: TrainerLike) -> None:
        """Called once before the first epoch."""

    def on_train_end(self, trainer: TrainerLike) -> None:
        """Called once after the last epoch (also after an early stop)."""

    def on_exception(self, trainer: TrainerLike, error: BaseException) -> None:
        """Called instead of `on_train_end` when the training loop raises."""

    def on_epoch_begin(self, trainer: TrainerLike, epoch: int) -> None:
        """Called at the start of each epoch."""

    def on_epoch_end(self, trainer: TrainerLike, epoch: int, logs: Logs) -> None:
        """Called after validation, with the epoch's training and `val_` metrics."""

    def on_batch_begin(self, trainer: TrainerLike, batch: int) -> None:
        """Called before each training batch (0-based within the epoch)."""

    def on_batch_end(self, trainer: TrainerLike, batch: int, logs: Logs) -> None:
        """Called after each training batch with that batch's metrics."""

    def on_validation_begin(self, trainer: TrainerLike) -> None:
        """Called before the validation loop."""

    def on_validation_end(self, trainer: TrainerLike, logs: Logs) -> None:
        """Called after the validation loop with the `val_` metrics."""


class CallbackList(BaseCallback):
    """Calls each hook on every callback, in the order they were added.

    Example:
        ```python
        callbacks = CallbackList([BaseCallback()])
        callbacks.add(BaseCallback())
        assert len(callbacks) == 2
        ```
    """

    __slots__ = ("callbacks",)

    def __init__(self, callbacks: Iterable[BaseCallback] | None = None) -> None:
        self.callbacks: list[BaseCallback] = list(callbacks or [])

    def add(self, callback: BaseCallback) -> None:
        self.callbacks.append(callback)

    def remove(self, callback: BaseCallback) -> None:
        self.callbacks.remove(callback)

    def __len__(self) -> int:
        return len(self.callbacks)

    def __iter__(self) -> Iterator[BaseCallback]:
        return iter(self.callbacks)

    def on_train_begin(self, trainer: TrainerLike) -> None:
        for callback in self.callbacks:
            callback.on_train_begin(trainer)

    def on_train_end(self, trainer: TrainerLike) -> None:
        for callback in self.callbacks:
            callback.on_train_end(trainer)

    def on_exception(self, trainer: TrainerLike, error: BaseException) -> None:
        for callback in self.callbacks:
            callback.on_exception(trainer, error)

    def on_epoch_begin(self, trainer: TrainerLike, epoch: int) -> None:
        for callback in self.callbacks:
            callback.on_epoch_begin(trainer, epoch)

    def on_epoch_end(self, trainer: TrainerLike, epoch: int, logs: Logs) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(trainer, epoch, logs)

    def on_batch_begin(self, trainer: TrainerLike, batch: int) -> None:
        for callback in self.callbacks:
            callback.on_batch_begin(trainer, batch)

    def on_batch_end(self, trainer: TrainerLike, batch: int, logs: Logs) -> None:
        for callback in self.callbacks:
            callback.on_batch_end(trainer, batch, logs)

    def on_validation_begin(self, trainer: TrainerLike) -> None:
        for callback in self.callbacks:
            callback.on_validation_begin(trainer)

    def on_validation_end(self, trainer: TrainerLike, logs: Logs) -> None:
        for callback in self.callbacks:
            callback.on_validation_end(trainer, logs)
