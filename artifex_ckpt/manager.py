"""`MetricCheckpointManager`: Orbax's `CheckpointManager` with metric-ranked top-k retention.

Everything that Orbax can do is configured through `CheckpointManagerOptions`
(`best_fn`, `best_mode`, `preservation_policy`, `save_decision_policy`,
`step_name_format`). The subclass adds only what Orbax lacks: a NaN-safe `best_step`,
the skip of saves that retention would delete at once, float conversion of metrics,
clear errors, and template-named step directories.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm
from orbax.checkpoint.path import step as step_lib

from artifex_ckpt.config import CheckpointConfig
from artifex_ckpt.directory import (
    TRASH,
    TrashPurger,
    absolute,
    is_local,
    remove_unfinished,
    require_writable,
)
from artifex_ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    ConfigError,
    CorruptCheckpointWarning,
    StepError,
)
from artifex_ckpt.handlers import default_handler_registry
from artifex_ckpt.metrics import jsonable, monitored_value, normalise_metrics, to_float
from artifex_ckpt.naming import FilenameTemplate, TemplateNameFormat
from artifex_ckpt.policies import EveryNEpochs, MetricRanking, RetainedOnArrival, retention_policy
from artifex_ckpt.settings import RetentionSettings

__all__ = ["MetricCheckpointManager"]

# Options that would let retention delete what it cannot see, or race the trash purge.
_UNSAFE_OPTIONS = {
    "lightweight_initialize": "checkpoints opened without their metrics rank worst and "
    "would be evicted",
    "prevent_write_metrics": "without stored metrics the best cannot be found after a restart",
    "enable_background_delete": "evicted checkpoints are purged beside the loop already",
}
# Any of these means the caller chose how items are written; otherwise arrays go uncompressed.
_HANDLER_KWARGS = {"handler_registry", "item_handlers", "item_names", "checkpointers"}
# Marks "metrics not given" apart from "no metrics" (None) in `should_save`.
_UNSCORED: Any = object()
# Retention and naming belong to the manager; an options object setting them too
# would silently fight it.
_OWNED_OPTIONS = (
    "max_to_keep",
    "keep_period",
    "keep_time_interval",
    "best_fn",
    "preservation_policy",
    "step_name_format",
    "step_prefix",
    "step_format_fixed_length",
)


class MetricCheckpointManager(ocp.CheckpointManager):
    """An Orbax `CheckpointManager` that keeps the k best checkpoints by a metric.

    It always keeps the newest one too (`keep_last=True`), ranks NaN and inf worst,
    breaks ties in favour of the older checkpoint, names step directories by a
    filename template, and stores these settings in the directory so that a manager
    opened later without them adopts them. Arguments left as None take the stored
    value, else the default shown in brackets.

    Example:
        ```python
        import orbax.checkpoint as ocp
        from artifex_ckpt import MetricCheckpointManager

        with MetricCheckpointManager("/tmp/run", monitor="val_loss", save_top_k=2,
                                     filename="ckpt-{epoch:03d}-{val_loss:.3f}") as mgr:
            for step, loss in enumerate([0.9, 0.5, 0.7]):
                mgr.save(step, args=ocp.args.StandardSave({"w": [1.0, 2.0]}),
                         metrics={"val_loss": loss})
            mgr.wait_until_finished()
            assert mgr.best_step() == 1
            assert mgr.step_path(1).name == "ckpt-001-0.500"
        ```

    Args:
        directory: Root directory (str, os.PathLike or `etils.epath.Path`).
        monitor: Metric ranking the checkpoints ["val_loss"].
        mode: "min" or "max" ["min"].
        save_top_k: k best kept by score; -1 keeps all, 0 none [3].
        keep_last: Keep the newest checkpoint as well [True]. When False, `save`
            skips (returns False for) a checkpoint that would not enter the top k.
        filename: Directory-name template such as "model-{epoch:02d}-{val_loss:.4f}"
            [Orbax's numeric step names].
        options: Other `ocp.CheckpointManagerOptions` (async, save decision policy,
            multiprocessing, ...). Retention and naming options are refused.
        **orbax_kwargs: Passed to `ocp.CheckpointManager` (`handler_registry`, ...).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | epath.Path,
        *,
        monitor: str | None = None,
        mode: Literal["min", "max"] | None = None,
        save_top_k: int | None = None,
        keep_last: bool | None = None,
        filename: str | None = None,
        options: ocp.CheckpointManagerOptions | None = None,
        **orbax_kwargs: Any,
    ) -> None:
        root = absolute(directory)
        if root.exists() and not root.is_dir():
            raise ConfigError(
                f"directory {os.fspath(root)!r} is an existing file; pass a directory"
            )
        # Settings must be known before Orbax's constructor scans the directory.
        settings = RetentionSettings.resolve(
            root,
            monitor=monitor,
            mode=mode,
            save_top_k=save_top_k,
            keep_last=keep_last,
            filename=filename,
        )
        self._settings = settings
        self._ranking = MetricRanking(settings.monitor, settings.mode)
        self._retention = retention_policy(self._ranking, settings.save_top_k, settings.keep_last)
        self._name_format = (
            TemplateNameFormat(FilenameTemplate(settings.filename)) if settings.filename else None
        )
        self._step_names = self._name_format or step_lib.standard_name_format()
        self._in_flight: int | None = None
        self._saving = False
        own_options = self._own_options(options, root)
        if not own_options.read_only:
            require_writable(root)
        if not _HANDLER_KWARGS & orbax_kwargs.keys():
            orbax_kwargs["handler_registry"] = default_handler_registry()
        super().__init__(root, options=own_options, **orbax_kwargs)
        self._is_writer = not self._options.read_only and jax.process_index() == (
            self._multiprocessing_options.primary_host or 0
        )
        # Written with the first save, so a mistake caught before it leaves no trace.
        self._settings_unsaved = RetentionSettings.load(root) != settings
        # Our trash, unless the caller chose where evicted steps go.
        self._purger = TrashPurger(root) if self._options.todelete_subdir == TRASH else None
        # Leftovers of a crashed run go now, so the directory is clean before a save.
        if self._is_writer and is_local(root):
            remove_unfinished(root)
        self._finish_purge()

    @classmethod
    def from_config(
        cls,
        config: CheckpointConfig,
        *,
        options: ocp.CheckpointManagerOptions | None = None,
        **orbax_kwargs: Any,
    ) -> MetricCheckpointManager:
        """A manager for `ModelCheckpoint`'s config; `every_n_epochs` becomes its save policy."""
        options = dataclasses.replace(
            options or ocp.CheckpointManagerOptions(),
            save_decision_policy=ocm.AnySavePolicy([EveryNEpochs(config.every_n_epochs)]),
        )
        return cls(
            config.dirpath,
            monitor=config.monitor,
            mode=config.mode,
            save_top_k=config.save_top_k,
            keep_last=config.save_last,
            filename=config.filename,
            options=options,
            **orbax_kwargs,
        )

    @property
    def settings(self) -> RetentionSettings:
        """Monitor, mode, top-k, keep_last and template in force."""
        return self._settings

    def save(
        self,
        step: int,
        items: Any = None,
        save_kwargs: Any = None,
        metrics: Mapping[str, Any] | None = None,
        force: bool | None = False,
        args: ocp.args.CheckpointArgs | None = None,
        custom_metadata: dict[str, Any] | None = None,
    ) -> bool:
        """Orbax's `save`, with metrics turned into floats and retention-aware skipping.

        Returns False (writing nothing) when the save-decision policy says no, or when
        `keep_last=False` and the checkpoint would not enter the top k. Raises
        `StepError` for a negative step or one not newer than the newest checkpoint,
        and `MetricError` when `metrics` lacks the monitored metric.
        """
        if self._options.read_only:
            raise ConfigError(f"the manager of {self.directory} is read-only; it cannot save")
        self._check_new_step(step)
        floats = normalise_metrics(metrics, self._settings.monitor)
        custom_metadata = jsonable(custom_metadata) if custom_metadata is not None else None
        if not force and not self.should_save(step, floats):
            return False
        if self._name_format is not None:
            global_step = (custom_metadata or {}).get("global_step", step)
            name = self._name_format.template.render(epoch=step, metrics=floats, step=global_step)
            self._name_format.remember(step, name)
        self._prepare_directory()
        self._saving = True
        try:
            saved = super().save(
                step,
                items,
                save_kwargs,
                metrics=floats,
                force=force,
                args=args,
                custom_metadata=custom_metadata,
            )
        except BaseException:
            self._forget_name(step)
            raise
        finally:
            self._saving = False
        if saved:
            self._in_flight = step
        else:
            self._forget_name(step)
        return saved

    def should_save(self, step: int, metrics: Any = _UNSCORED) -> bool:
        """Orbax's save decision for `step`; given `metrics`, also the retention check.

        With `keep_last=False`, a checkpoint that would not enter the top k is not
        worth writing. Pass the metrics (a mapping, or None for an unscored save) to
        ask before building the save arguments; only the monitored value is read.
        Orbax's own call, without metrics, gets Orbax's answer alone.
        """
        if metrics is not _UNSCORED and not self._settings.keep_last:
            monitor = self._settings.monitor
            score = None
            if metrics is not None:
                score = {monitor: to_float(monitor, monitored_value(metrics, monitor))}
            if not self._enters_retention(step, score):
                return False
        return super().should_save(step)

    def wait_until_finished(self) -> None:
        """Block until the pending save commits; a failed background save raises here.

        The error is a `CheckpointSaveError` naming the checkpoint. Checkpoints that
        retention had scheduled for deletion are kept, since nothing newer committed.
        """
        step, self._in_flight = self._in_flight, None
        try:
            super().wait_until_finished()
        except Exception as err:
            name = None if step is None else self._step_names.build_name(step)
            self._forget_name(step)
            self.reload()
            raise CheckpointSaveError(
                f"saving checkpoint {name!r} (step {step}) in {self.directory} failed: "
                f"{type(err).__name__}: {err}"
            ) from err
        if self._saving and self._purger is not None and self._is_writer:
            # Called from inside save(): the training loop is waiting, so evicted
            # checkpoints are removed beside it rather than before it.
            self._purger.start()
        else:
            self._finish_purge()

    def restore(
        self,
        step: int | None,
        items: Any = None,
        restore_kwargs: Any = None,
        directory: epath.PathLike | None = None,
        args: ocp.args.CheckpointArgs | None = None,
    ) -> Any:
        """Orbax's `restore`, after waiting for pending saves; `None` means the newest."""
        self.wait_until_finished()
        if directory is None:
            step = self.latest_step() if step is None else step
            self._require_retained(step)
        return super().restore(step, items, restore_kwargs, directory=directory, args=args)

    def metrics(self, step: int) -> Any:
        """Metrics stored with `step`; unreadable ones warn and count as missing."""
        try:
            return super().metrics(step)
        except ValueError as err:
            warnings.warn(
                CorruptCheckpointWarning(
                    f"metrics of checkpoint {self.directory / self._step_names.build_name(step)} "
                    f"cannot be read ({err}); it is treated as unscored"
                ),
                stacklevel=2,
            )
            return None

    def check_intact(self, step: int) -> None:
        """Raise `CheckpointError` if `step` lacks its commit record or has unreadable
        metrics. Cheap: it reads two small files, not the arrays."""
        path = self.step_path(step)
        if step_lib.Metadata(step=step, path=path).commit_timestamp_nsecs is None:
            raise CheckpointError(f"checkpoint {path} has no commit record")
        try:
            super().metrics(step)
        except ValueError as err:
            raise CheckpointError(f"checkpoint {path} has unreadable metrics: {err}") from err

    def best_step(self) -> int | None:
        """The best retained step; None if no retained step has a finite score."""
        ranked = self._ranking.ranked(self._infos())
        if not ranked or self._ranking.score(ranked[0].metrics) is None:
            return None
        return ranked[0].step

    def ranked_steps(self) -> list[int]:
        """Retained steps that have a monitored value, best first (NaN and inf last)."""
        infos = [i for i in self._infos() if self._ranking.value(i.metrics) is not None]
        return [info.step for info in self._ranking.ranked(infos)]

    def score(self, step: int) -> float | None:
        """The monitored value stored with `step` (may be NaN), or None if it has none."""
        self._require_retained(step)
        info = next(i for i in self._infos() if i.step == step)
        return self._ranking.value(info.metrics)

    def step_path(self, step: int) -> epath.Path:
        """The directory of a retained step (it exists once the save has committed)."""
        self._require_retained(step)
        return self.directory / self._step_names.build_name(step)

    def _own_options(
        self, options: ocp.CheckpointManagerOptions | None, root: epath.Path
    ) -> ocp.CheckpointManagerOptions:
        options = options or ocp.CheckpointManagerOptions()
        for name in _OWNED_OPTIONS:
            if getattr(options, name) is not None:
                raise ConfigError(
                    f"options.{name}={getattr(options, name)!r} conflicts with the manager's "
                    "own retention and naming; use save_top_k, keep_last and filename instead"
                )
        for name in _UNSAFE_OPTIONS:
            if getattr(options, name):
                raise ConfigError(
                    f"options.{name}=True is not supported: {_UNSAFE_OPTIONS[name]}; leave it False"
                )
        return dataclasses.replace(
            options,
            best_fn=self._ranking.best_fn,
            best_mode=self._settings.mode,
            preservation_policy=self._retention,
            step_name_format=self._step_names,
            # Remote stores use Orbax's scan; locally a cheaper one runs after __init__.
            cleanup_tmp_directories=not options.read_only and not is_local(root),
            create=False,
            todelete_subdir=options.todelete_subdir or TRASH,
        )

    def _prepare_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._settings_unsaved and self._is_writer:
            self._settings.store(self.directory)
        self._settings_unsaved = False

    def _finish_purge(self) -> None:
        if self._purger is not None and self._is_writer:
            self._purger.finish()

    def _infos(self) -> Sequence[ocm.PolicyCheckpointInfo]:
        # Orbax's in-memory view of the directory (including a save in flight): the
        # one list of checkpoints, so best/latest/retention can never disagree.
        return list(self._checkpoints)

    def _enters_retention(self, step: int, metrics: Mapping[str, float] | None) -> bool:
        info = ocp.checkpoint_manager.CheckpointInfo(
            step=step, time=datetime.datetime.now(tz=datetime.UTC), metrics=metrics
        )
        return RetainedOnArrival(self._retention).should_save(info, self._infos())

    def _check_new_step(self, step: object) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise StepError(f"step={step!r} is not accepted; use an integer >= 0")
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise StepError(
                f"step {step} is not newer than the newest checkpoint (step {latest}) in "
                f"{self.directory}; continue from step {latest + 1} (Trainer.fit(resume=True)) "
                "or use a new directory"
            )

    def _require_retained(self, step: int | None) -> None:
        steps = self.all_steps()
        if step is None or step not in steps:
            raise CheckpointNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; retained steps: "
                f"{sorted(steps)}"
            )

    def _forget_name(self, step: int | None) -> None:
        if self._name_format is not None and step is not None:
            self._name_format.forget(step)
