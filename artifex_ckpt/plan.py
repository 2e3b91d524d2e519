"""The plan of a `MetricCheckpointManager`: everything Orbax needs, built before Orbax is called.

`plan_manager` is a pure function of the directory, the stored and explicit settings and the
caller's options. It returns the `CheckpointManagerOptions` (ranking, retention, naming), the
handler arguments, and what this process may do to the directory (write, clean leftovers,
purge evicted steps). The manager hands the plan to Orbax and keeps it; nothing is read back
from Orbax's private attributes.

Example:
    ```python
    from etils import epath

    plan = plan_manager(epath.Path("/tmp/run"), None, {"save_top_k": 2})
    assert plan.settings.save_top_k == 2 and plan.is_writer
    ```
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm
from orbax.checkpoint.path import step as step_lib

from artifex_ckpt.directory import (
    TRASH,
    TrashPurger,
    absolute,
    is_local,
    remove_uncommitted,
    remove_unfinished,
    require_writable,
)
from artifex_ckpt.errors import ConfigError, StepError
from artifex_ckpt.handlers import default_handler_registry
from artifex_ckpt.listing import CheckedNameFormat
from artifex_ckpt.naming import FilenameTemplate, TemplateNameFormat
from artifex_ckpt.ownership import require_free
from artifex_ckpt.policies import (
    MetricRanking,
    cadence_policy,
    is_provisional,
    retention_policy,
)
from artifex_ckpt.settings import RetentionSettings

if TYPE_CHECKING:
    from artifex_ckpt.config import CheckpointConfig

__all__ = ["ManagerPlan", "cadence_options", "is_writer", "open_plan", "plan_manager"]

# A directory name's limit on common local file systems, in bytes.
_NAME_MAX = 255

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
# Options that would let retention delete what it cannot see, or race the trash purge.
_UNSAFE_OPTIONS = {
    "lightweight_initialize": "checkpoints opened without their metrics could be neither "
    "ranked nor evicted by score",
    "prevent_write_metrics": "without stored metrics the best cannot be found after a restart",
    "enable_background_delete": "evicted checkpoints are purged beside the loop already",
}
# Any of these means the caller chose how items are written; otherwise arrays go uncompressed.
_HANDLER_KWARGS = {"handler_registry", "item_handlers", "item_names", "checkpointers"}


@dataclass(frozen=True)
class ManagerPlan:
    """What a manager was built from, and what this process may do to its directory."""

    directory: epath.Path
    settings: RetentionSettings
    settings_unsaved: bool
    ranking: MetricRanking | None
    retention: ocm.PreservationPolicy
    name_format: TemplateNameFormat | None
    step_names: CheckedNameFormat
    options: ocp.CheckpointManagerOptions
    orbax_kwargs: Mapping[str, Any]
    read_only: bool
    primary_host: int | None
    is_writer: bool
    trash: epath.Path | None

    @property
    def cleans_leftovers(self) -> bool:
        """Whether this process removes unfinished saves (`remove_leftovers`) once opened: the
        writer does, locally and on object stores alike; Orbax's own scan is off."""
        return self.is_writer

    def remove_leftovers(self, committed: Iterable[int]) -> None:
        """Remove the saves a crash left unfinished, before anything is saved; `committed` are
        the steps Orbax's listing found (on an object store only the other entries are asked
        for their commit mark: one listing in all when nothing is unfinished)."""
        if is_local(self.directory):
            remove_unfinished(self.directory)
        else:
            names = set()
            for step in committed:
                with contextlib.suppress(StepError):  # unknown: asked for its mark instead
                    names.add(self.step_name(step))
            remove_uncommitted(self.directory, names, self.is_step_name)

    def is_step_name(self, name: str) -> bool:
        """Whether `name` is a step directory's name under this plan (a template's, with a
        partial checkpoint's tag or not; else Orbax's numeric one)."""
        if self.name_format is not None:
            return self.name_format.step_of(name) is not None
        return name.isascii() and name.isdigit()

    def require_directory(self) -> None:
        """Locally, raise `ConfigError` unless the run directory is still a writable
        directory: Orbax creates step directories in its background thread, where a failure
        (the directory became a file, the disk read-only) leaves its writer threads waiting
        300 s and the process unable to exit. A stat and an access check; none on an object
        store, whose step "directories" are name prefixes."""
        if is_local(self.directory):
            require_writable(self.directory)

    def name_for(
        self,
        step: int,
        metrics: Mapping[str, float] | None,
        *,
        epoch: int | None = None,
        global_step: int | None = None,
        partial: str | None = None,
    ) -> str:
        """Render (and remember) the directory name of a new `step`: the template with the
        counters and metrics (missing ones as "none" when the checkpoint is unscored or
        provisional: the marker in `metrics`, shared by the primary host, decides on every
        host), a partial checkpoint's tag appended. Refuses, locally, a name that would not fit a
        directory name while it is written (with Orbax's temporary suffix)."""
        names = self.name_format
        if names is None:
            return self.step_name(step)
        counters = {"epoch": epoch, "step": global_step, names.template.key: step}
        unscored = metrics is None or is_provisional(metrics)
        name = names.template.render(
            epoch=step if counters["epoch"] is None else counters["epoch"],
            step=step if counters["step"] is None else counters["step"],
            metrics=None if unscored else metrics,
            missing="none" if partial is not None or unscored else "raise",
        )
        name = name if partial is None else f"{name}-{partial}"
        unfinished = name + step_lib.TMP_DIR_SUFFIX
        if is_local(self.directory) and len(unfinished.encode()) > _NAME_MAX:
            raise ConfigError(
                f"checkpoint name {name!r} is too long: while it is written it is named "
                f"{unfinished!r}, {len(unfinished.encode())} bytes, over the {_NAME_MAX}-byte "
                f"limit of a directory name; shorten filename={names.template.template!r}"
            )
        names.remember(step, name)
        return name

    def step_name(self, step: int) -> str:
        """The directory name of a known step."""
        return self.step_names.build_name(step)


