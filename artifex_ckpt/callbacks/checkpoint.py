"""`ModelCheckpoint`: maps a training loop's epochs, steps and logs onto a
`MetricCheckpointManager`."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from artifex_ckpt.callbacks.base import BaseCallback, Logs, ResumeFrom, ResumePoint, TrainerLike
from artifex_ckpt.checkpointing import StepSpec, checkpoint_args, restore_checkpoint
from artifex_ckpt.config import CheckpointConfig
from artifex_ckpt.directory import absolute
from artifex_ckpt.errors import (
    CheckpointNotFoundError,
    CheckpointSaveError,
    StepError,
    WeightsOnlyError,
)
from artifex_ckpt.manager import MetricCheckpointManager
from artifex_ckpt.metrics import is_scalar, to_float
from artifex_ckpt.naming import PartialTag
from artifex_ckpt.policies import EveryInterval, EveryNEpochs, cadence_policy
from artifex_ckpt.preemption import TrainingPreempted

__all__ = ["ModelCheckpoint"]

logger = logging.getLogger("artifex_ckpt")


class ModelCheckpoint(BaseCallback):
    """Save checkpoints of `trainer.model` (and `trainer.optimizer`) ranked by a metric.

    Every `every_n_epochs`-th epoch is eligible (or every `every_n_train_steps`-th batch, or
    the first batch after `train_time_interval`). With `save_last=True` each eligible
    checkpoint is written and the newest is always kept; with `save_last=False` only those
    entering the top `save_top_k` are written. Keyword arguments go to
    `MetricCheckpointManager.from_config` (Orbax `options`, `handler_registry`, ...).

    The manager opens lazily: read-only at the first property read, as the writer when
    training begins (or `resume` is called). So a callback can be pickled or deep-copied
    before training, and one built only to read `best_score` never writes. Saves are
    asynchronous; `on_train_end` waits for them and raises if one failed. Best score, paths
    and the saved list are read from the directory, so they survive a restart.

    Example:
        ```python
        checkpoint = ModelCheckpoint(CheckpointConfig(dirpath="./checkpoints", save_top_k=3))
        trainer.fit(callbacks=[checkpoint])
        print(checkpoint.best_checkpoint_path, checkpoint.best_score)
        ```
    """

    __slots__ = (
        "_cadence",
        "_last_epoch",
        "_last_save",
        "_manager",
        "_manager_kwargs",
        "_writing",
        "config",
    )

    def __init__(self, config: CheckpointConfig, **manager_kwargs: Any) -> None:
        self.config = config
        self._manager_kwargs = manager_kwargs
        self._cadence = cadence_policy(config)
        self._manager: MetricCheckpointManager | None = None
        self._writing = False
        self._last_epoch: tuple[int, Logs] | None = None
        self._last_save = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        # An open manager holds threads and locks; a copy opens its own when it needs one.
        return {"config": self.config, "manager_kwargs": self._manager_kwargs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"], **state["manager_kwargs"])  # type: ignore[misc]

    @property
    def manager(self) -> MetricCheckpointManager:
        """The Orbax manager of this callback's directory: read-only until training begins."""
        if self._manager is None:
            self._manager = self._open(read_only=True)
        return self._manager

    @property
    def best_score(self) -> float | None:
        """Best monitored value on disk; None if no checkpoint has a finite one."""
        manager = self.manager
        best = manager.best_step()
        return None if best is None else manager.score(best)

    @property
    def best_checkpoint_path(self) -> epath.Path | None:
        """Directory of the best checkpoint, named by the filename template. A save in
        flight is listed already; its directory exists once it commits."""
        manager = self.manager
        best = manager.best_step()
        return None if best is None else manager.step_path(best)

    @property
    def saved_checkpoints(self) -> list[tuple[float, epath.Path]]:
        """Every retained checkpoint with a monitored value, as (score, path), best first."""
        manager = self.manager
        return [
            (score, manager.step_path(step))
            for step in manager.ranked_steps()
            if (score := manager.score(step)) is not None
        ]

    @property
    def last_checkpoint_path(self) -> epath.Path | None:
        """Directory of the newest checkpoint, the point training resumes from."""
        manager = self.manager
        latest = manager.latest_step()
        return None if latest is None else manager.step_path(latest)

    def resume(self, trainer: TrainerLike, source: ResumeFrom = "latest") -> ResumePoint:
        """Restore `trainer.model`, `trainer.optimizer` and its data position from a
        checkpoint: `"latest"` or `"best"` of this run (falling back past damaged ones), a
        step of this run, or the path of a checkpoint directory (of any run: fine-tuning).

        Raises `WeightsOnlyError` for a weights-only checkpoint: it holds no optimizer state.
        """
        writer = self._writer()
        step: StepSpec
        if isinstance(source, int) and not isinstance(source, bool):
            manager, step = writer, source
        elif source == "latest":
            manager, step = writer, "latest"
        elif source == "best":
            manager, step = writer, "best"
        elif isinstance(source, str | os.PathLike):
            manager, step = self._run_of(absolute(source))
        else:
            raise StepError(
                f"resume={source!r} is not accepted; use True, 'latest', 'best', a step or "
                "the path of a checkpoint directory"
            )
        try:
            restored = restore_checkpoint(
                manager,
                trainer.model,
                step,
                optimizer=trainer.optimizer,
                data_iterator=trainer.data_iterator,
                by="resume",
            )
        except WeightsOnlyError as err:
            raise WeightsOnlyError(f"cannot resume training: {err}") from err
        finally:
            if manager is not writer:
                manager.close()
        state = restored.trainer_state
        done = state.get("batches_done")
        return ResumePoint(
            restored.step,
            restored.path,
            int(state.get("epoch", restored.step)),
            int(state.get("global_step", restored.step)),
            None if done is None else int(done),
        )

    def on_train_begin(self, trainer: TrainerLike) -> None:
        manager = self._writer()
        by_step = self.config.step_unit == "step"
        first = trainer.step + 1 if by_step else trainer.initial_epoch
        latest = manager.latest_step()
        # A checkpoint written mid-epoch shares its epoch's number; that epoch continues.
        resumed_partial = latest == first and not by_step and manager.is_partial(latest)
        if latest is not None and first <= latest and not resumed_partial:
            unit = "global step" if by_step else "epoch"
            raise StepError(
                f"{manager.directory} already holds checkpoints up to {unit} {latest}, but "
                f"training starts at {unit} {first}, so no new checkpoint could be written; "
                "resume with Trainer.fit(resume=True), choose a new dirpath, or (if resuming "
                "fell back past a damaged newer checkpoint) move that one aside with "
                "`artifex-ckpt quarantine`"
            )
        self._last_epoch = None
        self._last_save = time.monotonic()

    def on_batch_end(self, trainer: TrainerLike, batch: int, logs: Logs) -> None:
        cadence = self._cadence
        if isinstance(cadence, EveryNEpochs):
            return
        if isinstance(cadence, EveryInterval):
            due = cadence.is_due(time.monotonic() - self._last_save)
        else:
            due = trainer.step % cadence.interval == 0
        if due:
            self._save(trainer, trainer.step, logs, force=False)

    def on_epoch_end(self, trainer: TrainerLike, epoch: int, logs: Logs) -> None:
        self._last_epoch = (epoch, logs)
        cadence = self._cadence
        # Cheap integer test first: ineligible epochs never touch (or sync) the logs.
        if isinstance(cadence, EveryNEpochs) and cadence.is_eligible(epoch):
            latest = self._writer().latest_step()
            if latest is None or epoch > latest:
                self._save(trainer, epoch, logs, force=False)

    def on_train_end(self, trainer: TrainerLike) -> None:
        manager = self._writer()
        if self.config.save_last and self._last_epoch is not None:
            epoch, logs = self._last_epoch
            step = trainer.step if self.config.step_unit == "step" else epoch
            latest = manager.latest_step()
            if latest is None or step > latest:
                self._save(trainer, step, logs, force=True)
        self._finish_writing()

    def on_exception(self, trainer: TrainerLike, error: BaseException) -> None:
        if self._manager is None or not self._writing:
            return
        preempted = isinstance(error, TrainingPreempted)
        if preempted or (self.config.save_on_exception and isinstance(error, Exception)):
            reason: PartialTag = "preempted" if preempted else "exception"
            try:
                path = self._save_partial(trainer, reason)
            except Exception as save_error:
                error.add_note(f"artifex_ckpt: the {reason} checkpoint failed: {save_error}")
            else:
                if isinstance(error, TrainingPreempted) and path is not None:
                    error.checkpoint = path
        # Let a save in flight commit, so no half-written directory is left behind. If it
        # failed too, say so on the training error rather than replacing it.
        try:
            self._finish_writing()
        except CheckpointSaveError as save_error:
            error.add_note(f"artifex_ckpt: in addition, {save_error}")

    def _open(self, *, read_only: bool) -> MetricCheckpointManager:
        kwargs = dict(self._manager_kwargs)
        if read_only:
            options = kwargs.pop("options", None) or ocp.CheckpointManagerOptions()
            kwargs["options"] = dataclasses.replace(options, read_only=True)
        return MetricCheckpointManager.from_config(self.config, **kwargs)

    def _writer(self) -> MetricCheckpointManager:
        if not self._writing:
            if self._manager is not None:
                self._manager.close()
            self._manager = self._open(read_only=False)
            self._writing = True
        assert self._manager is not None
        return self._manager

    def _finish_writing(self) -> None:
        # Wait for the last save (raising if it failed), then give the directory up: after
        # training, other processes may open it as writers, and properties read it anew.
        manager, self._manager, self._writing = self._manager, None, False
        if manager is not None:
            manager.close()

    def _run_of(self, path: epath.Path) -> tuple[MetricCheckpointManager, int]:
        writer = self._writer()
        same_run = path.parent == writer.directory
        manager = (
            writer
            if same_run
            else MetricCheckpointManager(
                path.parent, options=ocp.CheckpointManagerOptions(read_only=True)
            )
        )
        for step in manager.all_steps():
            if manager.step_path(step).name == path.name:
                return manager, step
        if not same_run:
            manager.close()
        raise CheckpointNotFoundError(
            f"resume={os.fspath(path)!r} is not a checkpoint of {path.parent}; its checkpoints: "
            f"{sorted(manager.step_path(s).name for s in manager.all_steps())[:10]}"
        )

    def _save(self, trainer: TrainerLike, step: int, logs: Logs, *, force: bool) -> bool:
        monitor = self.config.monitor
        # Like Keras and Lightning, non-scalar log entries are not metrics; they are still
        # kept in the checkpoint's trainer_state. The monitor is always passed, to be checked.
        metrics = {k: v for k, v in logs.items() if k == monitor or is_scalar(v)}
        if monitor in metrics:
            # Read (and sync) the monitored value once; the manager reuses the float.
            metrics[monitor] = to_float(monitor, metrics[monitor])
        manager = self._writer()
        scored: dict[str, Any] | None = metrics
        if force and monitor is not None and monitor not in metrics:
            # The final checkpoint of save_last needs no score: it is written unscored.
            scored = None
        state = self._trainer_state(trainer, logs)
        before = self._verbose_before(manager)
        saved = manager.save(
            step,
            args=lambda: self._args(trainer, state),
            metrics=scored,
            force=force,
            custom_metadata={"epoch": trainer.epoch, "global_step": trainer.step},
            epoch=trainer.epoch,
            global_step=trainer.step,
        )
        if saved:
            self._last_save = time.monotonic()
        if before is not None:
            self._log_decision(manager, step, metrics, saved, before)
        return saved

    def _save_partial(self, trainer: TrainerLike, reason: PartialTag) -> epath.Path | None:
        manager = self._writer()
        step = trainer.step if self.config.step_unit == "step" else trainer.epoch
        latest = manager.latest_step()
        if step < 0 or (latest is not None and step <= latest):
            return None  # this step is saved already
        state = {**self._trainer_state(trainer, {}), "batches_done": trainer.batches_done}
        state["reason"] = reason
        manager.save(
            step,
            args=lambda: self._args(trainer, state),
            custom_metadata={"epoch": trainer.epoch, "global_step": trainer.step},
            epoch=trainer.epoch,
            global_step=trainer.step,
            partial=reason,
        )
        manager.wait_until_finished()
        path = manager.step_path(step)
        logger.warning("%s at step %d: saved %s", reason, trainer.step, os.fspath(path))
        return path

    def _trainer_state(self, trainer: TrainerLike, logs: Logs) -> dict[str, Any]:
        return {"epoch": trainer.epoch, "global_step": trainer.step, "logs": dict(logs)}

    def _args(self, trainer: TrainerLike, state: dict[str, Any]) -> ocp.args.CheckpointArgs:
        # Called by the manager only for a checkpoint it will write.
        return checkpoint_args(
            trainer.model,
            trainer.optimizer,
            weights_only=self.config.save_weights_only,
            trainer_state=state,
            data_iterator=trainer.data_iterator,
        )

    def _verbose_before(
        self, manager: MetricCheckpointManager
    ) -> tuple[float | None, set[int]] | None:
        if not self.config.verbose:
            return None
        best = manager.best_step()
        return (None if best is None else manager.score(best)), set(manager.all_steps())

    def _log_decision(
        self,
        manager: MetricCheckpointManager,
        step: int,
        metrics: Logs,
        saved: bool,
        before: tuple[float | None, set[int]],
    ) -> None:
        unit = "step" if self.config.step_unit == "step" else "epoch"
        monitor = self.config.monitor
        value = metrics.get(monitor) if monitor else None
        best, steps = before
        shown = f"{monitor} {value:.4f}" if isinstance(value, float) else "unscored"
        if not saved:
            logger.info(
                "%s %d: %s not in top %d, not saved", unit, step, shown, self.config.save_top_k
            )
            return
        name = manager.step_path(step).name
        if isinstance(value, float) and manager.best_step() == step and best is not None:
            logger.info(
                "%s %d: %s improved from %.4f to %.4f, saved %s",
                unit, step, monitor, best, value, name,
            )  # fmt: skip
        else:
            logger.info("%s %d: %s, saved %s", unit, step, shown, name)
        for gone in sorted(steps - set(manager.all_steps())):
            logger.info("%s %d: evicted %s", unit, step, manager.plan.step_name(gone))
