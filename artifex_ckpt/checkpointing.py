"""Save and restore flax nnx models and optimizers through a `MetricCheckpointManager`.

A checkpoint holds the items `model` (a pure dict of `nnx.state(model)`, or of its
`nnx.Param` state when weights-only), `optimizer` (a pure dict of `nnx.state(optimizer)`)
and `trainer_state` (JSON: epoch, global step, logs, weights_only). Each array item is
a standard Orbax checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from artifex_ckpt.data_state import (
    DATA_ITEM,
    data_restore_args,
    data_save_args,
    has_data_state,
    position_kept_on_error,
)
from artifex_ckpt.directory import is_local, read_object
from artifex_ckpt.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    CorruptCheckpointWarning,
    ModelMismatchError,
    StepError,
    WeightsOnlyError,
)
from artifex_ckpt.history import Decision
from artifex_ckpt.listing import COMMIT_RECORD, irregular
from artifex_ckpt.manager import STALE_AFTER_S, MetricCheckpointManager
from artifex_ckpt.manifest import ManifestCheck, verify
from artifex_ckpt.metrics import jsonable
from artifex_ckpt.ownership import OwnershipError, live_owner
from artifex_ckpt.scores import METRICS_FILE

__all__ = [
    "RestoredCheckpoint",
    "checkpoint_args",
    "load_checkpoint",
    "read_trainer_state",
    "restore_checkpoint",
    "save_checkpoint",
    "setup_checkpoint_manager",
]

logger = logging.getLogger("artifex_ckpt")

MODEL, OPTIMIZER, TRAINER_STATE = "model", "optimizer", "trainer_state"
# The file in which Orbax's JSON handler stores an item.
_JSON_FILE = "metadata"
StepSpec = int | Literal["latest", "best"] | None


class RestoredCheckpoint(NamedTuple):
    """What `restore_checkpoint` restored: the step (after any fallback), its directory,
    and its trainer state (epoch, global_step, logs, weights_only)."""

    step: int
    path: epath.Path
    trainer_state: Mapping[str, Any]


def setup_checkpoint_manager(
    directory: str | os.PathLike[str] | epath.Path,
    *,
    read_only: bool | None = None,
    **kwargs: Any,
) -> tuple[MetricCheckpointManager, epath.Path]:
    """Open (or create) a checkpoint directory; settings stored there are adopted.

    Which kind of manager it opens:

    - `read_only=None` (the default): the writer if no live run holds the directory, else
      a reader, logged at INFO on the logger "artifex_ckpt" with the owner's host, pid and
      command. So an evaluation script opened while training runs reads the run and never
      touches it, and the same script opened after training (or after the trainer died: its
      lease is stale) can save. A damaged lease file also opens a reader (nobody can tell
      who writes).
    - `read_only=True`: a reader, whoever writes. It never writes, deletes or moves anything
      (not even a crashed run's unfinished saves) and `save` raises `ConfigError`.
    - `read_only=False`: the writer; `OwnershipError` names the owner if a live run holds
      the directory (a stale owner is taken over with a `StaleLeaseWarning`).

    Other keyword arguments go to `MetricCheckpointManager` (`monitor`, `filename`,
    `options`, ...). Close the manager when done: a writer holds the directory until then.

    Example:
        ```python
        manager, path = setup_checkpoint_manager("/tmp/setup-example", save_top_k=2)
        assert not manager.plan.read_only  # nobody else writes there
        manager.close()
        ```
    """
    if read_only is not None and not isinstance(read_only, bool):
        raise ConfigError(f"read_only={read_only!r} is not accepted; use None, True or False")
    options = kwargs.pop("options", None) or ocp.CheckpointManagerOptions()
    if read_only is False and options.read_only:
        raise ConfigError("read_only=False conflicts with options.read_only=True; pass one of them")
    if read_only is None and not options.read_only:
        read_only = _held_elsewhere(directory)
    if read_only:
        options = dataclasses.replace(options, read_only=True)
    try:
        manager = MetricCheckpointManager(directory, options=options, **kwargs)
    except OwnershipError as err:
        # Taken by another run between the look above and the open: read it instead.
        if read_only is not None or err.owner is None:
            raise
        logger.info("%s is written by %s; opened read-only", directory, err.owner.describe())
        options = dataclasses.replace(options, read_only=True)
        manager = MetricCheckpointManager(directory, options=options, **kwargs)
    return manager, manager.directory


def _held_elsewhere(directory: str | os.PathLike[str] | epath.Path) -> bool:
    """Whether another writer holds `directory` now (logged at INFO if so)."""
    try:
        owner = live_owner(directory, stale_after_s=STALE_AFTER_S)
    except OwnershipError as err:
        logger.info("%s; opened read-only", err)
        return True
    if owner is not None:
        logger.info(
            "%s is being written by %s; opened read-only (pass read_only=False to write, "
            "once that run has finished)",
            os.fspath(directory),
            owner.describe(),
        )
    return owner is not None


def _model_state(model: nnx.Module, weights_only: bool) -> nnx.State:
    return nnx.state(model, nnx.Param) if weights_only else nnx.state(model)


def checkpoint_args(
    model: nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    *,
    weights_only: bool = False,
    trainer_state: Mapping[str, Any] | None = None,
    data_iterator: object = None,
) -> ocp.args.Composite:
    """The Orbax save args for a model (and optimizer) in this project's layout; a grain
    `data_iterator`'s position is saved as the item `data`."""
    items: dict[str, ocp.args.CheckpointArgs] = {
        MODEL: ocp.args.StandardSave(nnx.to_pure_dict(_model_state(model, weights_only)))
    }
    if optimizer is not None and not weights_only:
        items[OPTIMIZER] = ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer)))
    data = data_save_args(data_iterator)
    if data is not None:
        items[DATA_ITEM] = data
    info = {**jsonable(dict(trainer_state or {})), "weights_only": weights_only}
    items[TRAINER_STATE] = ocp.args.JsonSave(info)
    return ocp.args.Composite(**items)


