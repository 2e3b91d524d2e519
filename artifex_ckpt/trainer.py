"""`Trainer`: a small, real training loop for flax nnx models and optax, driving callbacks."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
from flax import nnx

from artifex_ckpt.callbacks.base import BaseCallback, CallbackList, Resumable, ResumeFrom
from artifex_ckpt.data_state import is_grain_source, skip_batches
from artifex_ckpt.errors import ConfigError
from artifex_ckpt.preemption import PreemptionGuard, TrainingPreempted
from artifex_ckpt.validation import require_bool, require_int

__all__ = ["LossFn", "Trainer"]

logger = logging.getLogger("artifex_ckpt")

# loss_fn(model, batch) -> loss, or (loss, {"name": metric, ...})
LossFn = Callable[[Any, Any], jax.Array | tuple[jax.Array, Mapping[str, jax.Array]]]
Batches = Iterable[Any] | Callable[[int], Iterable[Any]]


class Trainer:
    """Train `model` with `optimizer` on `loss_fn`, calling callbacks at each hook.

    Epoch logs hold `loss` and the aux metrics averaged over the epoch, and the
    validation averages as `val_loss`, `val_<name>`. Values stay JAX arrays until a
    callback reads them, so epochs nobody inspects cost no device sync.

    Training data comes in one of three forms:

    - a `Sequence` of batches, re-iterated each epoch;
    - an `epoch -> batches` callable;
    - an iterator (a grain `DatasetIterator` or `DataLoader` iterator, or any other), one
      stream for the whole run: each epoch takes `steps_per_epoch` batches from it (all that
      is left, if None). A `grain.DataLoader` or `grain.IterDataset` is iterated once and
      is such a stream too. A grain iterator's position is checkpointed with the model; any
      other iterator starts over when a run resumes in a new process.

    During `fit`, the first SIGTERM (and the first SIGINT with `catch_sigint=True`) lets
    the current step finish, has the callbacks save it, and raises `TrainingPreempted`.
    A signal that arrives during validation stops the run at that epoch's end. The handler
    is installed when `fit` starts and removed when it returns or raises.

    `epoch_totals` holds the sums of the step metrics over the epoch so far (its
    `batches_done` batches). A checkpoint taken mid-epoch stores them, so that a resumed
    epoch's averages cover all its batches.

    Example:
        ```python
        trainer = Trainer(model, optimizer, loss_fn, train_batches, val_batches, epochs=5)
        trainer.fit(callbacks=[ModelCheckpoint(CheckpointConfig(dirpath="ckpts"))])
        ```

    Args:
        model: An `nnx.Module`.
        optimizer: An `nnx.Optimizer` over the model's `nnx.Param`s.
        loss_fn: `loss_fn(model, batch) -> loss` or `(loss, aux_metrics)`.
        train_data: Batches, re-iterated each epoch, `epoch -> batches`, or an iterator.
        val_data: Validation batches (a sequence or `epoch -> batches`), or None.
        epochs: Number of epochs in total (a resumed run continues up to it).
        steps_per_epoch: Batches per epoch drawn from an iterator (None: until exhausted).
        catch_sigint: Treat the first Ctrl-C like SIGTERM (save, then stop).
    """

    def __init__(
        self,
        model: nnx.Module,
        optimizer: nnx.Optimizer,
        loss_fn: LossFn,
        train_data: Batches,
        val_data: Batches | None = None,
        *,
        epochs: int = 10,
        steps_per_epoch: int | None = None,
        catch_sigint: bool = False,
    ) -> None:
        require_int("epochs", epochs, minimum=1, accepted="an integer >= 1")
        if steps_per_epoch is not None:
            require_int("steps_per_epoch", steps_per_epoch, minimum=1, accepted="None or >= 1")
        require_bool("catch_sigint", catch_sigint)
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.train_data = train_data
        self.val_data = val_data
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.catch_sigint = catch_sigint
        self.step = 0
        self.epoch = -1
        self.initial_epoch = 0
        self.batches_done = 0
        self.epoch_totals: dict[str, jax.Array] = {}
        self.stop_training = False
        self._skip = 0
        self._stream: Iterator[Any] | None = None
        self._train_step = nnx.jit(_make_train_step(loss_fn))
        self._eval_step = nnx.jit(_make_eval_step(loss_fn))

    @property
    def num_batches(self) -> int | None:
        """Training batches per epoch, when known."""
        data = self.train_data
        return len(data) if isinstance(data, Sequence) else self.steps_per_epoch

    @property
    def data_iterator(self) -> Iterator[Any] | None:
        """The training data when it is one stream (an iterator) whose position a callback
        may checkpoint; None for re-iterable data. A grain `DataLoader` or `IterDataset` is
        iterated on first use, and that iterator is the stream from then on."""
        data = self.train_data
        if isinstance(data, Iterator):
            return data
        if self._stream is None and is_grain_source(data):
            self._stream = iter(cast(Iterable[Any], data))
        return self._stream

    def fit(
        self,
        callbacks: Sequence[BaseCallback] | CallbackList | None = None,
        *,
        resume: bool | ResumeFrom = False,
    ) -> Trainer:
        """Run epochs `initial_epoch .. epochs-1`.

        `resume=True` (or `"latest"`) continues from the newest checkpoint of the run's
        `ModelCheckpoint`, `"best"` from its best, an int from that step, and a path from
        that checkpoint directory (another run's too: fine-tuning). Model, optimizer, epoch,
        global step and the data position are restored; a checkpoint saved mid-epoch
        continues with the next batch of that epoch.

        Whatever raises (resuming, a hook, a step) reaches every callback's `on_exception`
        first; an error raised there is added to the original as a note, never replacing it.
        """
        hooks = callbacks if isinstance(callbacks, CallbackList) else CallbackList(callbacks)
        self.stop_training = False
        source: ResumeFrom | None = (
            "latest" if resume is True else None if resume is False else resume
        )
        self._skip = 0
        # Installed before resuming (which can take long), so an early SIGTERM stops the
        # run after its first step instead of killing the process.
        with PreemptionGuard(sigint=self.catch_sigint) as guard:
            try:
                self.initial_epoch = 0 if source is None else self._resume(hooks, source, resume)
                hooks.on_train_begin(self)
                self._run_epochs(hooks, guard)
                hooks.on_train_end(self)
            except BaseException as error:
                try:
                    hooks.on_exception(self, error)
                except Exception as hook_error:
                    error.add_note(
                        f"artifex_ckpt: a callback's on_exception failed as well: "
                        f"{type(hook_error).__name__}: {hook_error}"
                    )
                raise
            if guard.requested:
                # Too late to stop early: the run had no epoch left to save for.
                logger.warning(
                    "%s arrived at the end of training; the run is complete (step %d)",
                    guard.signal_name,
                    self.step,
                )
        return self

    def _run_epochs(self, hooks: CallbackList, guard: PreemptionGuard) -> None:
        for epoch in range(self.initial_epoch, self.epochs):
            self.epoch = epoch
            hooks.on_epoch_begin(self, epoch)
            logs = self._train_epoch(hooks, epoch, guard)
            if self.val_data is not None:
                hooks.on_validation_begin(self)
                val_logs = self._evaluate()
                hooks.on_validation_end(self, val_logs)
                logs.update(val_logs)
            hooks.on_epoch_end(self, epoch, logs)
            if self.stop_training:
                return
            # A signal that came after the epoch's last step (during validation or the
            # epoch-end save) stops here rather than one step into the next epoch. Only
            # `requested` is read: with several hosts it turns True at JAX's common step.
            if guard.requested and epoch + 1 < self.epochs:
                raise TrainingPreempted(self.step, guard.signal_name or "a preemption notice")

    def _train_epoch(
        self, hooks: CallbackList, epoch: int, guard: PreemptionGuard
    ) -> dict[str, Any]:
        self.model.train()
        skip, self._skip = self._skip, 0
        if not skip:
            self.epoch_totals = {}
        # Sums restored with a mid-epoch checkpoint cover its `skip` batches; without them
        # the epoch's averages cover the batches trained after resuming.
        count = skip if self.epoch_totals else 0
        self.batches_done = skip
        for index, batch in enumerate(self._epoch_batches(epoch, skip), start=skip):
            hooks.on_batch_begin(self, index)
            metrics = self._train_step(self.model, self.optimizer, batch)
            self.step += 1
            self.batches_done = index + 1
            count += 1
            self.epoch_totals = _accumulate(self.epoch_totals, metrics)
            hooks.on_batch_end(self, index, metrics)
            if guard.should_stop(self.step):
                raise TrainingPreempted(self.step, guard.signal_name or "a preemption notice")
        return {name: total / max(count, 1) for name, total in self.epoch_totals.items()}

    def _epoch_batches(self, epoch: int, skip: int) -> Iterable[Any]:
        stream = self.data_iterator
        if stream is not None:
            # One stream: a grain iterator's position was restored with the checkpoint;
            # any other iterator goes on from wherever it is (a new one: its start).
            left = None if self.steps_per_epoch is None else self.steps_per_epoch - skip
            return stream if left is None else itertools.islice(stream, left)
        return skip_batches(_batches(self.train_data, epoch), skip)

    def _evaluate(self) -> dict[str, Any]:
        assert self.val_data is not None
        self.model.eval()
        totals: dict[str, jax.Array] = {}
        count = 0
        for batch in _batches(self.val_data, self.epoch):
            totals = _accumulate(totals, self._eval_step(self.model, batch))
            count += 1
        self.model.train()
        return {f"val_{name}": total / max(count, 1) for name, total in totals.items()}

    def _resume(self, hooks: CallbackList, source: ResumeFrom, asked: object) -> int:
        resumers = [c for c in hooks if isinstance(c, Resumable)]
        if not resumers:
            raise ConfigError(
                f"fit(resume={asked!r}) needs a callback that can resume, such as "
                "ModelCheckpoint, among the callbacks"
            )
        point = resumers[0].resume(self, source)
        # Only sums restored with this checkpoint may carry over into its epoch.
        self.epoch_totals = dict(point.epoch_totals)
        self.step = point.global_step
        self.epoch = point.epoch
        if point.batches_done is None:
            return point.epoch + 1
        # Saved mid-epoch: that epoch continues with its next batch.
        self._skip = point.batches_done
        return point.epoch


def _batches(data: Batches, epoch: int) -> Iterable[Any]:
    return data(epoch) if callable(data) else data


def _split(out: Any) -> tuple[jax.Array, Mapping[str, jax.Array]]:
    if isinstance(out, tuple):
        loss, aux = out
        return loss, aux
    return out, {}


def _make_train_step(loss_fn: LossFn) -> Callable[..., dict[str, jax.Array]]:
    def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Any) -> dict[str, Any]:
        def objective(model: nnx.Module) -> tuple[jax.Array, Mapping[str, jax.Array]]:
            return _split(loss_fn(model, batch))

        (loss, aux), grads = nnx.value_and_grad(objective, has_aux=True)(model)
        optimizer.update(model, grads)
        return {"loss": loss, **aux}

    return train_step


def _make_eval_step(loss_fn: LossFn) -> Callable[..., dict[str, jax.Array]]:
    def eval_step(model: nnx.Module, batch: Any) -> dict[str, Any]:
        loss, aux = _split(loss_fn(model, batch))
        return {"loss": loss, **aux}

    return eval_step


def _accumulate(totals: dict[str, jax.Array], metrics: Mapping[str, Any]) -> dict[str, jax.Array]:
    return {name: totals.get(name, jnp.zeros(())) + value for name, value in metrics.items()}