def plan_manager(
    directory: epath.Path,
    stored: RetentionSettings | None,
    explicit: Mapping[str, Any] | RetentionSettings,
    options: ocp.CheckpointManagerOptions | None = None,
    orbax_kwargs: Mapping[str, Any] | None = None,
    *,
    process_index: int = 0,
) -> ManagerPlan:
    """Build the plan of a manager on `directory`.

    `stored` are the settings found in the directory (None if none), `explicit` the
    caller's: a mapping whose None values mean "not given", or complete `RetentionSettings`
    (where `monitor=None` means "no monitor"). Raises `ConfigError` for options that would
    fight the manager's own retention and naming.
    """
    if isinstance(explicit, RetentionSettings):
        given = dataclasses.asdict(explicit)
    else:
        given = {name: value for name, value in explicit.items() if value is not None}
    settings = RetentionSettings(**given) if stored is None else stored.resolve(**given)
    ranking = None if settings.monitor is None else MetricRanking(settings.monitor, settings.mode)
    retention = retention_policy(
        ranking, settings.save_top_k, settings.keep_last, settings.initial_value_threshold
    )
    name_format = (
        TemplateNameFormat(FilenameTemplate(settings.filename, key=settings.key))
        if settings.filename
        else None
    )
    options = _checked(options or ocp.CheckpointManagerOptions())
    step_names = CheckedNameFormat(
        name_format
        or step_lib.standard_name_format(
            single_host_load_and_broadcast=options.single_host_load_and_broadcast,
            temporary_path_cls=options.temporary_path_class,
            atomicity_options=options.atomicity_options,
        )
    )
    read_only = bool(options.read_only)
    primary = options.multiprocessing_options.primary_host
    if primary is None:
        options = _per_host(options, process_index)
    own_trash = options.todelete_subdir is None
    kwargs = dict(orbax_kwargs or {})
    if not _HANDLER_KWARGS & kwargs.keys():
        kwargs["handler_registry"] = default_handler_registry(options.multiprocessing_options)
    return ManagerPlan(
        directory=directory,
        settings=settings,
        settings_unsaved=stored != settings,
        ranking=ranking,
        retention=retention,
        name_format=name_format,
        step_names=step_names,
        options=dataclasses.replace(
            options,
            best_fn=None if ranking is None else ranking.best_fn,
            best_mode=settings.mode,
            preservation_policy=retention,
            # Damaged commit records and links back into the run are kept from Orbax's scan;
            # the wrapper answers step lookups from its listing, so this costs no I/O (B7).
            step_name_format=step_names,
            # Orbax's scan asks every entry for its commit mark (2-4 requests each on an
            # object store, ~0.2 s per 1,000 locally); `remove_leftovers` runs after opening.
            cleanup_tmp_directories=False,
            create=False,
            todelete_subdir=TRASH if own_trash else options.todelete_subdir,
        ),
        orbax_kwargs=kwargs,
        read_only=read_only,
        primary_host=primary,
        is_writer=is_writer(options, process_index),
        trash=directory / TRASH if own_trash and is_local(directory) else None,
    )