def save_checkpoint(
    manager: MetricCheckpointManager,
    model: nnx.Module,
    step: int,
    *,
    optimizer: nnx.Optimizer | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> bool:
    """Save `model` (and `optimizer`) as `step`; returns whether a checkpoint was written.

    Example:
        ```python
        saved = save_checkpoint(manager, model, 0, metrics={"val_loss": 0.3})
        ```
    """
    args = checkpoint_args(model, optimizer, trainer_state={"epoch": step, "global_step": step})
    return manager.save(step, args=args, metrics=metrics)


def read_trainer_state(manager: MetricCheckpointManager, step: int) -> dict[str, Any]:
    """The JSON `trainer_state` item of `step` (epoch, global_step, logs, weights_only)."""
    item = manager.step_path(step) / TRAINER_STATE
    file = item / _JSON_FILE
    # Orbax's JSON item is one file: read directly rather than through a second restore,
    # and in one request on an object store.
    if is_local(file):
        problem = irregular(file)
        if problem is not None:
            raise CorruptCheckpointError(f"{file} {problem}")
        try:
            text: bytes | None = file.read_bytes()
        except FileNotFoundError:
            text = None
    else:
        text = read_object(file)
    if text is None:
        if item.exists():
            raise CorruptCheckpointError(f"{file} is missing from the item {item}")
        # Written by a custom loop without our helpers: a full-state checkpoint.
        return {"epoch": step, "global_step": step, "weights_only": False}
    try:
        state = json.loads(text)
    except ValueError as err:
        raise CorruptCheckpointError(f"{file} is not JSON ({err})") from err
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{file} holds {type(state).__name__}")
    return state


def load_checkpoint(
    manager: MetricCheckpointManager,
    model: nnx.Module,
    step: StepSpec = None,
    *,
    optimizer: nnx.Optimizer | None = None,
    verify: bool = True,
) -> nnx.Module:
    """Restore a checkpoint into `model` (and `optimizer`) in place, and return `model`.

    `step` is an int, `None`/`"latest"` (the newest) or `"best"`. Pending saves are
    waited for first. The checkpoint's files are checked against its manifest first: sizes
    always, checksums unless `verify=False`. With `"latest"` or `"best"`, a checkpoint that
    is damaged or fails to restore is skipped with a `CorruptCheckpointWarning` naming its
    path and the error, and the next newest (or next best) one is tried; nothing is deleted.
    An explicit int step that fails raises. A checkpoint that is intact but does not fit
    `model` raises `ModelMismatchError` at once: that is not damage.

    Example:
        ```python
        load_checkpoint(manager, model, "best")
        ```
    """
    _restore(manager, model, step, optimizer, verify=verify, by=None, data_iterator=None)
    return model


def restore_checkpoint(
    manager: MetricCheckpointManager,
    model: nnx.Module,
    step: StepSpec = None,
    *,
    optimizer: nnx.Optimizer | None = None,
    verify: bool = True,
    by: str | None = None,
    data_iterator: object = None,
) -> RestoredCheckpoint:
    """`load_checkpoint`, returning what was restored (after any fallback).

    `by` names the caller in the run's decision history ("resume", ...; default "load
    best", "load latest" or "load step"). A grain `data_iterator` is set to the position
    saved with the checkpoint, when it has one.

    Example:
        ```python
        restored = restore_checkpoint(manager, model, "latest", optimizer=optimizer)
        next_epoch = restored.trainer_state["epoch"] + 1
        ```
    """
    restored = _restore(
        manager,
        model,
        step,
        optimizer,
        verify=verify,
        by=by,
        data_iterator=data_iterator,
        state_wanted=True,
    )
    return RestoredCheckpoint(restored.step, restored.path, restored.trainer_state or {})


def _restore(
    manager: MetricCheckpointManager,
    model: nnx.Module,
    step: StepSpec,
    optimizer: nnx.Optimizer | None,
    *,
    verify: bool,
    by: str | None,
    data_iterator: object,
    state_wanted: bool = False,
) -> RestoredCheckpoint:
    """The restore with its fallback; the trainer state is `{}` unless `state_wanted` or
    needed to choose the targets."""
    manager.wait_until_finished()
    by = by or ("load step" if isinstance(step, int) else f"load {step or 'latest'}")
    candidates = _candidates(manager, step)
    for index, candidate in enumerate(candidates):
        path = manager.step_path(candidate)
        try:
            state = _restore_into(
                manager,
                candidate,
                path,
                _Targets(model, optimizer, data_iterator),
                deep=verify,
                state_wanted=state_wanted,
            )
        except (WeightsOnlyError, ModelMismatchError):
            raise
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
            manager.record(Decision.skipped_corrupt(candidate, path.name, by=by, error=error))
            if isinstance(step, int) or index == len(candidates) - 1:
                raise
            warnings.warn(
                CorruptCheckpointWarning(
                    f"checkpoint {path} failed to restore ({error}); trying step "
                    f"{candidates[index + 1]}"
                ),
                stacklevel=4,
            )
            continue
        manager.record(Decision.restored(candidate, path.name, by=by))
        return RestoredCheckpoint(candidate, path, state)
    raise AssertionError("unreachable: _candidates never returns an empty list")


def _candidates(manager: MetricCheckpointManager, step: StepSpec) -> list[int]:
    steps = sorted(manager.all_steps(), reverse=True)
    if isinstance(step, int) and not isinstance(step, bool):
        if step not in steps:
            raise CheckpointNotFoundError(
                f"no checkpoint for step {step} in {manager.directory}; "
                f"retained steps: {sorted(steps)}"
            )
        return [step]
    if step is None or step == "latest":
        found = steps
    elif step == "best":
        # Best first, as best_step() ranks: finite scores that beat initial_value_threshold.
        threshold = manager.settings.initial_value_threshold
        ranking = manager.plan.ranking
        scores = {s: manager.score(s) for s in manager.ranked_steps()}
        found = [
            s
            for s, v in scores.items()
            if v is not None
            and math.isfinite(v)
            and ranking is not None
            and ranking.beats(v, threshold)
        ]
    else:
        raise StepError(f"step={step!r} is not accepted; use an int, None, 'latest' or 'best'")
    if not found:
        what = (
            "checkpoint"
            if step != "best"
            else f"checkpoint with a finite {manager.settings.monitor!r}"
        )
        raise CheckpointNotFoundError(f"no {what} in {manager.directory}")
    return found


class _Targets(NamedTuple):
    """What a restore writes into: the live model, optimizer and data iterator."""

    model: nnx.Module
    optimizer: nnx.Optimizer | None
    data_iterator: object


def _restore_into(
    manager: MetricCheckpointManager,
    step: int,
    path: epath.Path,
    targets: _Targets,
    *,
    deep: bool,
    state_wanted: bool,
) -> dict[str, Any]:
    # One pass of cheap checks before Orbax opens a file (a FIFO in place of one would block
    # its reader): most damage stops here. Locally the checksums are then read beside the
    # restore (the same bytes, from the page cache); on an object store the listing holds
    # them, so the first pass checked them already. Nothing is applied to the model before
    # both the checks and the restore have succeeded.
    local = is_local(path)
    check = _require_intact(manager, step, path, deep=deep and not local)
    model_state = nnx.state(targets.model)
    with (
        position_kept_on_error(targets.data_iterator),
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        intact = None
        if deep and local and check.status == "ok":
            intact = pool.submit(_require_checksums, path)
        try:
            info = _trainer_state(manager, step, check, model_state, targets, state_wanted)
            model_state, optimizer_state, restored = _restore_items(
                manager, step, path, model_state, targets, info
            )
        except Exception as err:
            damage = None if intact is None else intact.exception()
            if damage is not None and not isinstance(err, WeightsOnlyError):
                raise damage from err  # damage explains the failure (and names the file)
            raise
        if intact is not None:
            intact.result()
    nnx.replace_by_pure_dict(model_state, restored[MODEL])
    nnx.update(targets.model, model_state)
    if targets.optimizer is not None and optimizer_state is not None:
        nnx.replace_by_pure_dict(optimizer_state, restored[OPTIMIZER])
        nnx.update(targets.optimizer, optimizer_state)
    return info


def _require_intact(
    manager: MetricCheckpointManager, step: int, path: epath.Path, *, deep: bool
) -> ManifestCheck:
    """`manager.check_intact`, in fewer reads where the manifest covers them.

    With `deep` (asked on object stores only, where the listing gives the checksums) a
    manifest whose every file matched by checksum, the commit record and the metrics
    included, proves those two byte for byte what they were when the committed checkpoint
    was recorded: reading them again would tell nothing more. Anything else (no manifest,
    files it does not cover) gets the full `check_intact`.
    """
    if deep:
        check = verify(path, deep=True)
        if check.status == "mismatch":
            raise CorruptCheckpointError(
                f"checkpoint {path} does not match its manifest: {'; '.join(check.problems)}"
            )
        recorded = set() if check.manifest is None else {e.path for e in check.manifest.entries}
        if COMMIT_RECORD in recorded and (
            METRICS_FILE in recorded or METRICS_FILE not in check.unlisted
        ):
            return check
    return manager.check_intact(step)


def _require_checksums(path: epath.Path) -> None:
    check = verify(path, deep=True)
    if check.status == "mismatch":
        raise CorruptCheckpointError(
            f"checkpoint {path} does not match its manifest: {'; '.join(check.problems)}"
        )


def _trainer_state(
    manager: MetricCheckpointManager,
    step: int,
    check: ManifestCheck,
    model_state: nnx.State,
    targets: _Targets,
    wanted: bool,
) -> dict[str, Any]:
    """The stored trainer state, read when the caller wants it or when its `weights_only`
    decides the targets; else `{}`. It decides nothing for a model holding only
    parameters and no optimizer, and a checkpoint whose manifest records an optimizer item
    is not weights-only (those hold none)."""
    if wanted:
        return read_trainer_state(manager, step)
    if targets.optimizer is None and _only_params(model_state):
        return {}
    if check.manifest is not None and any(
        entry.path.startswith(f"{OPTIMIZER}/") for entry in check.manifest.entries
    ):
        return {"weights_only": False}
    return read_trainer_state(manager, step)


def _params(state: nnx.State) -> nnx.State:
    filtered = nnx.filter_state(state, nnx.Param)
    assert isinstance(filtered, nnx.State)  # one filter gives one state
    return filtered


def _only_params(state: nnx.State) -> bool:
    return len(jax.tree.leaves(state)) == len(jax.tree.leaves(_params(state)))


def _restore_items(
    manager: MetricCheckpointManager,
    step: int,
    path: epath.Path,
    model_state: nnx.State,
    targets: _Targets,
    info: Mapping[str, Any],
) -> tuple[nnx.State, nnx.State | None, Mapping[str, Any]]:
    weights_only = bool(info.get("weights_only", False))
    if targets.optimizer is not None and weights_only:
        raise WeightsOnlyError(
            f"checkpoint {path} holds model weights only; it can be "
            "restored into a model, but has no optimizer state to resume training from"
        )
    if weights_only:
        model_state = _params(model_state)
    trees = {MODEL: nnx.to_pure_dict(model_state)}
    optimizer_state = None
    if targets.optimizer is not None:
        optimizer_state = nnx.state(targets.optimizer)
        trees[OPTIMIZER] = nnx.to_pure_dict(optimizer_state)
    items: dict[str, ocp.args.CheckpointArgs] = {
        name: ocp.args.StandardRestore(tree) for name, tree in trees.items()
    }
    data = data_restore_args(targets.data_iterator)
    if data is not None and has_data_state(path):
        items[DATA_ITEM] = data
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception:
        # Only now is the fit examined: a model of another shape is the caller's mistake
        # (ModelMismatchError), not damage; anything else goes on as it was.
        _require_fit(manager, step, trees)
        raise
    return model_state, optimizer_state, restored


def _require_fit(manager: MetricCheckpointManager, step: int, targets: Mapping[str, Any]) -> None:
    """Raise `ModelMismatchError` if an item was never saved (an optimizer, by a loop that
    saved none) or the stored arrays' paths or shapes differ from the targets'. Unreadable
    metadata is left to the restore (and counts as damage there)."""
    path = manager.step_path(step)
    absent = sorted(name for name in targets if not (path / name).exists())
    if absent:
        # Lost files of a checkpoint with a manifest were reported by `check_intact` already:
        # an item absent here was never saved (e.g. a custom loop saved no optimizer).
        present = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise ModelMismatchError(
            f"checkpoint {path} holds no {' or '.join(absent)} state (its items: {present}); "
            f"restore it without {', '.join(f'{name}=...' for name in absent)}"
        )
    try:
        # Read each item's own metadata: the manager knows an item's handler only once it
        # has used it.
        reader = ocp.PyTreeCheckpointHandler()
        stored = {name: _shapes(reader.metadata(path / name).tree) for name in targets}
    except Exception:
        return
    for name, target in targets.items():
        wanted = _shapes(target)
        if stored[name] == wanted:
            continue
        missing = sorted(wanted.keys() - stored[name].keys())
        extra = sorted(stored[name].keys() - wanted.keys())
        differ = [
            f"{path}: checkpoint {stored[name][path]}, {name} {shape}"
            for path, shape in sorted(wanted.items())
            if path in stored[name] and stored[name][path] != shape
        ]
        details = "; ".join(
            part
            for part in (
                f"missing in the checkpoint: {missing[:5]}" if missing else "",
                f"not in the {name}: {extra[:5]}" if extra else "",
                f"shapes differ: {differ[:5]}" if differ else "",
            )
            if part
        )
        raise ModelMismatchError(
            f"checkpoint {manager.step_path(step)} does not fit the {name} it is restored "
            f"into ({details}); build the {name} with the architecture it was saved from"
        )


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    # Integer keys (an optimizer's state list) come back from storage as strings.
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path): tuple(
            getattr(leaf, "shape", ())
        )
        for path, leaf in leaves
    }
