"""`Trainer`: a small, real training loop for flax nnx models and optax, driving callbacks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from artifex_ckpt.callbacks.base import BaseCallback, CallbackList, Resumable, ResumeFrom
from artifex_ckpt.errors import ConfigError
from artifex_ckpt.validation import require_int

__all__ = ["LossFn", "Trainer"]

# loss_fn(model, batch) -> loss, or (loss, {"name": metric, ...})
LossFn = Callable[[Any, Any], jax.Array | tuple[jax.Array, Mapping[str, jax.Array]]]
Batches = Iterable[Any] | Callable[[int], Iterable[Any]]


class Trainer:
    """Train `model` with `optimizer` on `loss_fn`, calling callbacks at each hook.

    Epoch logs hold `loss` and the aux metrics averaged over the epoch, and the
    validation averages as `val_loss`, `val_<name>`. Values stay JAX arrays until a
    callback reads them, so epochs nobody inspects cost no device sync.

    Example:
        ```python
        trainer = Trainer(model, optimizer, loss_fn, train_batches, val_batches, epochs=5)
        trainer.fit(callbacks=[ModelCheckpoint(CheckpointConfig(dirpath="ckpts"))])
        ```

    Args:
        model: An `nnx.Module`.
        optimizer: An `nnx.Optimizer` over the model's `nnx.Param`s.
        loss_fn: `loss_fn(model, batch) -> loss` or `(loss, aux_metrics)`.
        train_data: Batches, re-iterated each epoch, or `epoch -> batches`.
        val_data: Validation batches (same forms), or None.
        epochs: Number of epochs in total (a resumed run continues up to it).
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
    ) -> None:
        require_int("epochs", epochs, minimum=1, accepted="an integer >= 1")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.train_data = train_data
        self.val_data = val_data
        self.epochs = epochs
        self.step = 0
        self.epoch = -1
        self.initial_epoch = 0
        self.stop_training = False
        self._train_step = nnx.jit(_make_train_step(loss_fn))
        self._eval_step = nnx.jit(_make_eval_step(loss_fn))

    @property
    def num_batches(self) -> int | None:
        """Training batches per epoch, when the data has a length."""
        data = self.train_data
        return len(data) if isinstance(data, Sequence) else None

    def fit(
        self,
        callbacks: Sequence[BaseCallback] | CallbackList | None = None,
        *,
        resume: bool | ResumeFrom = False,
    ) -> Trainer:
        """Run epochs `initial_epoch .. epochs-1`.

        `resume=True` (or `"latest"`) continues from the newest checkpoint of the run's
        `ModelCheckpoint`, `"best"` from its best, an int from that step: model, optimizer,
        epoch and global step are restored, and training continues at the next epoch.
        """
        hooks = callbacks if isinstance(callbacks, CallbackList) else CallbackList(callbacks)
        self.stop_training = False
        source: ResumeFrom | None = (
            "latest" if resume is True else None if resume is False else resume
        )
        self.initial_epoch = 0 if source is None else self._resume(hooks, source, resume)
        hooks.on_train_begin(self)
        try:
            for epoch in range(self.initial_epoch, self.epochs):
                self.epoch = epoch
                hooks.on_epoch_begin(self, epoch)
                logs = self._train_epoch(hooks, epoch)
                if self.val_data is not None:
                    hooks.on_validation_begin(self)
                    val_logs = self._evaluate()
                    hooks.on_validation_end(self, val_logs)
                    logs.update(val_logs)
                hooks.on_epoch_end(self, epoch, logs)
                if self.stop_training:
                    break
        except BaseException as error:
            hooks.on_exception(self, error)
            raise
        hooks.on_train_end(self)
        return self

    def _train_epoch(self, hooks: CallbackList, epoch: int) -> dict[str, Any]:
        self.model.train()
        totals: dict[str, jax.Array] = {}
        count = 0
        for index, batch in enumerate(_batches(self.train_data, epoch)):
            hooks.on_batch_begin(self, index)
            metrics = self._train_step(self.model, self.optimizer, batch)
            self.step += 1
            count += 1
            totals = _accumulate(totals, metrics)
            hooks.on_batch_end(self, index, metrics)
        return {name: total / max(count, 1) for name, total in totals.items()}

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
        self.step = point.global_step
        self.epoch = point.epoch
        return point.epoch + 1


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
