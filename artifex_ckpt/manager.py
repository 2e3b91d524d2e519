"""`MetricCheckpointManager`: Orbax's `CheckpointManager` with metric-ranked top-k retention,
configured by a plan built beforehand (`plan.py`) and wrapping Orbax's public methods from the
outside (docs/design.md explains the shape)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from artifex_ckpt.agreement import shared_metrics
from artifex_ckpt.config import CheckpointConfig
from artifex_ckpt.directory import TrashPurger, write_atomic_text
from artifex_ckpt.errors import CheckpointNotFoundError, CheckpointSaveError, ConfigError
from artifex_ckpt.history import Decision
from artifex_ckpt.housekeeping import Housekeeper, Task
from artifex_ckpt.journal import Journal
from artifex_ckpt.listing import require_intact
from artifex_ckpt.manifest import ManifestCheck
from artifex_ckpt.metrics import (
    jsonable,
    monitored_value,
    normalise_metrics,
    standard_json,
    to_float,
)
from artifex_ckpt.naming import PARTIAL_TAGS, PartialTag
from artifex_ckpt.ownership import STALE_AFTER_S, Claim
from artifex_ckpt.plan import ManagerPlan, cadence_options, open_plan
from artifex_ckpt.policies import LAST_METRIC, PARTIAL_METRIC, RetentionGate, is_partial
from artifex_ckpt.scores import StoredScores
from artifex_ckpt.settings import SETTINGS_FILE, RetentionSettings
from artifex_ckpt.validation import Mode, require_new_step

__all__ = ["MetricCheckpointManager"]


class MetricCheckpointManager(ocp.CheckpointManager):
    """An Orbax `CheckpointManager` that keeps the k best checkpoints by a metric.

    It always keeps the newest one too (`keep_last=True`), ranks NaN and inf worst,
    breaks ties in favour of the older checkpoint, never evicts an unscored checkpoint by
    rank, names step directories by a filename template, and stores these settings in
    the directory so that a manager opened later without them adopts them. Arguments left
    as None take the stored value, else the default shown in brackets.

    One writer per directory: a writer refuses (`OwnershipError`, naming the other run) a
    directory another live run writes; a reader (`options=ocp.CheckpointManagerOptions(
    read_only=True)`) never changes anything. A damaged checkpoint is listed and warned
    about, never a reason for the directory not to open.

    Example:
        ```python
        import tempfile

        import orbax.checkpoint as ocp

        with MetricCheckpointManager(tempfile.mkdtemp(), monitor="val_loss", save_top_k=2,
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
        retention: Complete settings instead of the five arguments above (there,
            `monitor=None` means "no monitor": keep the newest `save_top_k`).
        **orbax_kwargs: Passed to `ocp.CheckpointManager` (`handler_registry`, ...).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | epath.Path,
        *,
        monitor: str | None = None,
        mode: Mode | None = None,
        save_top_k: int | None = None,
        keep_last: bool | None = None,
        filename: str | None = None,
        options: ocp.CheckpointManagerOptions | None = None,
        retention: RetentionSettings | None = None,
        **orbax_kwargs: Any,
    ) -> None:
        explicit = retention or dict(
            monitor=monitor, mode=mode, save_top_k=save_top_k, keep_last=keep_last,
            filename=filename,
        )  # fmt: skip
        plan = open_plan(directory, explicit, options, orbax_kwargs, stale_after_s=STALE_AFTER_S)
        root = plan.directory
        # What `metrics` reads; Orbax's constructor calls it while scanning the directory.
        self._plan = plan
        self._scores = StoredScores(plan)
        self._claim = Claim.take(root, stale_after_s=STALE_AFTER_S) if plan.is_writer else None
        try:
            super().__init__(root, options=plan.options, **plan.orbax_kwargs)
        except BaseException:
            self._release()
            raise
        self._report_listing()
        self._settings_unsaved = plan.settings_unsaved
        self._in_flight: int | None = None
        self._gate = RetentionGate(plan.retention)
        self._journal = Journal.of(plan, self._claim) if plan.is_writer else None
        tasks: list[Task] = []
        if plan.is_writer and plan.trash is not None:
            tasks.append(TrashPurger(root).finish)
        if self._journal is not None:
            tasks.append(self._journal.flush)
        self._housekeeper = Housekeeper(tasks)
        if plan.cleans_leftovers:  # a crashed run's leftovers go before anything is saved
            plan.remove_leftovers(self.all_steps())
        self._housekeeper.finish()

    @classmethod
    def from_config(
        cls,
        config: CheckpointConfig,
        *,
        options: ocp.CheckpointManagerOptions | None = None,
        cadence: ocm.SaveDecisionPolicy | None = None,
        **orbax_kwargs: Any,
    ) -> MetricCheckpointManager:
        """A manager for `ModelCheckpoint`'s config; its cadence (`cadence`: the callback's
        policy object) is the save policy (a caller's own one is refused)."""
        options = cadence_options(config, options, cadence)
        return cls(config.dirpath, options=options, retention=config.retention(), **orbax_kwargs)

    @property
    def settings(self) -> RetentionSettings:
        """Monitor, mode, top-k, keep_last and template in force."""
        return self._plan.settings

    @property
    def plan(self) -> ManagerPlan:
        """What this manager was built from, and what this process may do to its directory."""
        return self._plan

    def save(
        self,
        step: int,
        items: Any = None,
        save_kwargs: Any = None,
        metrics: Mapping[str, Any] | None = None,
        force: bool | None = False,
        args: ocp.args.CheckpointArgs | Callable[[], ocp.args.CheckpointArgs] | None = None,
        custom_metadata: dict[str, Any] | None = None,
        *,
        epoch: int | None = None,
        global_step: int | None = None,
        partial: PartialTag | None = None,
        last: bool = False,
    ) -> bool:
        """Orbax's `save`, with metrics turned into floats and retention-aware skipping.

        Returns False (writing nothing) when the save-decision policy says no, or when
        `keep_last=False` and the checkpoint would not enter the top k. `args` may be a
        function returning them, called only for a checkpoint that is written. `epoch` and
        `global_step` fill `{epoch}` and `{step}` (default: `step`). `partial="preempted"` or
        `"exception"` writes a mid-epoch checkpoint whatever the policies say (unscored,
        named `<name>-<partial>`); `last=True` with `metrics=None`, a run's unscored end. Both
        are kept only while newest (other saves without metrics are kept for good). Raises
        `StepError` for a step not newer than the newest, `MetricError` when `metrics` lacks
        the monitor.
        """
        if self._plan.read_only:
            raise ConfigError(f"the manager of {self.directory} is read-only; it cannot save")
        if self._claim is not None:
            self._claim.refresh()  # raises OwnershipError if another run took the directory
        require_new_step(step, self.latest_step(), self.directory)
        hosts = self._plan.options.multiprocessing_options.active_processes
        if partial is not None and partial not in PARTIAL_TAGS:
            raise ConfigError(f"partial={partial!r} is not accepted; use one of {PARTIAL_TAGS}")
        marker = PARTIAL_METRIC if partial else LAST_METRIC if last and metrics is None else None
        if marker is not None:
            metrics, force = {marker: 1.0}, force or partial is not None
        floats = normalise_metrics(metrics, None if marker else self._plan.settings.monitor)
        # Every decision below depends on the metrics: the primary host's decide for all.
        floats = shared_metrics(floats, primary_host=self._plan.primary_host, processes=hosts)
        if not force and not self.would_keep(step, floats):
            self.decline(step, floats)
            return False
        if callable(args):
            args = args()
        custom_metadata = jsonable(custom_metadata) if custom_metadata is not None else None
        name = self._plan.name_for(
            step, floats, epoch=epoch, global_step=global_step, partial=partial
        )
        self._prepare_directory()
        before = {info.step: info.metrics for info in self._infos()}
        try:
            self._plan.require_directory()
            saved = super().save(
                step,
                items,
                save_kwargs,
                metrics=standard_json(floats),
                force=force,
                args=args,
                custom_metadata=custom_metadata,
            )
        except (OSError, ConfigError) as err:  # the directory is gone, or not writable
            raise self._failed(step, err) from err
        except BaseException:
            self._forget_name(step)
            raise
        finally:
            self._gate.forget()
        if not saved:
            self._forget_name(step)
            return False
        self._in_flight = step
        if self._journal is not None:
            self._journal.started(step, name, floats, before, self.ranked_steps(), self.all_steps())
            self._housekeeper.after_save(self.is_saving_in_progress)
        return True

    def is_partial(self, step: int) -> bool:
        """Whether `step` was written mid-epoch (`save(..., partial=...)`)."""
        return any(info.step == step and is_partial(info.metrics) for info in self._infos())

    def reached_preemption(self, step: int) -> bool:
        """False: `Trainer` polls JAX's preemption sync point with the global step; polling
        it here too, with epoch numbers, would move it."""
        return False

    def would_keep(self, step: int, metrics: Mapping[str, Any] | None) -> bool:
        """Whether a checkpoint of `step` with `metrics` would be kept once saved.

        Always True with `keep_last=True` (the newest is kept). Otherwise it asks the
        retention policy whether the checkpoint would enter the top k. Only the monitored
        value is read; ask before gathering the state to save.
        """
        if self._plan.settings.keep_last:
            return True
        monitor = self._plan.settings.monitor
        value = None
        if metrics is not None and monitor is not None:
            value = to_float(monitor, monitored_value(metrics, monitor))
        return self._gate.admits(step, monitor, value, self._infos)

    def decline(self, step: int, metrics: Mapping[str, float] | None) -> None:
        """Record in the history that a checkpoint of `step` was not written, as `save` does
        when `would_keep` says no: for a caller that asks `would_keep` itself before gathering
        the state. Readers record nothing. Raises `OwnershipError` if another run took over."""
        if self._claim is not None:
            self._claim.refresh()
        if self._journal is not None:
            self._journal.declined(step, metrics, kth=self._gate.kth())

    def wait_until_finished(self) -> None:
        """Block until the pending save commits; a failed background save raises here.

        The error is a `CheckpointSaveError` naming the checkpoint. Checkpoints that
        retention had scheduled for deletion are kept, since nothing newer committed.
        """
        step, self._in_flight = self._in_flight, None
        try:
            super().wait_until_finished()
        except Exception as err:
            self._housekeeper.join()  # nothing may touch the directory after it is given up
            raise self._failed(step, err) from err
        self._housekeeper.finish()

    def close(self) -> None:
        """Orbax's `close`: wait for the pending save and its post-commit work, then release
        the directory (its ownership, and the directory itself if this manager created it
        and wrote nothing)."""
        try:
            # Ours first: if the last save failed it raises, and Orbax's close (which waits
            # again, now without error) still shuts its threads down below.
            self.wait_until_finished()
        finally:
            try:
                self._housekeeper.close()
                super().close()
                if self._journal is not None:
                    self._journal.history.close()
            finally:
                self._release()

    def _release(self) -> None:
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    def reload(self) -> None:
        """Read the directory again (after another process changed it)."""
        super().reload()
        self._report_listing()
        self._gate.forget()

    def delete(self, step: int) -> None:
        """Orbax's `delete` of one retained step."""
        super().delete(step)
        self._gate.forget()

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
        """Metrics stored with `step`; damaged or lost ones are recovered from the directory
        name, else the checkpoint is unscored (never evicted by rank). See `scores.py`."""
        return self._scores.read(step, super().metrics)

    def check_intact(self, step: int, *, deep: bool = False) -> ManifestCheck:
        """Raise `CorruptCheckpointError` if `step` lacks its commit record (or it is
        damaged), has unreadable metrics, or does not match its manifest: sizes always,
        checksums with `deep=True`.

        Returns the manifest check; its status is "unverified" for a checkpoint written
        before manifests existed. Without `deep` it reads a few small files, not the arrays.
        """
        self.wait_until_finished()
        path = self.step_path(step)
        metrics_problem = self._scores.readable(path, step, super().metrics)
        return require_intact(path, step, metrics_problem, deep=deep)

    def record(self, decision: Decision) -> None:
        """Append `decision` to the run's history (the writer only; readers record nothing)."""
        if self._journal is not None:
            self._journal.record(decision)

    def best_step(self) -> int | None:
        """The best retained step; None if no retained step has a finite score (that beats
        `initial_value_threshold`). Without a monitor, the newest step (as in Orbax and
        Lightning)."""
        ranking = self._plan.ranking
        if ranking is None:
            return self.latest_step()
        return ranking.best(self._infos(), self._plan.settings.initial_value_threshold)

    def ranked_steps(self) -> list[int]:
        """Retained steps that have a monitored value, best first (NaN and inf last)."""
        ranking = self._plan.ranking
        return [] if ranking is None else [i.step for i in ranking.ranked(self._infos(), True)]

    def score(self, step: int) -> float | None:
        """The monitored value stored with `step` (may be NaN), or None if it has none."""
        self._require_retained(step)
        ranking = self._plan.ranking
        if ranking is None:
            return None
        info = next(i for i in self._infos() if i.step == step)
        return ranking.value(info.metrics)

    def step_path(self, step: int) -> epath.Path:
        """The directory of a retained step (it exists once the save has committed)."""
        self._require_retained(step)
        return self.directory / self._plan.step_name(step)

    def _failed(self, step: int | None, err: BaseException) -> CheckpointSaveError:
        # The list is read again from disk: what the failed save would have evicted is back.
        name = None if step is None else self._plan.step_name(step)
        self._forget_name(step)
        self.reload()
        return CheckpointSaveError(
            f"saving checkpoint {name!r} (step {step}) in {self.directory} failed: "
            f"{type(err).__name__}: {err}"
        )

    def _infos(self) -> Sequence[ocm.PolicyCheckpointInfo]:
        # Orbax's in-memory view of the directory (including a save in flight): the one list
        # of checkpoints, so best/latest/retention never disagree. Orbax has no public
        # accessor for it; this is the only private attribute read.
        return list(self._checkpoints)

    def _report_listing(self) -> None:
        # Found while Orbax listed the directory, partly in its worker threads.
        for warning in self._plan.step_names.take_warnings():
            warnings.warn(warning, stacklevel=3)

    def _prepare_directory(self) -> None:
        if self._settings_unsaved and self._plan.is_writer:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomic_text(self.directory / SETTINGS_FILE, self._plan.settings.to_json())
        self._settings_unsaved = False

    def _require_retained(self, step: int | None) -> None:
        steps = self.all_steps()
        if step is None or step not in steps:
            raise CheckpointNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; retained steps: "
                f"{sorted(steps)}"
            )

    def _forget_name(self, step: int | None) -> None:
        if self._plan.name_format is not None and step is not None:
            self._plan.name_format.forget(step)
