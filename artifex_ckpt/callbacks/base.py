"""`BaseCallback`, `CallbackList`, the `TrainerLike` protocol they are called with, and the
`Resumable` protocol of a callback that can put a trainer back where a checkpoint left it."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

from etils import epath
from flax import nnx

__all__ = [
    "BaseCallback",
    "CallbackList",
    "Resumable",
    "ResumeFrom",
    "ResumePoint",
    "TrainerLike",
]

Logs = Mapping[str, Any]
# What `Trainer.fit(resume=...)` accepts: the newest, the best, a step, or a checkpoint's path.
ResumeFrom = Literal["latest", "best"] | int | str | os.PathLike[str]


@runtime_checkable
class TrainerLike(Protocol):
    """What a callback may rely on: the training loop's state, readable at every hook.

    `optimizer` is None when the loop has none; `step` is the global step (batches trained),
    `epoch` the current 0-based epoch, `initial_epoch` the first epoch of this `fit`,
    `epochs` the total (None if unbounded), `num_batches` per epoch (None if unknown),
    `batches_done` the batches of the current epoch trained so far, and `data_iterator`
    the training data when it is one stream whose position can be checkpointed (else None).
    Callbacks may set `stop_training`.
    """

    stop_training: bool

    @property
    def model(self) -> nnx.Module: ...
    @property
    def optimizer(self) -> nnx.Optimizer | None: ...
    @property
    def step(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def initial_epoch(self) -> int: ...
    @property
    def epochs(self) -> int | None: ...
    @property
    def num_batches(self) -> int | None: ...
    @property
    def batches_done(self) -> int: ...
    @property
    def epoch_totals(self) -> Mapping[str, Any]: ...
    @property
    def data_iterator(self) -> Iterator[Any] | None: ...


class ResumePoint(NamedTuple):
    """Where a restored checkpoint left training: its step and path, its epoch and the
    global step. `batches_done` is None when the epoch was complete, else the batches of
    that epoch already trained (a checkpoint written mid-epoch), and `epoch_totals` the
    running sums of its step metrics."""

    step: int
    path: epath.Path
    epoch: int
    global_step: int
    batches_done: int | None = None
    epoch_totals: Mapping[str, Any] = {}


@runtime_checkable
class Resumable(Protocol):
    """A callback that can restore a trainer's model and optimizer from a checkpoint."""

    def resume(self, trainer: TrainerLike, source: ResumeFrom = "latest") -> ResumePoint:
        """Restore `trainer` from `source` and say where training stands."""
        ...


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
