"""`ModelCheckpoint`: maps a training loop's epochs and logs onto a `MetricCheckpointManager`."""

from __future__ import annotations

from typing import Any

from etils import epath

from artifex_ckpt.callbacks.base import BaseCallback, Logs, ResumeFrom, ResumePoint, TrainerLike
from artifex_ckpt.checkpointing import StepSpec, checkpoint_args, restore_checkpoint
from artifex_ckpt.config import CheckpointConfig
from artifex_ckpt.errors import CheckpointSaveError, StepError, WeightsOnlyError
from artifex_ckpt.manager import MetricCheckpointManager
from artifex_ckpt.metrics import is_scalar, to_float
from artifex_ckpt.policies import EveryNEpochs

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(BaseCallback):
    """Save checkpoints of `trainer.model` (and `trainer.optimizer`) ranked by a metric.

    Every `every_n_epochs`-th epoch is eligible. With `save_last=True` each eligible
    epoch is written and the newest is always kept; with `save_last=False` only
    epochs entering the top `save_top_k` are written. Keyword arguments go to
    `MetricCheckpointManager.from_config` (Orbax `options`, `handler_registry`, ...).
    Saves are asynchronous; `on_train_end` waits for them and raises if one failed. Best
    score, paths and the saved list are read from the manager, so they survive a restart.

    Example:
        ```python
        checkpoint = ModelCheckpoint(CheckpointConfig(dirpath="./checkpoints", save_top_k=3))
        trainer.fit(callbacks=[checkpoint])
        print(checkpoint.best_checkpoint_path, checkpoint.best_score)
        ```
    """

    __slots__ = ("_eligibility", "_last_epoch", "_manager", "config")

    def __init__(self, config: CheckpointConfig, **manager_kwargs: Any) -> None:
        self.config = config
        self._manager = MetricCheckpointManager.from_config(config, **manager_kwargs)
        self._eligibility = EveryNEpochs(config.every_n_epochs)
        self._last_epoch: tuple[int, Logs] | None = None

    @property
    def manager(self) -> MetricCheckpointManager:
        """The Orbax manager holding this callback's checkpoints."""
        return self._manager

    @property
    def best_score(self) -> float | None:
        """Best monitored value on disk; None if no checkpoint has a finite one."""
        best = self._manager.best_step()
        return None if best is None else self._manager.score(best)

    @property
    def best_checkpoint_path(self) -> epath.Path | None:
        """Directory of the best checkpoint, named by the filename template."""
        best = self._manager.best_step()
        return None if best is None else self._manager.step_path(best)

    @property
    def saved_checkpoints(self) -> list[tuple[float, epath.Path]]:
        """Every retained checkpoint with a monitored value, as (score, path), best first."""
        return [
            (score, self._manager.step_path(step))
            for step in self._manager.ranked_steps()
            if (score := self._manager.score(step)) is not None
        ]

    @property
    def last_checkpoint_path(self) -> epath.Path | None:
        """Directory of the newest checkpoint, the point training resumes from."""
        latest = self._manager.latest_step()
        return None if latest is None else self._manager.step_path(latest)

    def resume(self, trainer: TrainerLike, source: ResumeFrom = "latest") -> ResumePoint:
        """Restore `trainer.model` and `trainer.optimizer` from one of this run's checkpoints
        (`"latest"`, `"best"` or a step), falling back past damaged ones for latest/best.

        Raises `WeightsOnlyError` for a weights-only checkpoint: it holds no optimizer state.
        """
        step: StepSpec
        if isinstance(source, int) and not isinstance(source, bool):
            step = source
        elif source == "latest":
            step = "latest"
        elif source == "best":
            step = "best"
        else:
            raise StepError(
                f"resume={source!r} is not accepted by ModelCheckpoint.resume; use 'latest', "
                "'best' or a step"
            )
        try:
            restored = restore_checkpoint(
                self._manager, trainer.model, step, optimizer=trainer.optimizer
            )
        except WeightsOnlyError as err:
            raise WeightsOnlyError(f"cannot resume training: {err}") from err
        state = restored.trainer_state
        epoch = int(state.get("epoch", restored.step))
        global_step = int(state.get("global_step", restored.step))
        return ResumePoint(restored.step, restored.path, epoch, global_step)

    def on_train_begin(self, trainer: TrainerLike) -> None:
        first = trainer.initial_epoch
        latest = self._manager.latest_step()
        if latest is not None and first <= latest:
            raise StepError(
                f"{self._manager.directory} already holds checkpoints up to epoch {latest}, "
                f"but training starts at epoch {first}, so no new checkpoint could be "
                "written; resume with Trainer.fit(resume=True), choose a new dirpath, or (if "
                "resuming fell back past a damaged newer checkpoint) move that one away"
            )
        self._last_epoch = None

    def on_epoch_end(self, trainer: TrainerLike, epoch: int, logs: Logs) -> None:
        self._last_epoch = (epoch, logs)
        # Cheap integer test first: ineligible epochs never touch (or sync) the logs.
        if self._eligibility.is_eligible(epoch):
            self._save(trainer, epoch, logs, force=False)

    def on_train_end(self, trainer: TrainerLike) -> None:
        if self.config.save_last and self._last_epoch is not None:
            epoch, logs = self._last_epoch
            latest = self._manager.latest_step()
            if latest is None or epoch > latest:
                self._save(trainer, epoch, logs, force=True)
        self._manager.wait_until_finished()

    def on_exception(self, trainer: TrainerLike, error: BaseException) -> None:
        # Let a save in flight commit, so no half-written directory is left behind. If it
        # failed too, say so on the training error rather than replacing it.
        try:
            self._manager.wait_until_finished()
        except CheckpointSaveError as save_error:
            error.add_note(f"artifex_ckpt: in addition, {save_error}")

    def _metrics(self, logs: Logs) -> dict[str, Any]:
        # Like Keras and Lightning, non-scalar log entries are not metrics; they are still
        # kept in the checkpoint's trainer_state. The monitor is always passed, to be checked.
        monitor = self.config.monitor
        return {k: v for k, v in logs.items() if k == monitor or is_scalar(v)}

    def _save(self, trainer: TrainerLike, epoch: int, logs: Logs, *, force: bool) -> bool:
        monitor = self.config.monitor
        # Read (and sync) the monitored value once; the manager reuses the float.
        scored = {monitor: to_float(monitor, logs[monitor])} if monitor in logs else None
        # Ask first: a checkpoint that would not be kept costs no state gathering.
        if not force and not self._manager.would_keep(epoch, scored):
            return False
        state: dict[str, Any] = {"epoch": epoch, "global_step": trainer.step, "logs": dict(logs)}
        args = checkpoint_args(
            trainer.model,
            trainer.optimizer,
            weights_only=self.config.save_weights_only,
            trainer_state=state,
        )
        return self._manager.save(
            epoch,
            args=args,
            metrics={**self._metrics(logs), **(scored or {})},
            force=force,
            custom_metadata={"epoch": epoch, "global_step": trainer.step},
            global_step=trainer.step,
        )