def open_plan(
    directory: str | os.PathLike[str] | epath.Path,
    explicit: Mapping[str, Any] | RetentionSettings,
    options: ocp.CheckpointManagerOptions | None = None,
    orbax_kwargs: Mapping[str, Any] | None = None,
    *,
    stale_after_s: float,
) -> ManagerPlan:
    """Look at `directory` once and plan a manager for it, writing nothing.

    Refuses a path that is a file, an unwritable location (for a writer) and a directory
    that another live run writes (for a writer: its owner is named before any settings it
    stored can conflict); reads the stored settings; checks the trash of evicted steps.
    """
    root = absolute(directory)
    # Locally only: an object store has no directories (an object and a prefix may share a
    # name), and a writer's lease, written at open, probes its permissions (`acquire`).
    if is_local(root):
        if root.exists() and not root.is_dir():
            raise ConfigError(
                f"directory {os.fspath(root)!r} is an existing file; pass a directory"
            )
        if not (options and options.read_only):
            require_writable(root)
    process_index = jax.process_index()
    if is_writer(options, process_index):
        require_free(root, stale_after_s=stale_after_s)
    stored = RetentionSettings.load(root)
    plan = plan_manager(root, stored, explicit, options, orbax_kwargs, process_index=process_index)
    if plan.trash is not None and plan.is_writer:
        TrashPurger(root).check()
    return plan


def cadence_options(
    config: CheckpointConfig,
    options: ocp.CheckpointManagerOptions | None,
    cadence: ocm.SaveDecisionPolicy | None = None,
) -> ocp.CheckpointManagerOptions:
    """`options` with the config's cadence (`cadence`, else `cadence_policy(config)`) as the
    save decision policy. A caller's own policy is refused: the config's cadence decides when
    `ModelCheckpoint` saves."""
    options = options or ocp.CheckpointManagerOptions()
    if options.save_decision_policy is not None:
        raise ConfigError(
            f"options.save_decision_policy={options.save_decision_policy!r} conflicts "
            "with the config's cadence (every_n_epochs, every_n_train_steps, "
            "train_time_interval); set the cadence in CheckpointConfig, or use "
            "MetricCheckpointManager directly"
        )
    return dataclasses.replace(
        options, save_decision_policy=ocm.AnySavePolicy([cadence or cadence_policy(config)])
    )


def is_writer(options: ocp.CheckpointManagerOptions | None, process_index: int) -> bool:
    """Whether a manager with `options` on process `process_index` writes its directory:
    it is not read-only, and it is the primary host (or every host is).

    Example:
        ```python
        assert not is_writer(ocp.CheckpointManagerOptions(read_only=True), 0)
        ```
    """
    options = options or ocp.CheckpointManagerOptions()
    primary = options.multiprocessing_options.primary_host
    return not options.read_only and primary in (None, process_index)


def _per_host(
    options: ocp.CheckpointManagerOptions, process_index: int
) -> ocp.CheckpointManagerOptions:
    """`primary_host=None`: each host saves to a directory of its own. Only this process
    takes part in the manager's barriers (under a key prefix of its own), and it signals
    its own directory's creation, so that no host waits for, or is misled by, another.
    The caller's processes and key prefix are kept; per-process directory creation is
    always on (without it a save fails with a missing directory)."""
    processes = options.multiprocessing_options
    processes = dataclasses.replace(
        processes,
        active_processes=processes.active_processes or {process_index},
        barrier_sync_key_prefix=processes.barrier_sync_key_prefix or f"host-{process_index}",
    )
    return dataclasses.replace(
        options, multiprocessing_options=processes, enable_per_process_directory_creation=True
    )


def _checked(options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManagerOptions:
    for name in _OWNED_OPTIONS:
        if getattr(options, name) is not None:
            raise ConfigError(
                f"options.{name}={getattr(options, name)!r} conflicts with the manager's "
                "own retention and naming; use save_top_k, keep_last and filename instead"
            )
    for name, reason in _UNSAFE_OPTIONS.items():
        if getattr(options, name):
            raise ConfigError(f"options.{name}=True is not supported: {reason}; leave it False")
    return options
