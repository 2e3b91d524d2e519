"""`ModelCheckpoint`: maps a training loop's epochs, steps and logs onto a
`MetricCheckpointManager`."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from artifex_ckpt.agreement import primary_value
from artifex_ckpt.callbacks.base import BaseCallback, Logs, ResumeFrom, ResumePoint, TrainerLike
from artifex_ckpt.checkpointing import StepSpec, checkpoint_args, restore_checkpoint
from artifex_ckpt.config import CheckpointConfig
from artifex_ckpt.directory import absolute
from artifex_ckpt.errors import (
    CheckpointNotFoundError,
    StepError,
    WeightsOnlyError,
)
from artifex_ckpt.history import Decision
from artifex_ckpt.manager import MetricCheckpointManager
from artifex_ckpt.metrics import is_scalar, to_float
from artifex_ckpt.naming import PartialTag
from artifex_ckpt.policies import EveryInterval, cadence_policy
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

    A checkpoint saved at a batch end is scored on that batch's logs over the latest epoch
    logs (so `val_loss` is the last validation's, as in Lightning); until a first
    validation has given the monitored value, such a checkpoint is skipped (logged once).
    When training stops with `TrainingPreempted` (or raises, with `save_on_exception`), the
    state at that step is saved whatever the cadence: unscored, with `"reason"` in its
    metadata and its name ending in `-preempted` (`-exception`), kept only while it is the
    newest. It holds the optimizer state even with `save_weights_only`, to resume from.
    With epoch cadence it carries the epoch's number; resumed, that epoch's end replaces it
    with a regular checkpoint.

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
        "_by_epoch",
        "_cadence",
        "_declinable",
        "_every_steps",
        "_hosts",
        "_known_logs",
        "_last_check",
        "_last_epoch",
        "_manager",
        "_manager_kwargs",
        "_resumed",
        "_training",
        "_warned_monitor",
        "_writing",
        "config",
    )

    def __init__(self, config: CheckpointConfig, **manager_kwargs: Any) -> None:
        self.config = config
        self._manager_kwargs = manager_kwargs
        # The batch-end hook runs every step: its cadence test reads plain attributes only.
        self._every_steps = config.every_n_train_steps or 0
        # One policy object for the callback's test and Orbax's own check (time cadence).
        self._cadence = cadence_policy(config)
        self._by_epoch = config.step_unit == "epoch"
        # The monitor, when an epoch's checkpoint may be declined before it is gathered.
        self._declinable = None if config.save_last else config.monitor
        self._manager: MetricCheckpointManager | None = None
        self._writing = False
        self._training = False
        self._resumed = False
        self._warned_monitor = False
        self._hosts = 1
        self._last_epoch: tuple[int, Logs] | None = None
        # The latest epoch logs (or those restored): what a batch-end save is scored on,
        # besides the batch's own logs.
        self._known_logs: dict[str, Any] = {}
        self._last_check = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        # An open manager holds threads and locks; a copy opens its own when it needs one.
        return {"config": self.config, "manager_kwargs": self._manager_kwargs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        ModelCheckpoint.__init__(self, state["config"], **state["manager_kwargs"])

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
        if manager is writer and step != "latest":
            self._require_newest(writer, source, writer.best_step() if step == "best" else step)
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
        logs = state.get("logs")
        self._known_logs = dict(logs) if isinstance(logs, Mapping) else {}
        self._resumed = True
        # The running sums of an interrupted epoch, so that its averages come out as in an
        # uninterrupted run.
        totals = _decode_totals(state.get("epoch_totals")) if done is not None else {}
        return ResumePoint(
            restored.step,
            restored.path,
            int(state.get("epoch", restored.step)),
            int(state.get("global_step", restored.step)),
            None if done is None else int(done),
            totals,
        )

    def on_train_begin(self, trainer: TrainerLike) -> None:
        manager = self._writer()
        by_step = not self._by_epoch
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
        if not self._resumed:
            self._known_logs = {}
        self._resumed = False
        self._warned_monitor = False
        self._last_epoch = None
        self._hosts = jax.process_count()
        self._last_check = time.monotonic()
        self._training = True

    def on_batch_end(self, trainer: TrainerLike, batch: int, logs: Logs) -> None:
        # Called after every step: a batch that saves nothing costs two attribute reads
        # and an integer test (or a clock read), and never touches `logs`.
        if self._by_epoch:
            return
        every = self._every_steps
        if every:
            if trainer.step % every:
                return
        elif not self._time_is_due():
            return
        self._save(trainer, trainer.step, {**self._known_logs, **logs}, force=False, batch=True)

    def on_epoch_end(self, trainer: TrainerLike, epoch: int, logs: Logs) -> None:
        self._last_epoch = (epoch, logs)
        self._known_logs = dict(logs)
        # Cheap integer test first: ineligible epochs never touch (or sync) the logs.
        if self._by_epoch and (epoch + 1) % self.config.every_n_epochs == 0:
            manager = self._writer()
            if self._declines(manager, epoch, logs):
                return
            if self._is_new(manager, epoch):
                self._save(trainer, epoch, logs, force=False)

    def on_train_end(self, trainer: TrainerLike) -> None:
        self._training = False
        manager = self._writer()
        if self.config.save_last and self._last_epoch is not None:
            epoch, logs = self._last_epoch
            step = epoch if self._by_epoch else trainer.step
            if self._is_new(manager, step):
                self._save(trainer, step, logs, force=True)
        self._finish_writing()

    def on_exception(self, trainer: TrainerLike, error: BaseException) -> None:
        training, self._training = self._training, False
        if self._manager is None or not self._writing:
            return
        preempted = isinstance(error, TrainingPreempted)
        wanted = preempted or (self.config.save_on_exception and isinstance(error, Exception))
        # Nothing was trained when resuming or on_train_begin failed: nothing to save.
        if training and wanted:
            reason: PartialTag = "preempted" if preempted else "exception"
            try:
                path = self._save_partial(trainer, reason)
            except Exception as save_error:
                error.add_note(
                    f"artifex_ckpt: the {reason} checkpoint failed: "
                    f"{type(save_error).__name__}: {save_error}"
                )
            else:
                if isinstance(error, TrainingPreempted) and path is not None:
                    error.checkpoint = path
        # Let a save in flight commit, so no half-written directory is left behind. If it
        # failed too, say so on the training error rather than replacing it.
        try:
            self._finish_writing()
        except Exception as save_error:
            error.add_note(f"artifex_ckpt: in addition, {type(save_error).__name__}: {save_error}")

    def _open(self, *, read_only: bool) -> MetricCheckpointManager:
        kwargs = dict(self._manager_kwargs)
        if read_only:
            options = kwargs.pop("options", None) or ocp.CheckpointManagerOptions()
            kwargs["options"] = dataclasses.replace(options, read_only=True)
        return MetricCheckpointManager.from_config(self.config, cadence=self._cadence, **kwargs)

    def _writer(self) -> MetricCheckpointManager:
        if not self._writing:
            if self._manager is not None:
                self._manager.close()
            self._manager = self._open(read_only=False)
            self._writing = True
        assert self._manager is not None
        return self._manager

    def _time_is_due(self) -> bool:
        now = time.monotonic()
        assert isinstance(self._cadence, EveryInterval)
        due = self._cadence.is_due(now - self._last_check)
        if self._hosts > 1:
            # Clocks differ between hosts, and a save that only some hosts start deadlocks:
            # the primary host's clock decides for all (as in Lightning).
            due = primary_value(due, primary_host=0)
        if due:
            self._last_check = now
            self._cadence.grant()  # Orbax's check agrees instead of judging by its own clock
        return due

    def _declines(self, manager: MetricCheckpointManager, step: int, logs: Logs) -> bool:
        """With `save_last=False`, whether an epoch's checkpoint would stay out of the top k:
        asked on the monitored value alone, before any state or metrics are gathered (B1),
        and recorded as declined. A checkpoint the epoch resumed from (taken before its end)
        then stays the resume point."""
        monitor = self._declinable
        if monitor is None or monitor not in logs:
            return False
        value = to_float(monitor, logs[monitor])
        if self._hosts > 1:  # every host decides on the primary host's value, as `save` does
            plan = manager.plan
            hosts = plan.options.multiprocessing_options.active_processes
            value = primary_value(value, primary_host=plan.primary_host, processes=hosts)
        scored = {monitor: value}
        if manager.would_keep(step, scored):
            return False
        manager.decline(step, scored)
        if self.config.verbose:
            logger.info(
                "epoch %d: %s %.4f not in top %d, not saved",
                step, monitor, value, self.config.save_top_k,
            )  # fmt: skip
        return True

    def _is_new(self, manager: MetricCheckpointManager, step: int) -> bool:
        """Whether a regular checkpoint of `step` can be written: newer than the newest, or
        replacing a checkpoint of the same epoch taken before its end."""
        latest = manager.latest_step()
        return latest is None or step > latest or (step == latest and manager.is_partial(step))

    def _require_newest(
        self, manager: MetricCheckpointManager, source: ResumeFrom, step: int | None
    ) -> None:
        latest = manager.latest_step()
        if step is None or latest is None or step >= latest:
            return  # resuming from the newest (or finding nothing, which restoring reports)
        newer = [manager.step_path(s).name for s in manager.all_steps() if s > step]
        path = manager.step_path(step)
        raise StepError(
            f"resume={source!r} is step {step} ({path.name}) of {manager.directory}, which "
            f"also holds newer checkpoints ({', '.join(sorted(newer)[:5])}); training from "
            "there would have to write over them. Continue in a new directory "
            f"(CheckpointConfig(dirpath=<new>) with fit(resume={os.fspath(path)!r})), or "
            "move the newer checkpoints aside with `artifex-ckpt quarantine` and resume again"
        )

    def close(self) -> None:
        """Close the manager this callback opened (a reader, after properties were read);
        the next property read opens a new one. Training closes its writer itself."""
        self._finish_writing()

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

    def _save(
        self, trainer: TrainerLike, step: int, logs: Logs, *, force: bool, batch: bool = False
    ) -> bool:
        monitor = self.config.monitor
        if batch and monitor is not None and monitor not in logs:
            # Lightning's rule: until validation has logged the monitor, a batch-end
            # checkpoint cannot be ranked, and an unscored one would never be evicted.
            if not self._warned_monitor:
                self._warned_monitor = True
                logger.warning(
                    "step %d: monitored metric %r is not logged yet (logs: %s); batch-end "
                    "checkpoints are skipped until it is",
                    step, monitor, sorted(logs),
                )  # fmt: skip
            return False
        # Like Keras and Lightning, non-scalar log entries are not metrics; they are still
        # kept in the checkpoint's trainer_state. The monitor is always passed, to be checked.
        metrics = {k: v for k, v in logs.items() if k == monitor or is_scalar(v)}
        if monitor in metrics:
            # Read (and sync) the monitored value once; the manager reuses the float.
            metrics[monitor] = to_float(monitor, metrics[monitor])
        manager = self._writer()
        # The final checkpoint of save_last needs no score: it is written unscored, and kept
        # only until a newer one exists (a resumed run), like Lightning's last.ckpt.
        unscored_last = force and monitor is not None and monitor not in metrics
        scored = None if unscored_last else metrics
        replaced = self._take_partial(manager, step, scored, force=force)
        state = self._trainer_state(trainer, logs, mid_epoch=batch)
        before = self._verbose_before(manager)
        saved = manager.save(
            step,
            args=lambda: self._args(trainer, state),
            metrics=scored,
            force=force,
            custom_metadata={"epoch": trainer.epoch, "global_step": trainer.step},
            epoch=trainer.epoch,
            global_step=trainer.step,
            last=unscored_last,
        )
        if saved and replaced is not None:
            self._record_replaced(manager, step, replaced)
        if before is not None:
            self._log_decision(manager, step, metrics, saved, before)
        return saved

    def _take_partial(
        self,
        manager: MetricCheckpointManager,
        step: int,
        metrics: Mapping[str, Any] | None,
        *,
        force: bool,
    ) -> str | None:
        """Delete the checkpoint of `step` taken before its epoch ended, if there is one and
        the new one will be kept; returns its name."""
        if manager.latest_step() != step or not manager.is_partial(step):
            return None
        if not force and not manager.would_keep(step, metrics):
            return None  # the save will be declined: the partial stays the resume point
        name = manager.step_path(step).name
        manager.delete(step)
        return name

    def _record_replaced(self, manager: MetricCheckpointManager, step: int, name: str) -> None:
        by = manager.step_path(step).name
        score = manager.score(step)
        manager.record(Decision.evicted(step, name, None, by=by, by_step=step, by_score=score))

    def _save_partial(self, trainer: TrainerLike, reason: PartialTag) -> epath.Path | None:
        """Save the state at the current step, whatever the cadence, and wait for it to
        commit; returns the checkpoint holding that state (None if it cannot be saved)."""
        manager = self._writer()
        step = trainer.epoch if self._by_epoch else trainer.step
        latest = manager.latest_step()
        if step < 0 or (latest is not None and step < latest):
            return None  # nothing trained yet, or the directory holds newer checkpoints
        replaced = None
        if latest == step:
            if not self._by_epoch or not manager.is_partial(step):
                # A checkpoint of this very step (a batch-end save, or the epoch's end).
                manager.wait_until_finished()
                return manager.step_path(step)
            # The checkpoint this run resumed from, earlier in the same epoch.
            replaced = self._take_partial(manager, step, None, force=True)
        complete = self._last_epoch is not None and self._last_epoch[0] == trainer.epoch
        state = {
            **self._trainer_state(trainer, self._known_logs, mid_epoch=not complete),
            "reason": reason,
        }
        manager.save(
            step,
            # With the optimizer even under save_weights_only: this one exists to resume from.
            args=lambda: self._args(trainer, state, full=True),
            custom_metadata={"epoch": trainer.epoch, "global_step": trainer.step, "reason": reason},
            epoch=trainer.epoch,
            global_step=trainer.step,
            partial=reason,
        )
        manager.wait_until_finished()
        if replaced is not None:
            self._record_replaced(manager, step, replaced)
        path = manager.step_path(step)
        logger.warning("%s at step %d: saved %s", reason, trainer.step, os.fspath(path))
        return path

    def _trainer_state(
        self, trainer: TrainerLike, logs: Logs, *, mid_epoch: bool = False
    ) -> dict[str, Any]:
        state = {"epoch": trainer.epoch, "global_step": trainer.step, "logs": dict(logs)}
        if mid_epoch:
            # Taken before the epoch's end (a batch-end save, a preemption): a resumed run
            # continues this epoch after its `batches_done` batches, with the running sums
            # of its metrics. Without these keys, it starts the next epoch.
            state["batches_done"] = trainer.batches_done
            state["epoch_totals"] = _encode_totals(trainer)
        return state

    def _args(
        self, trainer: TrainerLike, state: dict[str, Any], *, full: bool = False
    ) -> ocp.args.CheckpointArgs:
        # Called by the manager only for a checkpoint it will write.
        return checkpoint_args(
            trainer.model,
            trainer.optimizer,
            weights_only=self.config.save_weights_only and not full,
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
        unit = "epoch" if self._by_epoch else "step"
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


def _encode_totals(trainer: TrainerLike) -> dict[str, list[str]]:
    """The trainer's running metric sums of the epoch, exactly, as JSON: name -> [hex, dtype]."""
    totals = trainer.epoch_totals
    out = {}
    for name, value in totals.items():
        array = np.asarray(value)
        if array.size == 1:
            out[str(name)] = [float(array.reshape(())).hex(), str(array.dtype)]
    return out


def _decode_totals(stored: object) -> dict[str, jax.Array]:
    if not isinstance(stored, Mapping):
        return {}
    totals = {}
    for name, entry in stored.items():
        if isinstance(entry, list | tuple) and len(entry) == 2:
            totals[str(name)] = jnp.asarray(float.fromhex(entry[0]), dtype=entry[1])
    return totals
